"""Loading an XTTS v2 model folder into an `XttsModel`.

    model = load_model("models/xtts-v2", precision="int8")

`load_model` reads config.json and vocab.json first (a broken folder fails before any
weights are converted), builds the modules on the meta device and assigns the checkpoint's
weights (`load_state_dict(assign=True)`, every key checked), through one of two caches:

- float (fp32, fp16, GPU bf16): the mapped float32 weights as memory-mapped safetensors
  (`checkpoint.load_weights`), cast afterwards.
- weight-only (int8, CPU bf16): the transformer's linears swapped for weight-only modules
  (`runtime.quant`) and the whole converted state dict cached (`runtime.qcache`), so that a
  later load never builds the float model.

Loaded from a weight-only cache, the model leaves out the modules that only cloning a voice
from reference audio needs (`model.CLONING_MODULES`, about 217 MB in the full-size model):
speaking with studio speakers or already cloned voices never builds them, and the first
clone reads them from the same cache file (`ensure_cloning_modules`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lowvox.engines.xtts.checkpoint import (
    CheckpointError,
    _source_stamp,
    check_keys,
    convert_state_dict,
    default_cache_path,
    file_sha256,
    load_checkpoint,
    load_weights,
)
from lowvox.engines.xtts.config import ConfigError, XttsArgs, XttsConfig
from lowvox.engines.xtts.gpt import cast_gpt, conv1d_to_linear
from lowvox.engines.xtts.hifigan import amx_supported, bf16_supported, int8_supported
from lowvox.engines.xtts.model import CLONING_MODULES, XttsModel
from lowvox.engines.xtts.voices import SpeakerFileError, check_voice, load_studio_speakers
from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.runtime import kernels
from lowvox.runtime.memory import return_freed_memory
from lowvox.runtime.qcache import (
    quantized_cache_path,
    read_quantized,
    read_tensors,
    write_quantized,
)
from lowvox.runtime.quant import (
    BF16_MODE,
    INT8_MODE,
    Int8Linear,
    bf16_linears,
    bf16_skeleton,
    int8_skeleton,
    pack_panels,
    quantize_linears,
)
from lowvox.text.tokenizer import XttsTokenizer

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOAD_PRECISIONS = (*PRECISIONS, "int8")
# Which linears int8 (and bf16 on CPU) apply to (names under `XttsGpt`): the transformer's
# projections, where decoding spends its time. Embeddings, norms, `mel_head` and the voice
# modules stay float32.
BLOCK_LINEARS = ("gpt.h.",)
# Swaps `nn.Linear`s under a module whose names start with `include`; returns how many.
Swap = Callable[..., int]
# Precisions whose block linears become weight-only modules with their own on-disk cache:
# the mode recorded in the cache's metadata, the swap from float layers, and the swap to
# empty layers that a cached state dict is assigned to. bf16 takes this form on CPU only.
WEIGHT_ONLY: dict[str, tuple[str, Swap, Swap]] = {
    "int8": (INT8_MODE, quantize_linears, int8_skeleton),
    "bf16": (BF16_MODE, bf16_linears, bf16_skeleton),
}
_CLONING_PREFIXES = tuple(f"{name}." for name in CLONING_MODULES)

M = TypeVar("M", bound=nn.Module)


def load_model(
    model_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | os.PathLike[str] | None = None,
    vocoder_precision: str = "auto",
    run_on: str | torch.device | None = None,
) -> XttsModel:
    """Load a model folder (config.json, model.pth, vocab.json, optional speakers_xtts.pth).

    `precision` applies to the GPT: "fp32"; "bf16" or "fp16" weights with float32
    LayerNorms (on CPU, bf16 weights with float32 activations throughout); "int8"
    weight-only transformer linears (the rest in float32). The voice modules and the
    speaker encoder always stay float32. `vocoder_precision` is the HiFi-GAN's compute:
    "fp32", "bf16" (CPUs with native bf16), "int8" (int8 convolutions in its widest
    stages: CPUs with AVX-512 VNNI), or "auto": int8 where the GPT runs in int8 on a CPU
    with VNNI and no AMX, else bf16 where the CPU has it and the GPT itself runs in int8 or
    bf16, else fp32. Converted weights are cached as safetensors in `cache_dir` (or beside
    model.pth when that folder is writable); int8 and CPU bf16 weights get their own
    cache, so loading them later never builds the float model. `run_on`: the device the
    model will compute on when that is not where it loads (low-VRAM residency loads into
    RAM and computes on the GPU); it decides the forms above.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LowvoxError(f"model folder not found: {model_dir}")
    if precision not in LOAD_PRECISIONS:
        raise LowvoxError(
            f"unknown precision {precision!r} (choose from {', '.join(LOAD_PRECISIONS)})"
        )
    # Cheap checks first, so a broken folder fails before the weights are converted.
    checkpoint = model_dir / "model.pth"
    config_path = model_dir / "config.json"
    config = XttsConfig.from_file(config_path) if config_path.is_file() else None
    vocab_path = _vocab_path(model_dir, config)
    tokenizer = XttsTokenizer.from_file(vocab_path)

    # Large freed tensors (vocoder activations) go back to the system: RSS stays near
    # what the model needs, not the high-water mark of every activation size.
    return_freed_memory()
    cache_path = default_cache_path(checkpoint, Path(cache_dir) if cache_dir else None)
    compute = torch.device(run_on if run_on is not None else device)
    if precision == "int8" or (precision == "bf16" and compute.type == "cpu"):
        # bf16 on CPU: bf16 weights, float32 activations (lowvox's CPU kernels). int8 on a
        # CPU whose kernels multiply panels: read as panels, the one copy kept.
        panels = precision == "int8" and compute.type == "cpu" and kernels.int8_panels()
        model = _load_weight_only(precision, checkpoint, cache_path, config, vocab_path, panels)
    else:
        weights = load_weights(checkpoint, cache_path)
        if config is None:
            config = _config_from(weights.config, model_dir)
        config = replace(config, model_args=_text_tokens_from_vocab(config.model_args, vocab_path))
        # Eager: the float cache's tensors are memory-mapped, so pages that speaking never
        # reads (the cloning modules') take no memory anyway.
        model = from_state_dict(config, weights.state_dict, source=str(checkpoint))
        model.fingerprint = weights.fingerprint
        del weights
        if precision != "fp32":
            # LayerNorms and the voice modules stay float32 (see `cast_gpt`).
            cast_gpt(model.gpt, PRECISIONS[precision])
    model.precision = precision
    model.model_dir = model_dir
    model.to(device)
    if precision == "int8" and compute.type == "cpu":
        # Now rather than at the first request: the panels a CPU without AMX decodes from,
        # in huge pages, the one copy of the weights (see `pack_panels`; those read from
        # the cache are packed already).
        pack_panels(model.gpt)
    # Every path above: the vocoder's weights in memory of their own, wherever they came from.
    _own_aligned_memory(model.hifigan_decoder)
    model.hifigan_decoder.set_precision(_vocoder_precision(vocoder_precision, precision, compute))

    model.tokenizer = tokenizer
    speakers_file = model_dir / "speakers_xtts.pth"
    if speakers_file.is_file():
        model.speakers = load_studio_speakers(speakers_file)
        for name, voice in model.speakers.items():
            try:
                check_voice(voice, model.gpt.dim, model.config.model_args.d_vector_dim)
            except InvalidRequest as e:
                raise SpeakerFileError(f"{speakers_file}: speaker {name!r}: {e}") from e
    args = model.config.model_args
    log.info(
        "loaded XTTS from %s (%d layers, dim %d, %s on %s, %d studio speakers)",
        model_dir, args.gpt_layers, args.gpt_n_model_channels, precision, device,
        len(model.speakers),
    )  # fmt: skip
    return model


def from_state_dict(
    config: XttsConfig, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> XttsModel:
    """Build on the meta device and assign mapped weights; every key must match."""
    with torch.device("meta"):
        model = XttsModel(config)
    return _assign(model, state_dict, source)


# ---------------------------------------------------------------------------------------------
# Weight-only precisions (int8, CPU bf16) and their cache


def _load_weight_only(
    precision: str,
    checkpoint: Path,
    cache_path: Path | None,
    config: XttsConfig | None,
    vocab_path: Path,
    panels: bool = False,
) -> XttsModel:
    """The GPT's transformer linears as weight-only modules (`WEIGHT_ONLY`): int8 with
    per-channel scales, or bf16. `panels`: int8 weights read from the cache as the CPU
    kernels' panels, their only copy (`Int8Linear.hold_panels`).

    From their cache the model is built on the meta device and the saved tensors are
    assigned as they are: the float GPT never exists. Without a valid cache the float
    model is loaded once, converted layer by layer (each float weight freed as its layer
    is swapped), and the cache written.
    """
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    mode, convert, _ = WEIGHT_ONLY[precision]
    path = quantized_cache_path(cache_path, precision)
    expected = {**_source_stamp(checkpoint), "precision": precision, "mode": mode}
    cached = _weight_only_from_cache(
        precision, path, expected, config, checkpoint, vocab_path, panels
    )
    if cached is not None:
        return cached

    # Straight from model.pth (not through the float cache): one float copy of the
    # weights exists, and it shrinks as each layer is quantised.
    ckpt = load_checkpoint(checkpoint)
    raw_config = ckpt.config
    state = convert_state_dict(ckpt.state_dict)
    del ckpt
    if config is None:
        config = _config_from(raw_config, checkpoint.parent)
    config = replace(config, model_args=_text_tokens_from_vocab(config.model_args, vocab_path))
    model = from_state_dict(config, state, source=str(checkpoint))
    del state  # the model now holds the only references to the float weights
    fingerprint = file_sha256(checkpoint)
    conv1d_to_linear(model.gpt.gpt)
    swapped = convert(model.gpt, include=BLOCK_LINEARS)
    model.fingerprint = fingerprint
    meta = {**expected, "sha256": fingerprint}
    if raw_config is not None:
        meta["config"] = json.dumps(raw_config, default=str)
    log.info("converted %d GPT linear layers to %s", swapped, precision)
    write_quantized(path, model.state_dict(), meta)
    # Use what was written: the converted model still pins the memory-mapped
    # checkpoint's pages, the reloaded one holds only its own converted tensors.
    reloaded = _weight_only_from_cache(
        precision, path, expected, config, checkpoint, vocab_path, panels
    )
    return reloaded if reloaded is not None else model


def _weight_only_from_cache(
    precision: str,
    path: Path | None,
    expected: dict[str, str],
    config: XttsConfig | None,
    checkpoint: Path,
    vocab_path: Path,
    panels: bool = False,
) -> XttsModel | None:
    if path is None:
        return None
    cached = read_quantized(path, expected, skip=_CLONING_PREFIXES, panels=panels)
    if cached is None:
        return None
    if config is None:
        config = _config_from(cached.config, checkpoint.parent)
    config = replace(config, model_args=_text_tokens_from_vocab(config.model_args, vocab_path))
    with torch.device("meta"):
        model = XttsModel(config)
    conv1d_to_linear(model.gpt.gpt)
    _, _, skeleton = WEIGHT_ONLY[precision]
    skeleton(model.gpt, include=BLOCK_LINEARS)
    model.leave_out_cloning_modules(
        CloningSource(path, {**expected, "sha256": cached.metadata["sha256"]})
    )
    model = _assign(model, cached.state_dict, str(path))
    for name, packed in cached.panels.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(layer, Int8Linear):
            raise CheckpointError(f"{path}: int8 tensor {name} is not an int8 layer's weight")
        layer.hold_panels(packed)
    model.fingerprint = cached.metadata["sha256"]
    return model


def _assign(model: M, state_dict: Mapping[str, torch.Tensor], source: str) -> M:
    """Assign `state_dict` to a meta-device `model`; every key and shape must match."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if not any(t.is_meta for t in state_dict.values()):  # meta in, meta out: layout checks
        tensors = [*model.named_parameters(), *model.named_buffers()]
        left = [n for n, t in tensors if t.is_meta]
        if left:
            raise CheckpointError(f"{source} left tensors uninitialised: {_names(left)}")
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# The cloning modules, read on first use


@dataclass(frozen=True)
class CloningSource:
    """The cache file that holds a model's left-out cloning modules, the metadata it must
    still have for its tensors to be the ones the rest of the model was loaded with, and
    the lock under which the first clone reads them (once, however many threads clone)."""

    path: Path
    expected: Mapping[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


def ensure_cloning_modules(model: XttsModel) -> None:
    """Make sure the voice-cloning modules are loaded: after a load from a weight-only
    cache, the first call reads them from that cache file, puts them where the model's
    weights live, and keeps them. Safe to call from several threads; raises `CacheError`
    when the file is gone or no longer the one the model was loaded from (speaking with
    existing voices keeps working)."""
    source = model.cloning_source
    if source is None:
        return  # loaded already (or never left out)
    with source.lock:
        if model.cloning_source is None:
            return  # another thread loaded them while this one waited
        # Ordinary tensors even when called under inference mode, as an eager load makes.
        with torch.inference_mode(False):
            modules = _read_cloning_modules(model, source)
        device = model.weights_device
        model.put_cloning_modules({name: m.to(device) for name, m in modules.items()})
    log.info("loaded the voice-cloning modules from %s", source.path)


def _read_cloning_modules(model: XttsModel, source: CloningSource) -> dict[str, nn.Module]:
    """`CLONING_MODULES` built as the model builds them and filled from `source`."""
    state = read_tensors(source.path, source.expected, _CLONING_PREFIXES)
    with torch.device("meta"):
        modules = model.new_cloning_modules()
    for name, module in modules.items():
        prefix = f"{name}."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        _assign(module, own, f"{source.path} ({name})")
    return modules


# ---------------------------------------------------------------------------------------------
# The folder's other files


def _vocoder_precision(asked: str, gpt_precision: str, device: torch.device) -> str:
    if asked != "auto":
        return asked  # set_precision refuses what this machine cannot do
    cpu = device.type == "cpu"
    # int8 convolutions (AVX-512 VNNI) beat oneDNN's bf16 ones where bf16 has no AMX tiles
    # (the int8 plan vocodes ~1.5x faster than bf16 on Zen 4, see `hifigan.INT8_STAGES`).
    if cpu and gpt_precision == "int8" and int8_supported() and not amx_supported():
        return "int8"
    fast = cpu and bf16_supported() and gpt_precision in ("int8", "bf16")
    return "bf16" if fast else "fp32"


def _config_from(raw: dict[str, Any] | None, model_dir: Path) -> XttsConfig:
    if raw is None:
        raise ConfigError(f"{model_dir} has no config.json and model.pth holds no config")
    return XttsConfig.from_dict(raw)


def _names(keys: list[str], limit: int = 40) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _vocab_path(model_dir: Path, config: XttsConfig | None) -> Path:
    path = model_dir / "vocab.json"
    if path.is_file():
        return path
    named = config.model_args.tokenizer_file if config is not None else ""
    if named and (model_dir / named).is_file():
        return model_dir / named
    raise LowvoxError(f"{model_dir} has no vocab.json")


def _text_tokens_from_vocab(args: XttsArgs, vocab_path: Path) -> XttsArgs:
    """The reference takes the text vocabulary size and [START]/[STOP] ids from the
    tokenizer file rather than config.json; do the same, noting any disagreement."""
    try:
        raw = json.loads(vocab_path.read_text(encoding="utf-8"))
        ids = dict(raw["model"]["vocab"])
        ids.update({t["content"]: t["id"] for t in raw.get("added_tokens", [])})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LowvoxError(f"cannot read {vocab_path}: {e}") from e
    found = {
        "gpt_number_text_tokens": max(ids.values()) + 1,
        "gpt_start_text_token": ids.get("[START]", args.gpt_start_text_token),
        "gpt_stop_text_token": ids.get("[STOP]", args.gpt_stop_text_token),
    }
    changed = {k: v for k, v in found.items() if getattr(args, k) != v}
    if changed:
        log.warning("config.json text token settings differ from %s; using %s", vocab_path, changed)
        return replace(args, **changed)
    return args


def _own_aligned_memory(module: nn.Module, alignment: int = 64) -> None:
    """Give CPU weights that sit off `alignment` in a memory-mapped cache memory of their
    own. oneDNN's convolutions round differently on such tensors (the vocoder's output
    moves by 1 LSB of 24-bit audio), and a book resumed after a restart must sound exactly
    as an uninterrupted run, whether its weights came from the conversion or the cache."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()


__all__ = [
    "BLOCK_LINEARS",
    "CloningSource",
    "LOAD_PRECISIONS",
    "WEIGHT_ONLY",
    "ensure_cloning_modules",
    "from_state_dict",
    "load_model",
]
