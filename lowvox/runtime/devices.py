"""What this machine offers: CPU features, memory, GPUs. Read-only probes, no side effects."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

# CPU flags that matter for choosing a precision (names as /proc/cpuinfo spells them).
INTERESTING_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    cpu_count: int
    cpu_flags: frozenset[str]
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    gpus: list[GpuInfo] = field(default_factory=list)

    @property
    def cpu_has_bf16(self) -> bool:
        return bool(self.cpu_flags & {"avx512_bf16", "amx_bf16"})


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model = platform.processor() or platform.machine()
    flags: frozenset[str] = frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def _read_meminfo() -> tuple[int | None, int | None]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def probe_gpus() -> list[GpuInfo]:
    """CUDA GPUs with their free memory; empty without torch, CUDA or a GPU."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GpuInfo(i, torch.cuda.get_device_name(i), total, free))
    return gpus


def probe_machine(with_gpus: bool = True) -> MachineInfo:
    model, flags = _read_cpuinfo()
    total, available = _read_meminfo()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return MachineInfo(
        cpu_model=model,
        cpu_count=cpus or 1,
        cpu_flags=flags,
        ram_total_bytes=total,
        ram_available_bytes=available,
        gpus=probe_gpus() if with_gpus else [],
    )
