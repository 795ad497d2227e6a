#!/usr/bin/env bash
# What the browser tests need beyond Python packages: Debian's Chromium (driven by Playwright)
# and Firefox ESR (driven by puppeteer-core over WebDriver BiDi, from npm). Best effort: each
# browser test skips, saying why, when its browser is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v firefox-esr >/dev/null 2>&1 || missing+=(firefox-esr)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) ||
            echo "warning: could not install ${missing[*]}; those browser tests will be skipped"
    else
        echo "note: ${missing[*]} not installed (needs root/apt); those browser tests will be skipped"
    fi
fi
if command -v npm >/dev/null 2>&1; then
    if [ ! -d tests/server/firefox/node_modules ]; then
        npm ci --silent --prefix tests/server/firefox ||
            echo "warning: npm ci failed; the Firefox page test will be skipped"
    fi
else
    echo "note: npm not found; the Firefox page test will be skipped"
fi
exit 0
