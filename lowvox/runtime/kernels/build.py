"""Compile `cpu_kernels.c` for this machine, once, into a cache folder.

The library is built with the system C compiler (`$CC`, else cc/gcc/clang) for the CPU it
runs on (`-march=native`), keyed by a hash of the source, compiler, flags and the CPU's
feature list: a cache folder shared between different machines never hands one a library
it cannot execute. The build goes to a temporary name and is renamed into place
(`lowvox.files.atomic_path`), so concurrent processes never load a half-written file; a
library found damaged (empty, cut short: loading one that is cut short kills the process
with SIGBUS) is built again. No compiler, or a failed build, means no library: callers fall
back to torch's kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from lowvox.files import PART_SUFFIX, atomic_path, sweep_partials

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Tried in order; the first that compiles wins (a compiler without -march=native or
# OpenMP still gives a working, slower library).
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
BUILD_TIMEOUT_S = 120


def flag_sets() -> tuple[tuple[str, ...], ...]:
    """`$LOWVOX_KERNEL_FLAGS` as the one flag set to build with, else `FLAG_SETS`.

    It builds the library for another CPU than this one, e.g. the AVX2 path on an AVX-512
    machine: `LOWVOX_KERNEL_FLAGS="-O3 -march=haswell -fopenmp"`.
    """
    forced = os.environ.get("LOWVOX_KERNEL_FLAGS", "").split()
    return (tuple(forced),) if forced else FLAG_SETS


def kernel_dir() -> Path:
    """`$LOWVOX_KERNEL_DIR`, else `$XDG_CACHE_HOME/lowvox/kernels` (~/.cache/...)."""
    if os.environ.get("LOWVOX_KERNEL_DIR"):
        return Path(os.environ["LOWVOX_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowvox" / "kernels"


def find_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(*names: str) -> str | None:
    """The first line of /proc/cpuinfo starting with one of `names`, or None."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(names):
                    return line.strip()
    except OSError:
        pass
    return None


def _cpu_identity() -> str:
    """The CPU's feature list (what -march=native compiles for)."""
    return _cpuinfo_field("flags", "Features") or f"{platform.machine()} {platform.processor()}"


def tuning_defines() -> tuple[str, ...]:
    """Defines for choices that measured opposite ways on AMD and Intel CPUs (cpu_kernels.c,
    LV_AMD: how a decode step prefetches the weights it reads once, and in which order one
    bf16 row reads them), for the vendor of the CPU the build runs on. Added to every
    flag set, `$LOWVOX_KERNEL_FLAGS` included, which may still override them."""
    vendor = _cpuinfo_field("vendor_id") or ""
    return ("-DLV_AMD=1",) if vendor.split(":")[-1].strip() == "AuthenticAMD" else ()


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def build_library(folder: Path | None = None) -> Path | None:
    """The path of a compiled library for this machine (built now if needed), or None."""
    cc = find_compiler()
    if cc is None:
        log.info("no C compiler found: lowvox's CPU kernels are off, torch's are used")
        return None
    folder = folder or kernel_dir()
    # Builds that a killed process left unfinished (a live one finishes within the timeout);
    # only ours: LOWVOX_KERNEL_DIR may name a folder that other programs write to.
    sweep_partials(folder, 2 * BUILD_TIMEOUT_S, (f".lowvox_cpu_*.so.*{PART_SUFFIX}",))
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    errors = []
    tuning, cpu = tuning_defines(), _cpu_identity()
    for flags in flag_sets():
        flags = (*tuning, *flags)
        stamp = "\n".join([cc, version, " ".join(flags), platform.machine(), cpu])
        digest = hashlib.sha256(source + stamp.encode()).hexdigest()[:16]
        target = folder / f"lowvox_cpu_{digest}.so"
        if target.is_file():
            if _whole_library(target):
                return target
            log.warning("the CPU kernels library %s is damaged; building it again", target)
        error = _compile(cc, flags, target)
        if error is None:
            log.info("built lowvox CPU kernels with %s %s", Path(cc).name, " ".join(flags))
            return target
        errors.append(f"{' '.join(flags)}: {error}")
    log.warning("could not build lowvox's CPU kernels (torch's are used):\n%s", "\n".join(errors))
    return None


def _whole_library(path: Path) -> bool:
    """Whether the file at `path` holds all that its ELF header says it does (the section
    headers, which the linker writes last). On macOS (Mach-O, not checked): not empty."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if head[:4] != b"\x7fELF":
        return sys.platform == "darwin" and size > 0
    if head[4:6] != b"\x02\x01":  # not 64-bit little-endian: not checked further
        return True
    if len(head) < 64:
        return False
    (shoff,) = struct.unpack_from("<Q", head, 40)
    shentsize, shnum = struct.unpack_from("<HH", head, 58)
    return shnum > 0 and shoff + shentsize * shnum <= size


class _BuildFailed(Exception):
    """The compiler's complaint (raised so that `atomic_path` removes the temporary file)."""


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile to `target` atomically; the error text, or None on success."""
    try:
        with atomic_path(target) as tmp:
            cmd = [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-lm"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if out.returncode != 0:
                error = (out.stderr or out.stdout).strip()[-500:]
                raise _BuildFailed(error or f"exit status {out.returncode}")
        return None
    except (_BuildFailed, OSError, subprocess.SubprocessError) as e:
        return str(e)
