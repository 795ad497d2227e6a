"""Safe reading of XTTS checkpoints (`model.pth`) and their safetensors cache.

`model.pth` is a torch zip pickle `{"config": ..., "model": state_dict}`. It is read with
`torch.load(weights_only=True)`; only when that refuses a legacy config object (the
`TTS.…XttsConfig` classes coqui-tts pickled) do we fall back to a restricted unpickler that
maps exactly those class names to inert stand-ins. Nothing else is ever resolved, so a
pickle that names `os.system` (or any other callable) is refused before anything runs.

The raw state dict is then mapped to lowvox's module names: a leading `xtts.` is stripped,
training-only and alias keys are dropped, weight-norm pairs are folded into plain weights,
and every tensor becomes float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowvox.errors import LowvoxError

log = logging.getLogger(__name__)

# Bump when the mapping below changes, so that old caches are rebuilt.
CONVERTER_VERSION = "1"

# Key prefixes that belong to training or to inference-time aliases of other weights.
IGNORED_PREFIXES = (
    "dvae.",
    "torch_mel_spectrogram_style_encoder.",
    "torch_mel_spectrogram_dvae.",
    "gpt.gpt_inference.",
    "gpt.gpt.wte.",
    "gpt.text_head.",
)

_WN_NEW = (".parametrizations.weight.original0", ".parametrizations.weight.original1")
_WN_OLD = (".weight_g", ".weight_v")

# Classes coqui-tts pickled into older checkpoints' `config`; they hold plain values only.
LEGACY_CONFIG_CLASSES = frozenset(
    {
        "TTS.tts.configs.xtts_config.XttsConfig",
        "TTS.tts.configs.xtts_config.XttsArgs",
        "TTS.tts.configs.xtts_config.XttsAudioConfig",
        "TTS.tts.models.xtts.XttsArgs",
        "TTS.tts.models.xtts.XttsAudioConfig",
        "TTS.tts.configs.shared_configs.BaseTTSConfig",
        "TTS.tts.configs.shared_configs.CharactersConfig",
        "TTS.tts.configs.shared_configs.GSTConfig",
        "TTS.tts.configs.shared_configs.CapacitronVAEConfig",
        "TTS.config.shared_configs.BaseDatasetConfig",
        "TTS.config.shared_configs.BaseAudioConfig",
        "TTS.config.shared_configs.BaseTrainingConfig",
    }
)


class CheckpointError(LowvoxError):
    """A checkpoint file is missing, unreadable, unsafe or does not match the model."""


@dataclass(frozen=True)
class Checkpoint:
    """What a `model.pth` holds: the config (plain dict, or None) and the raw state dict."""

    config: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Safe unpickling


class LegacyConfigObject:
    """Inert stand-in for a pickled coqui config object: it only stores what BUILD gives it."""

    _qualname = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self._qualname}")
        self.__dict__.update(state)


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[1], (LegacyConfigObject,), {"_qualname": qualname})


_STAND_INS = {name: _stand_in(name) for name in LEGACY_CONFIG_CLASSES}

# What a torch checkpoint legitimately needs besides the storage classes torch resolves itself.
_TORCH_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch's tensor rebuilders and the known legacy config class names."""

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname in _STAND_INS:
            return _STAND_INS[qualname]
        if qualname in _TORCH_GLOBALS:
            return _TORCH_GLOBALS[qualname]
        raise pickle.UnpicklingError(
            f"refusing to load {qualname!r}: only tensors and XTTS config objects are allowed"
        )


class _RestrictedPickleModule:
    """A `pickle_module` for torch.load whose Unpickler is the restricted one."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _plain(obj: Any) -> Any:
    """Turn stand-in config objects (recursively) into dicts."""
    if isinstance(obj, LegacyConfigObject):
        return {k: _plain(v) for k, v in obj.__dict__.items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _torch_load(path: Path) -> Any:
    # Memory-map the zip format (every torch.save since 1.6); older files cannot be.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as first:
        log.info("%s: weights_only load refused (%s); trying the legacy-config loader", path, first)
        try:
            return torch.load(
                path,
                map_location="cpu",
                weights_only=False,
                mmap=mmap,
                pickle_module=_RestrictedPickleModule,
            )
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path} is not a safe XTTS checkpoint: {e}") from e


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a `model.pth` safely. The state dict is returned as stored (no key mapping)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = _torch_load(path)
    except CheckpointError:
        raise
    except Exception as e:  # torch raises many unrelated types for damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {e!r}") from e
    if isinstance(obj, Mapping) and "model" in obj:
        config, state = obj.get("config"), obj["model"]
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        config, state = None, obj  # a bare state dict
    else:
        raise CheckpointError(f"{path} holds no XTTS state dict")
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: 'model' is not a mapping of names to tensors")
    config = _plain(config)
    if config is not None and not isinstance(config, dict):
        config = None
    return Checkpoint(config=config, state_dict=dict(state))


# ---------------------------------------------------------------------------------------------
# Key mapping


def _fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v||, the norm taken over every dim where g has size 1."""
    g, v = g.float(), v.float()
    if g.dim() != v.dim():
        raise CheckpointError(f"weight-norm pair has mismatched ranks {g.shape} vs {v.shape}")
    dims = [d for d in range(v.dim()) if g.shape[d] == 1]
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()
    return v * (g / norm)


def convert_state_dict(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a stored state dict to lowvox's parameter names (see the module docstring).

    Works on meta tensors too, which is how the full-size layout is checked without weights.
    """
    stripped: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        key = key.removeprefix("xtts.")
        if key.startswith(IGNORED_PREFIXES):
            continue
        stripped[key] = value

    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in stripped.items():
        for suffixes in (_WN_NEW, _WN_OLD):
            hit = next((i for i, s in enumerate(suffixes) if key.endswith(s)), None)
            if hit is not None:
                base = key[: -len(suffixes[hit])]
                pending.setdefault(base, {})[hit] = value
                break
        else:
            out[key] = value if value.dtype == torch.float32 else _to_float(value)

    incomplete = sorted(base for base, pair in pending.items() if len(pair) != 2)
    if incomplete:
        raise CheckpointError(f"incomplete weight-norm pairs for: {', '.join(incomplete)}")
    for base, pair in pending.items():
        weight_key = base + ".weight"
        if weight_key in out:
            raise CheckpointError(f"{weight_key} is stored both plain and weight-normed")
        out[weight_key] = _fold_weight_norm(pair[0], pair[1])
    return out


def _to_float(t: torch.Tensor) -> torch.Tensor:
    # Integer buffers (BatchNorm's num_batches_tracked) keep their dtype.
    return t.float() if t.is_floating_point() else t


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Safely load `model.pth` and return its state dict mapped to lowvox names, in float32."""
    return convert_state_dict(load_checkpoint(path).state_dict)


def check_keys(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: expected {tuple(expected[k])}, got {tuple(found[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(expected[k]) != tuple(found[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_listing(shapes, '; ')}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(problems))


def _listing(items: list[str], sep: str = ", ", limit: int = 60) -> str:
    # Every key when there are a few; a capped list when a whole other model was given.
    more = f"{sep}... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


# ---------------------------------------------------------------------------------------------
# safetensors cache


@dataclass(frozen=True)
class LoadedWeights:
    """Mapped float32 weights plus a content fingerprint of the source checkpoint."""

    state_dict: dict[str, torch.Tensor]
    fingerprint: str
    config: dict[str, Any] | None = None


def _source_stamp(path: Path) -> dict[str, str]:
    st = path.stat()
    return {
        "source_name": path.name,
        "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
        "converter": CONVERTER_VERSION,
    }


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_path(checkpoint: Path, cache_dir: Path | None) -> Path | None:
    """Where the converted weights of `checkpoint` live: in `cache_dir` when given (one file per
    source path), else beside the checkpoint when that folder is writable, else nowhere."""
    checkpoint = checkpoint.resolve()
    if cache_dir is not None:
        tag = hashlib.sha256(str(checkpoint).encode()).hexdigest()[:16]
        return Path(cache_dir) / f"{checkpoint.stem}-{tag}.lowvox.safetensors"
    if os.access(checkpoint.parent, os.W_OK):
        return checkpoint.with_name(f"{checkpoint.stem}.lowvox.safetensors")
    return None


def load_weights(
    path: str | os.PathLike[str], cache_path: str | os.PathLike[str] | None = None
) -> LoadedWeights:
    """Mapped weights of `path`, through a safetensors cache at `cache_path` when given.

    The cache records the source's size and mtime; when they change it is rebuilt. Its
    metadata also keeps the source's sha256, which becomes the model fingerprint.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    from lowvox.files import atomic_path

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    stamp = _source_stamp(path)
    if cache_path is not None:
        cache_path = Path(cache_path)
        if cache_path.is_file():
            try:
                with safe_open(str(cache_path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if all(meta.get(k) == v for k, v in stamp.items()):
                        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                        config = json.loads(meta["config"]) if meta.get("config") else None
                        log.debug("loaded weights from cache %s", cache_path)
                        return LoadedWeights(state, meta["sha256"], config)
                log.info("cache %s is stale; rebuilding it", cache_path)
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                log.warning("ignoring unreadable cache %s: %s", cache_path, e)

    ckpt = load_checkpoint(path)
    state = convert_state_dict(ckpt.state_dict)
    # Own, contiguous storage: tensors from an mmapped pickle may share storages.
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    sha = file_sha256(path)
    if cache_path is not None:
        meta = {**stamp, "sha256": sha}
        if ckpt.config is not None:
            meta["config"] = json.dumps(ckpt.config, default=str)
        try:
            # A unique temporary name: two processes converting at once never share one.
            with atomic_path(cache_path, fsync=False) as tmp:
                save_file(state, str(tmp), metadata=meta)
            log.info("wrote weights cache %s", cache_path)
        except (OSError, SafetensorError) as e:  # the latter: its writer's I/O errors (disk full)
            log.warning("could not write weights cache %s: %s", cache_path, e)
    return LoadedWeights(state, sha, ckpt.config)
