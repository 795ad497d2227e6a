#!/usr/bin/env bash
# lowvox on a CUDA GPU, in one report: the machine (nvidia-smi, torch's CUDA build), the
# gpu-marked tests, `lowvox bench` on CUDA (fp16 and int8; batches 1, 8, 32), the same
# benchmark in-process with GPU memory capped at 2 GiB, and the server's time to first
# audio (benchmarks/serve_latency.py) with the model resident on the GPU and in low-VRAM
# residency (weights in RAM, moved to the GPU per request; `lowvox bench` has no residency).
#
# Run it from anywhere, on a machine with a CUDA GPU and lowvox installed:
#
#     bash benchmarks/gpu_check.sh                  # -> ./gpu_check_report.txt
#     OUT=/some/dir bash benchmarks/gpu_check.sh    # -> /some/dir/gpu_check_report.txt
#
# Environment: PYTHON (default: the repository's .venv/bin/python, else python3), CACHE
# (random weights and converted caches, default ~/.cache/lowvox/gpu-check; the full-size
# random model is built there once, ~1 GB), CAP_GIB (default 2), LOWVOX_GOLDEN (the golden
# bundle, for the tests that need it). No checkpoint, download or licence is needed.
#
# Every step has its own time limit, and no step starts or runs past BUDGET_S (default
# 450 s; with the 20 s grace before a timed-out step is killed, under 8 minutes in all). A
# failing or timed-out step (exit 124 or 137) is recorded with its exit status and the next
# step runs. The 2 GiB run is `lowvox bench`'s worker in a process that caps torch's CUDA
# allocator first (torch.cuda.set_per_process_memory_fraction), fp16 and int8, batches 1, 8.
set -u

START=$SECONDS
BUDGET_S=${BUDGET_S:-450}
mkdir -p "${OUT:-.}"
REPORT="$(cd "${OUT:-.}" && pwd)/gpu_check_report.txt"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${PYTHON:-}" in
    "") if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi ;;
    /*) ;;
    */*) PYTHON=$PWD/$PYTHON ;;  # relative to where it was started, before the cd below
esac
cd "$REPO" || exit 1
CACHE=${CACHE:-$HOME/.cache/lowvox/gpu-check}
CAP_GIB=${CAP_GIB:-2}
MODEL="$CACHE/bench/random-full-seed0"  # where `lowvox bench --cache-dir $CACHE` builds it
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHON CACHE CAP_GIB MODEL WORK
SUMMARY=()

# step NAME LIMIT_S COMMAND: run COMMAND (a bash string) under `timeout`, output to the report.
step() {
    local name=$1 limit=$2 cmd=$3 left rc t0=$SECONDS
    left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        printf '\n=== %s: skipped (time budget of %ss spent)\n' "$name" "$BUDGET_S" >>"$REPORT"
        SUMMARY+=("$(printf '%-22s skipped (budget)' "$name")")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "gpu_check: $name (up to ${limit}s)"
    printf '\n=== %s (limit %ss)\n$ %s\n' "$name" "$limit" "$cmd" >>"$REPORT"
    timeout --kill-after=20 "$limit" bash -o pipefail -c "$cmd" >>"$REPORT" 2>&1
    rc=$?
    printf '=== %s: exit %s after %ss\n' "$name" "$rc" "$((SECONDS - t0))" >>"$REPORT"
    SUMMARY+=("$(printf '%-22s exit %-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
}

cat >"$WORK/cuda_info.py" <<'EOF'
import torch

print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("CUDA available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free), bf16 {torch.cuda.is_bf16_supported()}")
raise SystemExit(0 if torch.cuda.is_available() else 1)
EOF

cat >"$WORK/random_model.py" <<'EOF'
import os
from pathlib import Path

from lowvox.bench.random_model import ensure_random_model

print(ensure_random_model(Path(os.environ["CACHE"]) / "bench", "full"))
EOF

# `lowvox bench --json` as its table; exit status 1 when a case failed (bench itself says 0).
cat >"$WORK/bench_table.py" <<'EOF'
import json, sys

from lowvox.bench.run import format_report

report = json.load(open(sys.argv[1]))
print(format_report(report))
raise SystemExit(1 if any("error" in case for case in report["cases"]) else 0)
EOF

# The capped run: one case of `lowvox bench` (its worker's `run`) in a process that caps
# torch's CUDA allocator first. `lowvox bench` itself runs every case in a fresh subprocess,
# which a cap set in the parent would not reach; lowvox needs no change for this.
cat >"$WORK/capped_bench.py" <<'EOF'
import json, os, sys

import torch

from lowvox.bench import worker
from lowvox.bench.workload import DEFAULT_NEW_TOKENS, DEFAULT_SENTENCE

cap = float(os.environ["CAP_GIB"]) * 2**30
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
print(f"GPU memory capped at {cap / 2**30:.1f} of {total / 2**30:.1f} GiB", flush=True)
job = {"model_dir": os.environ["MODEL"], "device": "cuda", "precision": sys.argv[1],
       "new_tokens": DEFAULT_NEW_TOKENS, "text": DEFAULT_SENTENCE, "threads": None,
       "batch_sizes": [1, 8], "cache_dir": os.environ["CACHE"]}
try:
    result = worker.run(job)
except Exception as e:  # out of memory under the cap is a finding, not a crash
    result = {"precision": sys.argv[1], "error": f"{type(e).__name__}: {e}"}
print(json.dumps(result, default=str))
sys.exit(1 if "error" in result else 0)
EOF

{
    echo "lowvox GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
    echo "repository: $REPO at $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "python: $PYTHON ($("$PYTHON" --version 2>&1)); cache: $CACHE; budget: ${BUDGET_S}s"
} >"$REPORT"

step "nvidia-smi" 20 'nvidia-smi'
step "torch cuda" 60 '"$PYTHON" "$WORK/cuda_info.py"'
step "random model, doctor" 90 '"$PYTHON" "$WORK/random_model.py" && "$PYTHON" -m lowvox doctor --engine xtts --device cuda --model-dir "$MODEL"'
step "gpu tests" 110 '"$PYTHON" -m pytest -q -m gpu --run-slow tests'
step "bench cuda" 150 '"$PYTHON" -m lowvox bench --random-weights full --device cuda --precision fp16,int8 --batch-sizes 1,8,32 --cache-dir "$CACHE" --json | tee "$WORK/bench.json" || exit
"$PYTHON" "$WORK/bench_table.py" "$WORK/bench.json"'
step "bench cuda ${CAP_GIB}GiB cap" 90 'rc=0; for p in fp16 int8; do "$PYTHON" "$WORK/capped_bench.py" "$p" || rc=$?; done; exit $rc'
step "serve ttfa gpu" 70 'LOWVOX_RESIDENCY=gpu "$PYTHON" benchmarks/serve_latency.py --model-dir "$MODEL" --cache-dir "$CACHE" --device cuda --precision fp16 --log-level warning'
step "serve ttfa low_vram" 70 'LOWVOX_RESIDENCY=low_vram "$PYTHON" benchmarks/serve_latency.py --model-dir "$MODEL" --cache-dir "$CACHE" --device cuda --precision fp16 --log-level warning'

{
    printf '\n=== summary (%ss in all; exit 124 or 137: timed out)\n' "$((SECONDS - START))"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$REPORT"
echo "report: $REPORT"
