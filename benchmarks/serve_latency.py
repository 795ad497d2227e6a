"""Time to first audio (TTFA) as an HTTP client sees it, over a real `lowvox serve`.

Starts `python -m lowvox serve --engine xtts` on a free 127.0.0.1 port (a throwaway
LOWVOX_HOME, a persistent LOWVOX_CACHE_DIR for converted weights), waits for /api/ready, then
sends streamed OpenAI requests (`POST /v1/audio/speech`, pcm, `stream: true`):

  alone              two-sentence requests one at a time (--repeats; medians)
  staggered          two-sentence requests arriving --stagger-s apart: TTFA p50/p95/max
  short_behind_long  one sentence, sent --short-delay-s after a --long-sentences request
  burst              two-sentence requests all at once: aggregate RTF = wall / audio s

With --wyoming (the default) the server also serves Wyoming (`--wyoming --wyoming-port P`),
and one sentence per repeat is spoken three ways, one at a time, for TTFA medians:

  http_one_sentence  the streamed HTTP request above
  wyoming_oneshot    `synthesize` sent -> first `audio-chunk`
  wyoming_streaming  `synthesize-start`, the sentence as `synthesize-chunk`s word by word, then
                     the next sentence's first word, which completes it: that chunk sent ->
                     first `audio-chunk`

Wyoming takes no options (no token cap, no seed), so its clients disconnect at the first
`audio-chunk` (the server cancels the job) and the next request waits until /api/engines
shows the engine idle. TTFA = request sent -> first non-empty body bytes. Every request sends
`options: {"max_new_tokens": N, "seed": S}`: the cap applies per generated piece (the
server packs short sentences into pieces of up to ~250 characters), so random weights,
which rarely emit the stop token, stop early; seeds make runs repeatable. Other LOWVOX_*
settings in the environment (LOWVOX_RESIDENCY, LOWVOX_THREADS, ...) reach the server and
are recorded in the report. Example: `benchmarks/serve_latency.py --random-weights tiny`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeVoice

log = logging.getLogger("serve_latency")

# Distinct sentences of 60-90 characters: (i % 8, i % 7, i % 9, i % 5) repeats after 2520.
# The server packs sentences into pieces of up to ~250 characters: two make one piece, six
# make two or three.
_PARTS = (
    "The captain|My neighbour|A student|The baker|Our teacher|The pilot|A painter|The nurse",
    "carried|painted|repaired|forgot|described|measured|borrowed",
    "a boat across the river|the blue door|an old clock|three letters to the mayor|the wall|"
    "a map of the coast|the red bicycle|a basket of apples|the kitchen lamp",
    "before the storm reached the harbour|while the children slept upstairs|on a cold morning "
    "in early spring|after the market closed for the day|without telling anyone in the village",
)
WORDS = [part.split("|") for part in _PARTS]


def opt(default: object, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Options:
    model_dir: Path
    cache_dir: Path  # the server's LOWVOX_CACHE_DIR: converted weights, cloned voices
    precision: str = opt("int8", "fp32 | bf16 | fp16 | int8")
    device: str = opt("cpu", "cpu | cuda | cuda:N | auto")
    voice: str | None = opt(None, "voice id; None: the first of /v1/audio/voices")
    max_new_tokens: int = opt(100, "audio tokens per generated piece (the model allows ~600)")
    seed: int = opt(0, "base sampling seed")
    repeats: int = opt(3, "alone: requests")
    staggered: int = opt(8, "staggered: requests")
    stagger_s: float = opt(0.7, "staggered: seconds between arrivals")
    long_sentences: int = opt(6, "short_behind_long: sentences of the long request")
    short_delay_s: float = opt(1.0, "short_behind_long: seconds before the short request")
    burst: int = opt(8, "burst: requests")
    wyoming: bool = opt(True, "also serve Wyoming and compare its TTFA with HTTP's")
    start_timeout_s: float = opt(900.0, "seconds for the server to load and warm up")
    request_timeout_s: float = opt(600.0, "seconds per request")


@dataclass
class Timing:
    sent: float  # perf_counter() when sent, when the first body bytes came, when it ended
    first: float = float("nan")
    done: float = float("nan")
    audio_s: float = 0.0


class Client:
    """Streamed speech requests, alone or on threads, with distinct texts and seeds."""

    def __init__(self, base: str, opts: Options, voice: str) -> None:
        self.opts, self.voice, self.n = opts, voice, 0
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self.http = httpx.Client(base_url=base, timeout=opts.request_timeout_s, limits=limits)

    def text(self, sentences: int) -> str:  # called on the main thread only
        start, self.n = self.n, self.n + sentences
        return " ".join(
            " ".join(w[i % len(w)] for w in WORDS) + "." for i in range(start, start + sentences)
        )

    def speak(self, text: str) -> Timing:
        seed = self.opts.seed + sum(map(ord, text))  # repeatable, distinct per text
        body = {"model": "xtts", "input": text, "voice": self.voice, "response_format": "pcm",
                "stream": True, "options": {"max_new_tokens": self.opts.max_new_tokens, "seed": seed}}  # fmt: skip
        t, n = Timing(sent=time.perf_counter()), 0
        with self.http.stream("POST", "/v1/audio/speech", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
            rate = int(r.headers.get("x-sample-rate", 24000))  # pcm: 16-bit mono
            for chunk in r.iter_raw():
                if chunk and n == 0:
                    t.first = time.perf_counter()
                n += len(chunk)
        t.done, t.audio_s = time.perf_counter(), n / 2 / rate
        if n == 0:
            raise RuntimeError(f"no audio for {text[:40]!r}")
        return t

    def concurrently(self, jobs: list[tuple[float, int]]) -> list[Timing]:
        """Each (delay_s, sentences) sent delay_s after the start, on its own thread."""
        texts = [self.text(n) for _, n in jobs]
        results: list[Timing | BaseException | None] = [None] * len(jobs)
        t0 = time.perf_counter()

        def work(i: int) -> None:
            time.sleep(max(0.0, t0 + jobs[i][0] - time.perf_counter()))
            try:
                results[i] = self.speak(texts[i])
            except BaseException as e:  # raised below, on the main thread
                results[i] = e

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
        for th in threads:
            th.start()
        deadline = t0 + max(d for d, _ in jobs) + self.opts.request_timeout_s
        for th in threads:
            th.join(max(0.0, deadline - time.perf_counter()))
        for r in results:
            if not isinstance(r, Timing):
                raise RuntimeError(f"a request failed: {r or 'timed out'!r}")
        return results  # type: ignore[return-value]

    def wait_idle(self) -> None:
        """Until no engine has a job queued or running (a cancelled one leaves at its next
        step)."""
        deadline = time.monotonic() + self.opts.request_timeout_s
        while any(e.get("busy") for e in self.http.get("/api/engines").json()["engines"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the server stayed busy")
            time.sleep(0.05)


async def wyoming_ttfa(port: int, voice: str, text: str, streaming: bool, timeout: float) -> float:
    """Seconds from the event that makes `text` speakable to its first audio-chunk; then
    disconnects, which cancels the rest."""
    v = SynthesizeVoice(name=voice)
    async with AsyncTcpClient("127.0.0.1", port) as c:
        if streaming:
            await c.write_event(SynthesizeStart(voice=v).event())
            for i, word in enumerate(text.split()):
                await c.write_event(SynthesizeChunk(text=word if i == 0 else " " + word).event())
            last = SynthesizeChunk(text=" Then")  # the sentence end is now followed by a space
        else:
            last = Synthesize(text=text, voice=v)
        sent = time.perf_counter()
        await c.write_event(last.event())
        while True:
            event: Event | None = await asyncio.wait_for(c.read_event(), timeout)
            if event is None or event.type == "error":
                raise RuntimeError(f"wyoming: {event.data if event else 'connection closed'}")
            if event.type == "audio-chunk":
                return time.perf_counter() - sent


def stats(timings: list[Timing]) -> dict:
    """TTFA percentiles, audio, per-request median RTF and aggregate RTF (wall / audio)."""
    ttfa = [t.first - t.sent for t in timings]
    audio = sum(t.audio_s for t in timings)
    wall = max(t.done for t in timings) - min(t.sent for t in timings)
    return {
        "requests": [
            {"ttfa_s": t.first - t.sent, "total_s": t.done - t.sent, "audio_s": t.audio_s}
            for t in timings
        ],
        "ttfa_p50_s": float(np.percentile(ttfa, 50)),
        "ttfa_p95_s": float(np.percentile(ttfa, 95)),
        "ttfa_max_s": max(ttfa),
        "audio_s": audio,
        "rtf_median": float(np.median([(t.done - t.sent) / t.audio_s for t in timings])),
        "wall_s": wall,
        "aggregate_rtf": wall / audio,
    }


def ttfa_stats(ttfa: list[float]) -> dict:
    return {
        "requests": [{"ttfa_s": t} for t in ttfa],
        "ttfa_p50_s": float(np.percentile(ttfa, 50)),
        "ttfa_p95_s": float(np.percentile(ttfa, 95)),
        "ttfa_max_s": max(ttfa),
    }


def one_sentence(c: Client, o: Options, wyoming_port: int) -> dict:
    """The same sentence over HTTP, Wyoming synthesize and Wyoming streaming, per repeat."""

    def http(text: str) -> float:
        t = c.speak(text)
        return t.first - t.sent

    def wyoming(text: str, streaming: bool = False) -> float:
        port, timeout = wyoming_port, o.request_timeout_s
        ttfa = asyncio.run(wyoming_ttfa(port, c.voice, text, streaming, timeout))
        c.wait_idle()
        return ttfa

    wyoming(c.text(1))  # warm-up, not measured
    runs: dict[str, Callable[[str], float]] = {
        "http_one_sentence": http,
        "wyoming_oneshot": wyoming,
        "wyoming_streaming": lambda text: wyoming(text, streaming=True),
    }
    ttfa: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(o.repeats):
        text = c.text(1)
        for name, run in runs.items():
            ttfa[name].append(run(text))
    return {name: ttfa_stats(values) for name, values in ttfa.items()}


def scenarios(c: Client, o: Options, wyoming_port: int | None) -> dict:
    c.speak(c.text(1))  # warm-up (voice cloning, caches), not measured
    log.info("alone: %d requests", o.repeats)
    out = {"alone": stats([c.speak(c.text(2)) for _ in range(o.repeats)])}
    log.info("staggered: %d requests %.1f s apart", o.staggered, o.stagger_s)
    out["staggered"] = stats(c.concurrently([(i * o.stagger_s, 2) for i in range(o.staggered)]))
    log.info("short_behind_long: %d sentences, 1 after %.1f s", o.long_sentences, o.short_delay_s)
    long_, short = c.concurrently([(0.0, o.long_sentences), (o.short_delay_s, 1)])
    out["short_behind_long"] = {**stats([short]), "long": stats([long_])["requests"][0]}
    log.info("burst: %d requests at once", o.burst)
    out["burst"] = stats(c.concurrently([(0.0, 2)] * o.burst))
    if wyoming_port is not None:
        log.info("one sentence: HTTP, Wyoming synthesize, Wyoming streaming x %d", o.repeats)
        out.update(one_sentence(c, o, wyoming_port))
    return out


def _write_reference_clip(path: Path, seconds: float = 3.0, rate: int = 22050) -> None:
    """A voiced-sounding synthetic clip: the voice of models without studio speakers."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(140 + 10 * np.sin(2 * np.pi * 3 * t)) / rate
    wav = 0.2 * sum(np.sin(k * phase) / k for k in range(1, 12))
    sf.write(path, wav + np.random.default_rng(0).normal(0, 0.01, t.size), rate, "PCM_16")


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    base: str  # http://127.0.0.1:PORT
    startup_s: float  # start to /api/ready
    env: dict[str, str]  # the server's environment


@contextlib.contextmanager
def xtts_server(
    model_dir: Path,
    cache_dir: Path,
    precision: str,
    device: str,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 900.0,
) -> Iterator[RunningServer]:
    """A `lowvox serve --engine xtts` on a free 127.0.0.1 port with a throwaway home (a
    reference clip in its voice library when the model has no studio speakers) and
    `cache_dir` as its cache; yields it once ready, and always stops it. A
    failure shows the server log's last lines."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="lowvox-bench-server-") as home:
        (Path(home) / "voices").mkdir()
        if not (model_dir / "speakers_xtts.pth").is_file():
            _write_reference_clip(Path(home) / "voices" / "bench-voice.wav")
        env = {k: v for k, v in os.environ.items() if k != "LOWVOX_API_KEY"}
        env.update(LOWVOX_HOME=home, LOWVOX_CACHE_DIR=str(cache_dir))
        cmd = [sys.executable, "-m", "lowvox", "serve", "--engine", "xtts", "--model-dir",
               str(model_dir), "--precision", precision, "--device", device,
               "--host", "127.0.0.1", "--port", str(port), *extra_args]  # fmt: skip
        log_path = Path(home) / "server.log"
        log.info("starting: lowvox %s", " ".join(cmd[3:]))
        with open(log_path, "wb") as server_log:
            proc = subprocess.Popen(cmd, env=env, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            t = time.perf_counter()
            _wait_ready(base, proc, start_timeout_s)
            startup_s = time.perf_counter() - t
            log.info("server ready in %.1f s", startup_s)
            yield RunningServer(base, startup_s, env)
        except BaseException:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            log.error("server log (last lines):\n%s", "\n".join(tail))
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run_benchmark(o: Options) -> dict:
    """Start the server, run every scenario, always stop the server; return the report."""
    wyoming_port = _free_port() if o.wyoming else None
    extra = ["--wyoming", "--wyoming-port", str(wyoming_port)] if wyoming_port else []
    with xtts_server(
        o.model_dir, o.cache_dir, o.precision, o.device, extra, o.start_timeout_s
    ) as server:
        base, startup_s, env = server.base, server.startup_s, server.env
        voice = o.voice
        if voice is None:
            r = httpx.get(f"{base}/v1/audio/voices", params={"model": "xtts"}, timeout=60)
            voice = r.raise_for_status().json()["voices"][0]["id"]
        client = Client(base, o, voice)
        try:
            result = scenarios(client, o, wyoming_port)
        finally:
            client.http.close()
    alone, sbl = result["alone"]["ttfa_p50_s"], result["short_behind_long"]
    sbl["ratio_to_alone"] = sbl["ttfa_p50_s"] / alone
    ratios = {
        "staggered_p95_over_alone": result["staggered"]["ttfa_p95_s"] / alone,
        "short_behind_long_over_alone": sbl["ratio_to_alone"],
    }
    if o.wyoming:
        http = result["http_one_sentence"]["ttfa_p50_s"]
        for name in ("wyoming_oneshot", "wyoming_streaming"):
            ratios[f"{name}_over_http_one_sentence"] = result[name]["ttfa_p50_s"] / http
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
        "voice": voice,
        "environment": {k: v for k, v in env.items() if k.startswith("LOWVOX_")},
        "startup_s": startup_s,
        "scenarios": result,
        "ratios": ratios,
    }


def format_table(report: dict) -> str:
    head = ["scenario", "requests", "TTFA p50 s", "p95 s", "max s", "audio s", "RTF med", "RTF agg"]
    keys = ["ttfa_p50_s", "ttfa_p95_s", "ttfa_max_s", "audio_s", "rtf_median", "aggregate_rtf"]
    rows = [head] + [
        [name, str(len(s["requests"]))] + [f"{s[k]:.3f}" if k in s else "-" for k in keys]
        for name, s in report["scenarios"].items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    r = report
    lines = [f"{r['model_dir']} {r['device']}/{r['precision']} voice {r['voice']!r} max_new_tokens {r['max_new_tokens']} startup {r['startup_s']:.1f} s"]  # fmt: skip
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    q = report["ratios"]
    lines.append(
        f"TTFA ratios: staggered p95 / alone {q['staggered_p95_over_alone']:.2f}x, short_behind_long"
        f" / alone {q['short_behind_long_over_alone']:.2f}x   (RTF agg = wall / audio s)"
    )
    if "wyoming_oneshot_over_http_one_sentence" in q:
        one, streamed = (q[f"wyoming_{m}_over_http_one_sentence"] for m in ("oneshot", "streaming"))
        lines.append(
            f"TTFA p50 ratios: wyoming_oneshot / http_one_sentence {one:.2f}x,"
            f" wyoming_streaming / http_one_sentence {streamed:.2f}x   (target <= 1.2x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, help="an XTTS model folder")
    src.add_argument("--random-weights", choices=["full", "tiny"], help="a random model")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/lowvox/bench"),
                   help="random models; the server's weights cache in <it>/server (%(default)s)")  # fmt: skip
    for f in fields(Options)[2:]:  # --precision ... --request-timeout-s
        kind = str if f.default is None else type(f.default)
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        p.add_argument("--" + f.name.replace("_", "-"), **how, default=f.default,
                       help=f.metadata["help"] + " (default: %(default)s)")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report here")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    cache = a.cache_dir.expanduser()
    model_dir = a.model_dir
    if model_dir is None:
        from lowvox.bench.random_model import ensure_random_model

        model_dir = ensure_random_model(cache, a.random_weights)
    given = {f.name: getattr(a, f.name) for f in fields(Options)[2:]}
    opts = Options(model_dir.expanduser(), cache / "server", **given)
    report = run_benchmark(opts)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
        log.info("wrote %s", a.json)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
