"""On-disk cache of a model's quantised weights (safetensors).

The file holds the whole state dict of the quantised model (int8 weights, their scales and
every tensor that stays in float) and, in its metadata, the precision, the quantisation mode
and the stamp of the source checkpoint (name, size, mtime, converter version) plus its
sha256. A cache whose stamp, precision or mode differ from what is asked for is stale and is
rebuilt; the mode is read from the metadata, never guessed from the file name.

A model can leave some modules' tensors on disk at load (`read_quantized(..., skip=...)`)
and read them later from the same file (`read_tensors`), which first checks that the file
is still the one it loaded from.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lowvox.errors import LowvoxError
from lowvox.files import atomic_path
from lowvox.runtime import kernels
from lowvox.runtime.hugepages import huge_buffer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedWeights:
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    # int8 weights read as the kernels' panels (`read_quantized(panels=True)`), by name;
    # their state_dict entries are stand-ins of the same shape and dtype.
    panels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any] | None:
        raw = self.metadata.get("config")
        return json.loads(raw) if raw else None


def quantized_cache_path(float_cache: Path | None, precision: str) -> Path | None:
    """`model-<tag>.lowvox.safetensors` -> `model-<tag>.<precision>.lowvox.safetensors`."""
    if float_cache is None:
        return None
    name = float_cache.name.removesuffix(".lowvox.safetensors")
    return float_cache.with_name(f"{name}.{precision}.lowvox.safetensors")


class CacheError(LowvoxError):
    """A cache file that a loaded model still reads from is gone, changed or damaged."""


class _Stale(Exception):
    """The file's metadata does not match what was asked for."""


# What a damaged file can make the reader raise (bad JSON, bad header entries, short reads).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)


def read_quantized(
    path: Path | None,
    expected: Mapping[str, str],
    *,
    skip: Sequence[str] = (),
    panels: bool = False,
) -> QuantizedWeights | None:
    """The cached weights when `path` exists and its metadata has every `expected` value;
    None when absent, stale or unreadable (the caller rebuilds it). Tensors whose names
    start with one of `skip` stay on disk (`read_tensors` reads them later). `panels`
    (where `kernels.int8_panels()`): the 2-D int8 weights are packed as they are read, into
    one buffer of huge pages, and returned as `panels`; the row-major weights never all
    exist at once (one layer's at a time)."""
    if path is None or not path.is_file():
        return None
    skipped = tuple(skip)
    try:
        weights = _read(path, expected, lambda name: not name.startswith(skipped), panels=panels)
    except _Stale as e:
        log.info("quantised cache %s is stale (%s); rebuilding it", path, e)
        return None
    except _UNREADABLE as e:
        log.warning("ignoring unreadable quantised cache %s: %s", path, e)
        return None
    log.debug("loaded quantised weights from %s", path)
    return weights


def read_tensors(
    path: Path, expected: Mapping[str, str], prefixes: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Only the tensors whose names start with one of `prefixes`, from a cache whose
    metadata must still have every `expected` value (those of the file a model was loaded
    from). Unlike `read_quantized` there is nothing to fall back to: a file that is gone,
    stale, damaged or without such tensors raises `CacheError`."""
    wanted = tuple(prefixes)
    try:
        weights = _read(path, expected, lambda name: name.startswith(wanted))
    except _Stale as e:
        raise CacheError(
            f"weights cache {path} changed since the model was loaded ({e}); reload the model"
        ) from e
    except _UNREADABLE as e:
        raise CacheError(f"cannot read weights cache {path}: {e}; reload the model") from e
    if not weights.state_dict:
        raise CacheError(f"weights cache {path} holds no tensors under {', '.join(wanted)}")
    log.debug("read %d tensors from %s", len(weights.state_dict), path)
    return weights.state_dict


def _read(
    path: Path, expected: Mapping[str, str], keep: Callable[[str], bool], panels: bool = False
) -> QuantizedWeights:
    """The tensors of `path` whose names pass `keep` (`panels`: see `read_quantized`);
    raises `_Stale` or what a damaged file makes the reader raise (`_UNREADABLE`)."""
    with path.open("rb") as f:
        header, base, meta = _checked_header(f, expected)
        header = {name: info for name, info in header.items() if keep(name)}
        arena = _Arena(header, panels)
        state, packed = {}, {}
        for name, info in header.items():
            part = arena.panel(name)
            if part is None:
                state[name] = _read_tensor(f, base, name, info, arena.take(name))
                continue
            rows = _read_tensor(f, base, name, info)
            packed[name] = kernels.pack_int8_panels(rows, out=part)
            # The model's `weight`: a stand-in, shape and dtype only (see `Int8Linear`).
            state[name] = torch.zeros((), dtype=torch.int8).expand(rows.shape)
    return QuantizedWeights(state, meta, packed)


def _checked_header(
    f: BinaryIO, expected: Mapping[str, str]
) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The tensors' header entries, where their data begins, and the file's metadata,
    which must have every `expected` value and a sha256 (else `_Stale`). The file must be
    whole and every entry's shape fit its bytes, even when only some tensors are read: a
    truncated or damaged cache is never taken for a good one."""
    header, base = _read_header(f)
    meta = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    stale = sorted(k for k, v in expected.items() if meta.get(k) != v)
    if stale or "sha256" not in meta:
        raise _Stale(", ".join(stale) or "no sha256")
    end = max((_entry(name, info)[3] for name, info in header.items()), default=0)
    if os.fstat(f.fileno()).st_size < base + end:
        raise ValueError("the file is shorter than its header says (truncated)")
    return header, base, meta


def _entry(name: str, info: dict[str, Any]) -> tuple[torch.dtype, list[int], int, int]:
    """A header entry's dtype, shape and byte range; ValueError when they disagree. Every
    entry is checked before anything is allocated (a damaged shape may be negative)."""
    dtype = _DTYPES[info["dtype"]]
    shape = [int(n) for n in info["shape"]]
    start, end = (int(n) for n in info["data_offsets"])
    if min(shape, default=0) < 0 or end - start != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{name}: {end - start} bytes stored for shape {shape} {dtype}")
    return dtype, shape, start, end


# safetensors dtype names -> torch dtypes (those a lowvox model can hold).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024**2


def _read_header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the offset where tensor data begins."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file too short for a safetensors header")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER:
        raise ValueError(f"safetensors header of {size} bytes is implausible")
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    return header, 8 + size


class _Arena:
    """The int8 weights (what decoding streams every token) share one huge-page buffer;
    each gets a 64-byte-aligned slice of it: as they are stored, or (`panels`, 2-D ones)
    packed as the kernels' panels (`kernels.panel_shape`)."""

    ALIGN = 64

    def __init__(self, header: Mapping[str, Any], panels: bool = False) -> None:
        # name -> (start, shape, packed as panels)
        self.slots: dict[str, tuple[int, tuple[int, ...], bool]] = {}
        total = 0
        for name, info in sorted(header.items()):
            if info.get("dtype") != "I8":
                continue
            shape = tuple(int(n) for n in info["shape"])
            packed = panels and len(shape) == 2
            if packed:
                shape = kernels.panel_shape(shape[0], shape[1])
            size = math.prod(shape)
            self.slots[name] = (total, shape, packed)
            total += size + (-size % self.ALIGN)
        self.buffer = huge_buffer(total) if total else None

    def _slice(self, name: str, packed: bool) -> torch.Tensor | None:
        if name not in self.slots or self.buffer is None or self.slots[name][2] != packed:
            return None
        start, shape, _ = self.slots[name]
        return self.buffer[start : start + math.prod(shape)].view(shape)

    def take(self, name: str) -> torch.Tensor | None:
        """The uint8 slice reserved for `name` as stored, or None when it gets its own
        allocation (or is packed: `panel`)."""
        part = self._slice(name, packed=False)
        return None if part is None else part.view(-1)

    def panel(self, name: str) -> torch.Tensor | None:
        """Where `name` is packed (`panels`, 2-D int8): its panels' slice, else None."""
        return self._slice(name, packed=True)


def _read_tensor(
    f: io.BufferedReader,
    base: int,
    name: str,
    info: dict[str, Any],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read one tensor straight into memory torch allocated itself (or into `out`, a uint8
    buffer of the right size).

    Not safetensors' own loader: its tensors are either views of a memory map (whose pages
    then count a second time once copied) or sit at unaligned file offsets, which the fused
    int8 kernels cannot read. Here each tensor is a fresh, 64-byte-aligned allocation.
    """
    dtype, shape, start, end = _entry(name, info)
    nbytes = end - start
    t = torch.empty(shape, dtype=dtype) if out is None else out.view(dtype).view(shape)
    if nbytes:
        buf = t.view(-1).view(torch.uint8).numpy().data  # a writable memoryview of `t`
        f.seek(base + start)
        done = 0
        while done < nbytes:
            got = f.readinto(buf[done:])
            if not got:
                raise ValueError(f"{name}: file ends inside the tensor")
            done += got
    return t


def write_quantized(
    path: Path | None, state: Mapping[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Write atomically (temp file + rename); a failure to write is logged, not raised."""
    if path is None:
        return
    try:
        # A unique temporary name: two processes converting at once never share one.
        with atomic_path(path, fsync=False) as tmp:
            _write_safetensors(tmp, state, meta)
        log.info("wrote quantised weights cache %s", path)
    except (OSError, ValueError) as e:
        log.warning("could not write quantised weights cache %s: %s", path, e)


def _write_safetensors(path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The safetensors format, written one tensor at a time: unlike `save_file`, no
    serialised copy of the whole model is built in memory first."""
    names = {dtype: name for name, dtype in _DTYPES.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype not in names:
            raise ValueError(f"{key}: dtype {t.dtype} cannot be cached")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(tensors):
            t = tensors[key]
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)
