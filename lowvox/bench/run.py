"""`lowvox bench`: run the fixed workload per device/precision, in separate processes.

Each case runs in its own interpreter so that load time and peak RSS are that case's
alone; `--compare-reference PYTHON` runs the same token ids through coqui-tts in another
interpreter in the same run and prints lowvox's ratio against it.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lowvox.bench.workload import DEFAULT_NEW_TOKENS, DEFAULT_SENTENCE
from lowvox.errors import LowvoxError

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 3600


@dataclass
class BenchOptions:
    model_dir: Path | None
    random_weights: str | None  # "full" | "tiny" | None
    precisions: list[str]
    devices: list[str]
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    new_tokens: int = DEFAULT_NEW_TOKENS
    text: str = DEFAULT_SENTENCE
    threads: int | None = None
    cache_dir: Path | None = None
    compare_reference: str | None = None
    fidelity: bool = False
    golden_dir: Path | None = None


def _run_json(cmd: list[str], what: str) -> dict[str, Any]:
    log.info("running %s", what)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"{what} timed out after {WORKER_TIMEOUT_S} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"{what} failed (exit {proc.returncode}): " + " | ".join(tail)}
    return json.loads(lines[-1])


def model_folder(opts: BenchOptions) -> Path:
    if opts.model_dir is not None:
        if not (opts.model_dir / "model.pth").is_file():
            raise LowvoxError(f"no model.pth in {opts.model_dir}")
        return opts.model_dir
    from lowvox.bench.random_model import ensure_random_model

    root = (opts.cache_dir or Path.home() / ".cache" / "lowvox") / "bench"
    return ensure_random_model(root, opts.random_weights or "full")


def check_options(opts: BenchOptions) -> BenchOptions:
    """Every case's settings checked, and normalised ("CPU" -> "cpu"), before a model is
    built or a worker started: a typo is a clear error at once, not a row of failures
    after minutes of loading."""
    from lowvox.engines.xtts.loader import LOAD_PRECISIONS
    from lowvox.runtime.planner import check_device

    if not opts.precisions or not opts.devices or not opts.batch_sizes:
        raise LowvoxError("bench needs at least one precision, device and batch size")
    precisions = [p.strip().lower() for p in opts.precisions]
    for precision in precisions:
        if precision not in LOAD_PRECISIONS:
            raise LowvoxError(
                f"unknown precision {precision!r} (choose from {', '.join(LOAD_PRECISIONS)})"
            )
    devices = [check_device(d) for d in opts.devices]
    if "auto" in devices:
        raise LowvoxError("bench measures named devices: cpu, cuda or cuda:N, not auto")
    for name, values in (
        ("batch size", opts.batch_sizes),
        ("new tokens", [opts.new_tokens]),
        ("threads", [opts.threads] if opts.threads is not None else []),
    ):
        for value in values:
            if value < 1:
                raise LowvoxError(f"{name} must be 1 or more, got {value}")
    if opts.golden_dir is not None:
        if not opts.fidelity:
            raise LowvoxError("--golden needs --fidelity (it adds a model to that report)")
        if not (opts.golden_dir / "model.pth").is_file():
            raise LowvoxError(f"no model.pth in {opts.golden_dir}")
    return replace(opts, precisions=precisions, devices=devices)


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    opts = check_options(opts)
    folder = model_folder(opts)
    cases = []
    for device in opts.devices:
        for precision in opts.precisions:
            job = {
                "model_dir": str(folder),
                "device": device,
                "precision": precision,
                "new_tokens": opts.new_tokens,
                "text": opts.text,
                "threads": opts.threads,
                "batch_sizes": opts.batch_sizes,
                "cache_dir": str(opts.cache_dir) if opts.cache_dir else None,
            }
            cmd = [sys.executable, "-m", "lowvox.bench.worker", json.dumps(job)]
            cases.append(
                _run_json(cmd, f"{device}/{precision}") | {"device": device, "precision": precision}
            )
    report: dict[str, Any] = {"model": str(folder), "new_tokens": opts.new_tokens, "cases": cases}
    if opts.compare_reference:
        report["reference"] = run_reference(opts, opts.compare_reference, folder)
    if opts.fidelity:
        from lowvox.bench.fidelity import fidelity_report

        report["fidelity"] = fidelity_report(
            folder, [p for p in opts.precisions if p != "fp32"], opts
        )
    return report


def run_reference(opts: BenchOptions, python: str, folder: Path) -> dict[str, Any]:
    """The same token ids and token count through coqui-tts, in the interpreter `python`."""
    from lowvox.text.tokenizer import XttsTokenizer

    ids = XttsTokenizer.from_file(folder / "vocab.json").encode(opts.text.strip().lower(), "en")
    config = json.loads((folder / "config.json").read_text())
    job = {
        "tokens": ids,
        "new_tokens": opts.new_tokens,
        "threads": opts.threads,
        "model_args": config["model_args"],
        "model_dir": str(folder) if opts.model_dir is not None else None,
    }
    worker = Path(__file__).with_name("reference_worker.py")
    return _run_json([python, str(worker), json.dumps(job)], "reference (coqui-tts)")


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = [
    ("device", "device", "{}"),
    ("precision", "precision", "{}"),
    ("load_s", "load s", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.3f}"),
    ("decode_ms_per_token", "ms/token", "{:.1f}"),
    ("floor_ms_per_token", "floor ms/token", "{:.1f}"),
    ("floor_ratio", "x floor", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("vocoder_s_per_audio_s", "vocoder s/s", "{:.3f}"),
    ("e2e_rtf", "RTF", "{:.3f}"),
    ("stream_first_audio_s", "first audio s", "{:.3f}"),
    ("speak_peak_rss_bytes", "load+speak RSS GB", "{:.2f}"),
    ("peak_rss_bytes", "peak RSS GB", "{:.2f}"),
    ("peak_vram_bytes", "peak VRAM GB", "{:.2f}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        value = value / 1e9
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _snr_text(snr_db: float) -> str:
    """The fidelity report's vocoder SNR as the table shows it."""
    return "identical (fp32 vocoder)" if math.isinf(snr_db) else f"{snr_db:.1f} dB"


def _sampling_text(options: dict[str, Any]) -> str:
    return (
        f"temperature {options['temperature']:g}, top-k {options['top_k']}, "
        f"top-p {options['top_p']:g}, repetition penalty {options['repetition_penalty']:g}"
    )


def _floor_lines(cases: list[dict[str, Any]]) -> list[str]:
    """Each case's weight-streaming floor: the GPT bytes a decode step reads over the read
    bandwidth measured right before its decode."""
    measured = [r for r in cases if "decode_weight_bytes" in r]
    if not measured:
        return []
    first = next((r for r in measured if "read_bandwidth_gb_per_s" in r), None)
    how = ""
    if first is not None:
        how = (
            f" (read bandwidth: torch sum of {first['bandwidth_buffer_bytes'] / 2**30:g} GiB, "
            f"{first['bandwidth_threads']} threads, best of {first['bandwidth_repeats']}, "
            "right before each case's decode)"
        )
    lines = ["", f"floor: GPT weight bytes one decode step reads / read bandwidth{how}"]
    for r in measured:
        what = f"  {r['device']}/{r['precision']}: {r['decode_weight_bytes'] / 1e9:.3f} GB/token"
        if "floor_ms_per_token" not in r:
            lines.append(f"{what}; no floor: {r.get('floor_error', 'not measured')}")
            continue
        line = (
            f"{what} / {r['read_bandwidth_gb_per_s']:.1f} GB/s = "
            f"{r['floor_ms_per_token']:.2f} ms/token"
        )
        if "floor_ratio" in r:
            line += f"; decode {r['decode_ms_per_token']:.1f} ms/token = {r['floor_ratio']:.2f}x the floor"
        lines.append(line)
    return lines


def format_report(report: dict[str, Any]) -> str:
    rows = list(report["cases"])
    ref = report.get("reference")
    if ref and "error" not in ref:
        # The reference worker loads and speaks only: its peak is a load+speak peak.
        rows.append(
            {**ref, "device": "cpu", "precision": "reference",
             "speak_peak_rss_bytes": ref.get("peak_rss_bytes")}
        )  # fmt: skip
    batch_keys = sorted(
        {k for r in rows for k in r if k.startswith("batch") and k.endswith("_rtf")},
        key=lambda k: int(k[5:-4]),
    )
    cols = COLUMNS + [(k, f"batch {k[5:-4]} RTF", "{:.3f}") for k in batch_keys]
    table = [[title for _, title, _ in cols]]
    table += [[_cell(r, key, fmt) for key, _, fmt in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = [
        f"model: {report['model']}   workload: {report['new_tokens']} tokens, stop token suppressed"
    ]
    machine = next((r for r in report["cases"] if "cpu_kernels" in r), None)
    if machine is not None:
        lines.append(
            f"cpu: {machine.get('cpu_model', '?')}   cpu kernels: {machine['cpu_kernels']}   "
            f"threads: {machine['threads']}"
        )
    for i, line in enumerate(table):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += _floor_lines(report["cases"])
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"{r['device']}/{r['precision']}: {r['error']}")
    if ref:
        if "error" in ref:
            lines.append(f"reference: {ref['error']}")
        else:
            lines.append("")
            lines.append("ratio vs reference (higher is better for lowvox):")
            for r in report["cases"]:
                if "error" in r:
                    continue
                speed = ref["decode_ms_per_token"] / r["decode_ms_per_token"]
                rtf = ref["e2e_rtf"] / r["e2e_rtf"]
                voc = ref["vocoder_s_per_audio_s"] / r["vocoder_s_per_audio_s"]
                lines.append(
                    f"  {r['device']}/{r['precision']}: decode {speed:.2f}x, end-to-end {rtf:.2f}x, vocoder {voc:.2f}x faster; "
                    f"load+speak RSS {r.get('speak_peak_rss_bytes', r['peak_rss_bytes']) / ref['peak_rss_bytes']:.2f}x"
                )
    fid = report.get("fidelity")
    if fid:
        lines.append("")
        lines.append("fidelity vs fp32:")
        for name, rows_ in fid.items():
            for r in rows_:
                lines.append(
                    f"  {name} {r['precision']}: logit cosine mean {r['logit_cosine_mean']:.5f} min {r['logit_cosine_min']:.5f}, "
                    f"teacher-forced top-1 agreement {r['top1_agreement'] * 100:.1f}%, vocoder SNR {_snr_text(r['vocoder_snr_db'])}"
                )
                lines.append(
                    f"  {' ' * len(name)} {' ' * len(r['precision'])}  decode steps: logit cosine mean "
                    f"{r['decode_logit_cosine_mean']:.5f} min {r['decode_logit_cosine_min']:.5f}, "
                    f"top-1 agreement {r['decode_top1_agreement'] * 100:.1f}%"
                )
                if "sampling_tv_mean" in r:
                    lines.append(
                        f"  {' ' * len(name)} {' ' * len(r['precision'])}  sampling "
                        f"({_sampling_text(r['sampling_options'])}): TV distance per decode step "
                        f"mean {r['sampling_tv_mean']:.4f} max {r['sampling_tv_max']:.4f}"
                    )
    return "\n".join(lines)
