// The web page in Firefox: type, generate, play, stream, bad input, upload a voice.
// Usage: node page_flow.mjs BASE_URL CLIP_PATH FIREFOX_BINARY; prints one JSON line of what it saw.
import puppeteer from 'puppeteer-core';

const [baseUrl, clipPath, firefox] = process.argv.slice(2);
const browser = await puppeteer.launch({ browser: 'firefox', executablePath: firefox, headless: true });
const result = { errors: [] };
const TIMEOUT = { timeout: 15000 };

async function audioState(page) {
  await page.waitForFunction(() => {
    const a = document.querySelector('#player');
    return a.readyState >= 1 && a.duration > 0;
  }, TIMEOUT);
  return page.$eval('#player', (a) => ({ duration: a.duration, error: a.error && a.error.code, src: a.src }));
}

async function freshPage() {
  const page = await browser.newPage();
  page.on('pageerror', (e) => result.errors.push(String(e)));
  // Test machines have no sound device, and Firefox then fails play() with a sink error
  // (OnMediaSinkAudioError) after decoding fine. Playback is stubbed; decoding is checked.
  await page.evaluateOnNewDocument(() => {
    HTMLMediaElement.prototype.play = function () { return Promise.resolve(); };
  });
  await page.goto(baseUrl + '/');
  await page.waitForFunction(() => document.querySelector('#status').textContent === 'ready', TIMEOUT);
  await page.waitForFunction(() => document.querySelectorAll('#voice option').length > 0, TIMEOUT);
  return page;
}

try {
  let page = await freshPage();
  await page.$eval('#text', (el) => { el.value = ''; });
  await page.type('#text', 'one two three four five six seven eight nine ten');
  await page.select('#voice', 'beta');
  await page.click('#generate');
  await page.waitForFunction(() => document.querySelector('#message').textContent.startsWith('done'), TIMEOUT);
  result.generate = await audioState(page);
  result.download = await page.$eval('#download', (a) => a.getAttribute('download'));
  await page.waitForSelector('#recent-list li', TIMEOUT);
  result.recent = await page.$eval('#recent-list', (el) => el.textContent);
  await page.close();

  page = await freshPage();
  await page.$eval('#text', (el) => { el.value = 'a b c d e f'; });
  await page.click('#stream');
  result.stream = await audioState(page);
  await page.close();

  page = await freshPage();
  await page.$eval('#text', (el) => { el.value = '   '; });
  await page.click('#generate');
  await page.waitForFunction(() => document.querySelector('#message').classList.contains('error'), TIMEOUT);
  result.badInput = await page.$eval('#message', (el) => el.textContent);
  await page.close();

  page = await freshPage();
  await page.type('#voice-name', 'Firefox Voice');
  const input = await page.$('#voice-files');
  await input.uploadFile(clipPath);
  await page.click('#upload-form button[type=submit]');
  await page.waitForFunction(
    () => document.querySelector('#voice-table tbody').textContent.includes('Firefox Voice'), TIMEOUT);
  result.uploaded = true;
  await page.close();
} catch (e) {
  result.failure = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
