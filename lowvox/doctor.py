"""`lowvox doctor`: the effective settings and what this machine offers, as text."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from lowvox import __version__
from lowvox.errors import LowvoxError
from lowvox.runtime.devices import INTERESTING_CPU_FLAGS, probe_machine
from lowvox.runtime.planner import plan
from lowvox.settings import Settings

_SECRET_FIELDS = {"api_key"}
# Enough to stream from memory (several times any L3), small enough to be quick.
DOCTOR_BANDWIDTH_BYTES = 256 << 20


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1024**3:.1f} GiB"


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not installed (needed by the xtts engine)"]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return [
        f"torch: {torch.__version__} ({build}), {torch.get_num_threads()} threads",
    ]


def _espeak_line() -> str:
    try:
        import espeakng_loader
    except ImportError:
        return "espeak-ng: espeakng-loader not installed"
    lib = Path(espeakng_loader.get_library_path())
    state = "found" if lib.is_file() else "MISSING"
    return f"espeak-ng: {state} at {lib}"


def _kernels_line() -> str:
    """lowvox's C kernels for int8 decoding (built on first use, here if need be)."""
    try:
        from lowvox.runtime import kernels
    except ImportError:  # no torch
        return "unavailable (torch missing)"
    return kernels.describe()


def _floor_lines() -> list[str]:
    """This machine's read bandwidth and what it allows a full-size XTTS v2's decoding on
    the CPU (every weight is read once per token); `lowvox bench` shows how close it gets."""
    try:
        import torch

        from lowvox.bench.floor import read_bandwidth, released_floor_lines
    except ImportError:
        return []
    bandwidth = read_bandwidth(DOCTOR_BANDWIDTH_BYTES, repeats=3)
    return [
        f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (torch, "
        f"{torch.get_num_threads()} threads); decode floor of a full-size XTTS v2 on the CPU:",
        *(f"  {line}" for line in released_floor_lines(bandwidth)),
    ]


def _models_lines(settings: Settings) -> list[str]:
    try:
        from lowvox.engines.xtts.download import describe_model, list_models
    except ImportError:
        return ["models: (xtts engine not available)"]
    lines = []
    if settings.model_dir is not None:
        folder = settings.model_dir
        state = describe_model(folder).summary() if folder.is_dir() else "not found"
        lines.append(f"model dir (setting): {folder} ({state})")
    models = list_models(settings.models_path)
    if not models:
        lines.append(f"models: none in {settings.models_path}")
    for m in models:
        lines.append(f"model: {m.name} at {m.path} ({m.summary()})")
    return lines


def report(settings: Settings) -> str:
    machine = probe_machine()
    lines = [f"lowvox {__version__}", "", "Settings:"]
    for key, value in settings.model_dump().items():
        if key in _SECRET_FIELDS and value:
            value = "(set)"
        lines.append(f"  {key} = {value}")
    lines += [
        f"  voices folder = {settings.voices_path}",
        f"  outputs folder = {settings.outputs_path}",
        f"  models folder = {settings.models_path}",
        f"  cache folder = {settings.cache_path}",
        "",
        "Environment:",
        f"  python: {sys.version.split()[0]} ({platform.platform()})",
        *(f"  {line}" for line in _torch_lines()),
        f"  cpu: {machine.cpu_model}, {machine.cpu_count} cores",
        "  cpu features: "
        + (", ".join(f for f in INTERESTING_CPU_FLAGS if f in machine.cpu_flags) or "none of note"),
        f"  ram: {_gib(machine.ram_available_bytes)} available of {_gib(machine.ram_total_bytes)}",
    ]
    if machine.gpus:
        for gpu in machine.gpus:
            lines.append(
                f"  gpu {gpu.index}: {gpu.name}, {_gib(gpu.free_bytes)} free of {_gib(gpu.total_bytes)}"
            )
    else:
        lines.append("  gpu: none")
    lines.append(f"  {_espeak_line()}")
    lines.append(f"  cpu kernels: {_kernels_line()}")
    lines += [f"  {line}" for line in _floor_lines()]
    lines += [f"  {line}" for line in _models_lines(settings)]
    try:
        described = plan(
            machine, settings.device, settings.precision, settings.residency
        ).describe()
    except LowvoxError as e:
        described = f"impossible: {e}"
    lines += ["", f"XTTS plan: {described}"]
    return "\n".join(lines)
