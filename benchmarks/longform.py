"""Long-form jobs: bulk throughput, interactive latency while a book renders, and memory.

Two parts, each measured in one run so the ratios compare like with like:

  throughput  Starts `lowvox serve --engine xtts` (as benchmarks/serve_latency.py does) and
              measures, in order:
                idle TTFA         streamed one-sentence requests, one at a time (median);
                single stream     the job's first --baseline-sentences sentences spoken one
                                  by one as whole-file requests: wall / audio = RTF,
                                  before the job and again after it (the mean of the two);
                job               the whole --words text as a job (`POST /api/jobs`, wav):
                                  wall from creation to `done` / audio seconds = aggregate RTF;
                busy TTFA         while the job renders, --probes streamed one-sentence
                                  requests, one at a time, --probe-gap-s apart.
              Every streamed probe also reports its stall: how long a player starting at
              its first audio would wait for the rest (0 when the stream keeps ahead).
              Every request and the job carry `max_new_tokens` (random weights rarely stop
              on their own) and seeds; retakes are off (random weights make no speech for
              the quality check to judge).
  memory      Runs jobs of --memory-words (default 1,000 and 100,000 words) through the job
              machinery (store, runner, quality check, assembly into m4b with subtitles) in
              fresh processes with a synthetic executor (speech-shaped noise, no model: the
              engine's memory does not grow with a book's length) and reports each
              process's peak RSS.

Example: `benchmarks/longform.py --random-weights full --cache-dir /tmp/slbench`, or
`--part memory`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("longform")
HERE = Path(__file__).resolve().parent


def _serve_latency() -> Any:
    spec = importlib.util.spec_from_file_location("lowvox_bench_sl", HERE / "serve_latency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def book_text(words: int) -> str:
    """About `words` words of distinct sentences (10-14 words each) in paragraphs of four
    and chapters of forty sentences, as Markdown."""
    sl = _serve_latency()
    out, n, count = ["# Benchmark Book"], 0, 0
    while count < words:
        if n % 40 == 0:
            out.append(f"## Chapter {n // 40 + 1}")
        para = []
        for _ in range(4):
            s = " ".join(w[n % len(w)] for w in sl.WORDS) + "."
            para.append(s)
            count += len(s.split())
            n += 1
        out.append(" ".join(para))
    return "\n\n".join(out)


# -- throughput ------------------------------------------------------------------------


def throughput(a: argparse.Namespace) -> dict[str, Any]:
    sl = _serve_latency()
    cache = a.cache_dir.expanduser()
    model_dir = a.model_dir
    if model_dir is None:
        from lowvox.bench.random_model import ensure_random_model

        model_dir = ensure_random_model(cache, a.random_weights)
    text = book_text(a.words)
    with (
        sl.xtts_server(model_dir, cache / "server", a.precision, a.device) as server,
        httpx.Client(base_url=server.base, timeout=600) as http,
    ):
        voices = http.get("/v1/audio/voices", params={"model": "xtts"}).json()
        return _measure(http, a, voices["voices"][0]["id"], text)


def _ttfa(http: httpx.Client, voice: str, text: str, a: argparse.Namespace) -> tuple[float, float]:
    """A streamed one-sentence request: its time to first audio, and how long a player
    that starts at the first audio would have stalled waiting for the rest (seconds)."""
    body = {"model": "xtts", "input": text, "voice": voice, "response_format": "pcm",
            "stream": True, "options": {"max_new_tokens": a.max_new_tokens, "seed": 1}}  # fmt: skip
    t = time.perf_counter()
    first, runs_out, stall = float("nan"), 0.0, 0.0
    with http.stream("POST", "/v1/audio/speech", json=body) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            if not chunk:
                continue
            now = time.perf_counter() - t
            if first != first:  # the first non-empty bytes
                first = runs_out = now
            stall += max(0.0, now - runs_out)
            runs_out = max(runs_out, now) + len(chunk) / 2 / 24_000
    return first, stall


def _measure(http: httpx.Client, a: argparse.Namespace, voice: str, text: str) -> dict:
    probe_texts = [f"Probe number {i}, a short question for the server." for i in range(99)]
    idle_probes = [_ttfa(http, voice, probe_texts[i], a) for i in range(a.probes)]
    idle = [ttfa for ttfa, _ in idle_probes]
    log.info("idle TTFA median %.3f s", statistics.median(idle))

    # The single-stream baseline: the book's first sentences, one whole-file request each,
    # before the job and again after it (the machine's speed drifts over a long run).
    import re

    body_text = re.sub(r"^#.*$", "", text, flags=re.M)
    sentences = [s.strip() + "." for s in body_text.replace("\n", " ").split(".") if s.strip()]

    def single_stream() -> float:
        t0, audio = time.perf_counter(), 0.0
        for i, s in enumerate(sentences[: a.baseline_sentences]):
            r = http.post("/v1/audio/speech", json={
                "model": "xtts", "input": s, "voice": voice, "response_format": "pcm",
                "options": {"max_new_tokens": a.max_new_tokens, "seed": i}})  # fmt: skip
            r.raise_for_status()
            audio += len(r.content) / 2 / 24_000
        rtf = (time.perf_counter() - t0) / audio
        log.info("single-stream RTF %.3f over %d sentences", rtf, a.baseline_sentences)
        return rtf

    single_before = single_stream()

    t0 = time.perf_counter()
    r = http.post("/api/jobs", json={
        "text": text, "markdown": True, "format": "wav", "voice": voice, "retakes": 0,
        "max_new_tokens": a.max_new_tokens, "lufs": None})  # fmt: skip
    r.raise_for_status()
    job = r.json()["job"]
    busy_probes: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe() -> None:
        time.sleep(a.probe_gap_s)
        for t in probe_texts[a.probes : a.probes * 2]:
            if stop.is_set():
                return
            busy_probes.append(_ttfa(http, voice, t, a))
            stop.wait(a.probe_gap_s)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    while True:
        state = http.get(f"/api/jobs/{job['id']}").json()["job"]
        if state["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(1.0)
    wall = time.perf_counter() - t0
    stop.set()
    prober.join(600)
    if state["state"] != "done":
        raise RuntimeError(f"the job ended {state['state']}: {state['error']}")
    busy = [ttfa for ttfa, _ in busy_probes]
    job_audio = state["progress"]["audio_seconds"]
    job_rtf = wall / job_audio
    single_after = single_stream()
    single_rtf = (single_before + single_after) / 2
    return {
        "words": a.words,
        "sentences": state["progress"]["total"],
        "job_wall_s": wall,
        "job_audio_s": job_audio,
        "job_aggregate_rtf": job_rtf,
        "single_stream_rtf": single_rtf,
        "single_stream_rtf_before_after": [single_before, single_after],
        "throughput_gain": single_rtf / job_rtf,
        "idle_ttfa_s": idle,
        "busy_ttfa_s": busy,
        "busy_over_idle_ttfa": statistics.median(busy) / statistics.median(idle) if busy else None,
        "busy_p_max_over_idle": max(busy) / statistics.median(idle) if busy else None,
        # A streamed probe's playback stalls (seconds waiting for audio after the first).
        "idle_stall_s": [stall for _, stall in idle_probes],
        "busy_stall_s": [stall for _, stall in busy_probes],
    }


# -- memory --------------------------------------------------------------------------------


def memory_child(words: int, fmt: str) -> None:
    """Run one job of `words` words through the job machinery; print peak RSS (MiB)."""
    import asyncio

    import numpy as np

    from lowvox.jobs.executors import Executor, Take
    from lowvox.jobs.plan import create_job
    from lowvox.jobs.runner import JobRunner
    from lowvox.jobs.store import JobSettings, JobStore

    class Synthetic(Executor):
        sample_rate, concurrency = 24_000, 4

        async def start(self) -> None: ...

        async def validate(self, request: Any) -> Any:
            return request

        async def speak(self, take: Take, cancel: Any = None) -> np.ndarray:
            rng = np.random.default_rng(int(take.options["seed"]) % 2**32)
            n = int(max(0.5, len(take.text) / 14) * self.sample_rate)
            t = np.arange(n)
            env = 0.5 - 0.5 * np.cos(2 * np.pi * (t % 4320) / 4320)
            x = np.sin(2 * np.pi * 160 * t / self.sample_rate) + 0.3 * rng.standard_normal(n)
            return (0.2 * env * x).astype(np.float32)

    async def go(root: Path) -> dict:
        store = JobStore(root)
        executor = Synthetic()
        job = await create_job(
            store, executor, data=book_text(words).encode(), filename="book.md",
            settings=JobSettings(engine="synthetic", format=fmt, retakes=0, language="en"),
            max_chars=10**8, max_unpacked_bytes=10**9)  # fmt: skip
        t = time.perf_counter()
        job = await JobRunner(store, executor).run(job.id)
        p = store.progress(job.id, 24_000)
        return {"state": job.state, "sentences": p.total, "audio_s": p.audio_seconds,
                "wall_s": time.perf_counter() - t}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="lowvox-longform-mem-") as root:
        result = asyncio.run(go(Path(root)))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def memory(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for words in a.memory_words:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(words),
               "--memory-format", a.memory_format]  # fmt: skip
        log.info("memory: a %d-word job (%s)", words, a.memory_format)
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[str(words)] = json.loads(r.stdout.strip().splitlines()[-1])
        log.info("  %s", out[str(words)])
    peaks = [out[str(w)]["peak_rss_mib"] for w in a.memory_words]
    out["peak_rss_spread_mib"] = max(peaks) - min(peaks)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=["throughput", "memory", "all"], default="all")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="an XTTS model folder")
    src.add_argument("--random-weights", choices=["full", "tiny"], default="full")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/lowvox/bench"))
    p.add_argument("--precision", default="int8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--words", type=int, default=3000, help="the job's text (default 3000)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--baseline-sentences", type=int, default=12)
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--probe-gap-s", type=float, default=20.0)
    p.add_argument("--memory-words", type=int, nargs="+", default=[1000, 100_000])
    p.add_argument("--memory-format", default="m4b")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the report here")
    a = p.parse_args(argv)
    if a.memory_child:
        memory_child(a.memory_child, a.memory_format)
        return 0
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report: dict[str, Any] = {"cpu": _cpu()}
    if a.part in ("throughput", "all"):
        report["throughput"] = throughput(a)
    if a.part in ("memory", "all"):
        report["memory"] = memory(a)
    text = json.dumps(report, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
