"""Voices: cloning from reference audio, the on-disk latent cache, and studio speakers.

A voice is two tensors: the GPT conditioning latents (the perceiver's 32 outputs, averaged
over 4-second chunks of the references) and the speaker embedding that conditions HiFi-GAN
(the speaker encoder's output, averaged over the references). Cloning follows the reference
pipeline step for step so the latents match it: decode, downmix, resample (windowed sinc) to
the model rate, clip, cut to `max_ref_length`, optionally peak-normalise, then embed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from lowvox.audio.io import Audio, load_audio
from lowvox.audio.mel import MelConfig, MelSpectrogram
from lowvox.audio.resample import resample
from lowvox.errors import InvalidRequest, LowvoxError

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    # Cloning reads only the attributes it names (`config.audio.sample_rate`, the three
    # cloning modules, `mel_stats`, `fingerprint`): the voice tests pass smaller stand-ins.
    from lowvox.engines.xtts.model import XttsModel

logger = logging.getLogger(__name__)

# References shorter than this (per chunk) carry too little speech to condition on.
MIN_CHUNK_SECONDS = 0.33
# Peak level that `sound_norm_refs` scales references to.
NORM_PEAK = 0.75
M = TypeVar("M", bound=torch.nn.Module)

# Bump when cloning changes in a way that alters the latents, to invalidate old caches.
CACHE_VERSION = "1"


@dataclass
class Voice:
    """A speaker: GPT conditioning latents `[1, 32, D]` and speaker embedding `[1, 512, 1]`."""

    gpt_cond_latent: torch.Tensor
    speaker_embedding: torch.Tensor
    name: str | None = None


def check_voice(voice: Voice, dim: int, d_vector_dim: int) -> None:
    """InvalidRequest unless `voice` fits a model of width `dim` whose vocoder takes
    `d_vector_dim` speaker embeddings: `[1, N, dim]` and `[1, d_vector_dim, 1]` float
    tensors, all finite (a NaN latent makes that row's sampling fail, and with it the
    decode step of every request batched with it)."""
    latent, emb = voice.gpt_cond_latent, voice.speaker_embedding
    if not (isinstance(latent, torch.Tensor) and isinstance(emb, torch.Tensor)):
        raise InvalidRequest("a voice's latents must be tensors", field="voice")
    if latent.dim() != 3 or latent.shape[0] != 1 or latent.shape[1] < 1 or latent.shape[2] != dim:
        raise InvalidRequest(
            f"voice latents of shape {tuple(latent.shape)} do not fit this model ([1, N, {dim}])",
            field="voice",
        )
    if tuple(emb.shape) != (1, d_vector_dim, 1):
        raise InvalidRequest(
            f"speaker embedding of shape {tuple(emb.shape)} does not fit this model "
            f"([1, {d_vector_dim}, 1])",
            field="voice",
        )
    if not (torch.isfinite(latent).all() and torch.isfinite(emb).all()):
        raise InvalidRequest("the voice holds NaN or infinite values", field="voice")


def conditioning_mel_config(sample_rate: int) -> MelConfig:
    """The mel spectrogram XTTS v2 conditions on (per 4 s chunk, at the model rate)."""
    return MelConfig(
        sample_rate=sample_rate,
        n_fft=2048,
        hop_length=256,
        win_length=1024,
        n_mels=80,
        f_min=0.0,
        f_max=8000.0,
        norm="slaney",
        window="hann",
    )


@lru_cache(maxsize=4)
def _conditioning_mel(sample_rate: int) -> MelSpectrogram:
    return MelSpectrogram(conditioning_mel_config(sample_rate))


def conditioning_mel(
    audio: torch.Tensor, mel_stats: torch.Tensor, mel: MelSpectrogram
) -> torch.Tensor:
    """`[B, N]` audio -> `[B, 80, frames]` log-mel divided by the model's per-band `mel_stats`."""
    spec = mel(audio)
    return torch.log(spec.clamp(min=1e-5)) / mel_stats.reshape(1, -1, 1)


# ---------------------------------------------------------------------------------------------
# Reference inputs


# A reference clip: a file (path), its bytes, or samples: `Audio`, `(samples, sample_rate)`,
# or a bare array at the model's rate.
RefInput = (
    str
    | os.PathLike[str]
    | bytes
    | Audio
    | np.ndarray
    | torch.Tensor
    | tuple[np.ndarray | torch.Tensor, int | np.integer]
)


@dataclass(frozen=True)
class _Reference:
    """One reference clip: its content digest and how to decode it."""

    digest: str
    data: bytes | Audio
    name: str | None = None  # the file it was read from, for errors


def _as_reference(ref: RefInput, default_rate: int) -> _Reference:
    if isinstance(ref, str | os.PathLike):
        path = Path(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise InvalidRequest(f"reference audio not found: {path}") from e
        except OSError as e:
            raise InvalidRequest(f"cannot read reference audio {path}: {e}") from e
        return _Reference("file:" + hashlib.sha256(data).hexdigest(), data, str(path))
    if isinstance(ref, bytes | bytearray | memoryview):
        data = bytes(ref)
        return _Reference("file:" + hashlib.sha256(data).hexdigest(), data)
    rate: int | np.integer = default_rate
    samples: np.ndarray | torch.Tensor
    if isinstance(ref, Audio):
        samples, rate = ref.samples, ref.sample_rate
    elif isinstance(ref, tuple) and len(ref) == 2:
        samples, rate = ref
    else:
        samples = ref  # a bare array is taken to be at the model's rate
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    if not isinstance(samples, np.ndarray):
        raise InvalidRequest(f"unsupported reference audio type: {type(ref).__name__}")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        # soundfile gives [N, channels], torch-style code [channels, N]; channels are few.
        axis = 1 if samples.shape[1] <= 8 < samples.shape[0] else 0
        samples = samples.mean(axis=axis, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise InvalidRequest("reference audio must be a non-empty mono or multi-channel array")
    if not np.isfinite(samples).all():
        raise InvalidRequest("reference audio contains NaN or infinite samples")
    if int(rate) != rate or rate <= 0:
        raise InvalidRequest(f"invalid reference sample rate: {rate!r}")
    samples = np.ascontiguousarray(samples)
    h = hashlib.sha256(samples.tobytes())
    h.update(str(int(rate)).encode())
    return _Reference("pcm:" + h.hexdigest(), Audio(samples, int(rate)))


# ---------------------------------------------------------------------------------------------
# Cache


@dataclass(frozen=True)
class CloneSettings:
    """What, besides the audio and the model, determines a cloned voice."""

    gpt_cond_len: int
    gpt_cond_chunk_len: int
    max_ref_length: int
    sound_norm_refs: bool
    sample_rate: int


class VoiceCache:
    """Cloned voices as safetensors files in `cache_dir`, keyed by content and settings.

    A file that cannot be read or does not hold a voice is treated as missing (and replaced
    on the next `put`): the cache can never make cloning fail. It keeps at most
    `max_entries` voices: every changed, deleted or re-uploaded library voice leaves its
    old latents behind (a full-size voice is ~130 kB), so past that the least recently
    used are removed (a hit marks a file used).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_entries: int = 1024) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_entries = max_entries

    @staticmethod
    def key(digests: Sequence[str], settings: CloneSettings, fingerprint: str) -> str:
        payload = json.dumps(
            {
                "version": CACHE_VERSION,
                "audio": list(digests),
                "settings": settings.__dict__,
                "model": fingerprint,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.cache_dir / f"voice-{key}.safetensors"

    def get(self, key: str) -> Voice | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            latent, emb = tensors["gpt_cond_latent"], tensors["speaker_embedding"]
            if latent.dim() != 3 or emb.dim() != 3 or emb.shape[-1] != 1:
                raise ValueError(f"unexpected shapes {tuple(latent.shape)}, {tuple(emb.shape)}")
            if not (torch.isfinite(latent).all() and torch.isfinite(emb).all()):
                raise ValueError("non-finite values")
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            logger.warning("ignoring unreadable voice cache file %s: %s", path, e)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used: the last to go when the cache is pruned
        return Voice(latent.float(), emb.float())

    def put(self, key: str, voice: Voice) -> None:
        from safetensors.torch import save

        from lowvox.files import write_atomic

        path = self.path(key)
        tensors = {
            "gpt_cond_latent": voice.gpt_cond_latent.detach().float().cpu().contiguous(),
            "speaker_embedding": voice.speaker_embedding.detach().float().cpu().contiguous(),
        }
        # Serialised here and written by `write_atomic` (a few kB): safetensors' own
        # `save_file` reports a full disk as its own error type and, killed mid-write,
        # leaves a temporary under a name no sweep knows.
        data = save(tensors, metadata={"version": CACHE_VERSION})
        try:
            write_atomic(path, data, fsync=False)
        except OSError as e:
            logger.warning("could not write voice cache file %s: %s", path, e)
            return
        self._prune(keep=path)

    def _prune(self, keep: Path) -> None:
        """Remove the least recently used voices beyond `max_entries` (never `keep`)."""
        try:
            entries = []
            with os.scandir(self.cache_dir) as it:
                for e in it:
                    if e.name.startswith("voice-") and e.name.endswith(".safetensors"):
                        with contextlib.suppress(OSError):
                            entries.append((e.stat(follow_symlinks=False).st_mtime, e.path))
        except OSError:
            return
        excess = len(entries) - self.max_entries
        if excess <= 0:
            return
        for _, old in sorted(entries)[: excess + 1]:
            if excess <= 0:
                break
            if Path(old) != keep:
                with contextlib.suppress(OSError):
                    os.unlink(old)
                excess -= 1


# ---------------------------------------------------------------------------------------------
# Cloning


def _param_of(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _present(module: M | None, name: str) -> M:
    """A cloning module that `clone_voice` has made sure of (`_load_cloning_modules`)."""
    if module is None:
        raise LowvoxError(f"the model's {name} is not loaded")
    return module


def gpt_cond_latent(
    model: XttsModel, audio: torch.Tensor, *, gpt_cond_len: int, gpt_cond_chunk_len: int
) -> torch.Tensor:
    """`[1, N]` audio at the model rate -> `[1, num_latents, D]` GPT conditioning latents.

    The first `gpt_cond_len` seconds (all when <= 0) are cut in `gpt_cond_chunk_len`-second
    chunks; each chunk's perceiver output is computed alone and the results averaged.
    """
    rate = int(model.config.audio.sample_rate)
    if gpt_cond_len > 0:
        audio = audio[:, : rate * gpt_cond_len]
    if gpt_cond_chunk_len <= 0:
        raise InvalidRequest("gpt_cond_chunk_len must be positive")
    encoder = _present(model.gpt.conditioning_encoder, "conditioning encoder")
    perceiver = _present(model.gpt.conditioning_perceiver, "conditioning perceiver")
    p = _param_of(encoder)
    mel = _conditioning_mel(rate)
    mel_stats = model.mel_stats.detach().float().cpu()
    step = rate * gpt_cond_chunk_len
    styles = []
    for start in range(0, audio.shape[1], step):
        chunk = audio[:, start : start + step]
        if chunk.shape[-1] < rate * MIN_CHUNK_SECONDS:
            continue
        m = conditioning_mel(chunk, mel_stats, mel)  # [1, 80, frames]
        feats = encoder(m.to(device=p.device, dtype=p.dtype))  # [1, D, frames]
        styles.append(perceiver(feats.transpose(1, 2)).float())  # [1, 32, D]
    if not styles:
        raise InvalidRequest(
            f"reference audio is too short (at least {MIN_CHUNK_SECONDS:.2f} seconds needed)"
        )
    return torch.stack(styles).mean(dim=0).cpu()


def speaker_embedding(model: XttsModel, audio: torch.Tensor) -> torch.Tensor:
    """`[1, N]` audio at the model rate -> `[1, 512, 1]` L2-normalised speaker embedding."""
    encoder = _present(model.hifigan_decoder.speaker_encoder, "speaker encoder")
    audio16k = resample(audio, int(model.config.audio.sample_rate), encoder.sample_rate)
    p = _param_of(encoder)
    emb = encoder.embed(audio16k.to(device=p.device, dtype=p.dtype))  # [1, 512]
    return emb.float().cpu().unsqueeze(-1)


def _load_cloning_modules(model: XttsModel) -> None:
    """An `XttsModel` loaded from a cache reads its cloning modules (conditioning encoder,
    perceiver, speaker encoder) on the first clone; a model that simply holds them, as the
    voice tests' stand-ins do, has nothing to load."""
    if getattr(model, "cloning_source", None) is None:
        return
    # Imported here: the loader imports this module (studio speakers).
    from lowvox.engines.xtts.loader import ensure_cloning_modules

    ensure_cloning_modules(model)


def _is_single_reference(x: RefInput | Iterable[RefInput]) -> TypeIs[RefInput]:
    if isinstance(x, str | os.PathLike | bytes | bytearray | memoryview | Audio):
        return True
    if isinstance(x, np.ndarray | torch.Tensor):
        return True
    # (samples, sample_rate); a tuple of paths is a list of references
    return (
        isinstance(x, tuple)
        and len(x) == 2
        and isinstance(x[0], np.ndarray | torch.Tensor)
        and isinstance(x[1], int | np.integer)
    )


def _decode(ref: _Reference, rate: int, max_ref_length: int) -> torch.Tensor:
    source = io.BytesIO(ref.data) if isinstance(ref.data, bytes) else ref.data
    max_seconds = max_ref_length if max_ref_length > 0 else None
    audio = load_audio(source, rate, max_seconds=max_seconds, name=ref.name)  # [1, N], clipped
    if audio.shape[-1] == 0:
        raise InvalidRequest("reference audio is empty")
    return audio


def clone_voice(
    model: XttsModel,
    audio_paths_or_arrays: RefInput | Iterable[RefInput],
    *,
    gpt_cond_len: int,
    gpt_cond_chunk_len: int,
    max_ref_length: int,
    sound_norm_refs: bool = False,
    cache: VoiceCache | None = None,
) -> Voice:
    """Clone a voice from one or more reference clips (paths, bytes, or arrays).

    Arrays may be given as `(samples, sample_rate)` or `Audio`; a bare array is taken to be
    at the model's rate. Each reference contributes its own speaker embedding (averaged);
    the GPT latents come from the references concatenated. The result is on the CPU in
    float32. With a `cache`, a voice already cloned from the same audio, settings and model
    is read back instead of recomputed.
    """
    refs_in = (
        [audio_paths_or_arrays]
        if _is_single_reference(audio_paths_or_arrays)
        else list(audio_paths_or_arrays)
    )
    if not refs_in:
        raise InvalidRequest("no reference audio given")
    lengths = {
        "gpt_cond_len": gpt_cond_len,
        "gpt_cond_chunk_len": gpt_cond_chunk_len,
        "max_ref_length": max_ref_length,
    }
    for name, value in lengths.items():
        # Whole seconds, as the reference slices them: 2.7 is not silently 2, NaN not a
        # ValueError from int().
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidRequest(f"{name} must be a whole number of seconds, got {value!r}", name)
    rate = int(model.config.audio.sample_rate)
    refs = [_as_reference(r, rate) for r in refs_in]
    settings = CloneSettings(
        gpt_cond_len=int(gpt_cond_len),
        gpt_cond_chunk_len=int(gpt_cond_chunk_len),
        max_ref_length=int(max_ref_length),
        sound_norm_refs=bool(sound_norm_refs),
        sample_rate=rate,
    )
    key = None
    if cache is not None:
        key = VoiceCache.key([r.digest for r in refs], settings, str(model.fingerprint))
        cached = cache.get(key)
        if cached is not None:
            logger.debug("voice cache hit %s", key[:12])
            return cached

    _load_cloning_modules(model)
    with torch.inference_mode():
        audios, embeddings = [], []
        for number, ref in enumerate(refs, 1):
            audio = _decode(ref, rate, settings.max_ref_length)
            if audio.shape[-1] < rate * MIN_CHUNK_SECONDS:
                # Before the speaker encoder, whose STFT cannot take a few samples.
                which = f" {number} of {len(refs)}" if len(refs) > 1 else ""
                raise InvalidRequest(
                    f"reference audio{which} is too short ({audio.shape[-1] / rate:.2f} s; "
                    f"at least {MIN_CHUNK_SECONDS:.2f} seconds needed)"
                )
            if settings.sound_norm_refs:
                peak = audio.abs().max()
                if peak <= 0:
                    raise InvalidRequest("reference audio is silent")
                audio = audio / peak * NORM_PEAK
            embeddings.append(speaker_embedding(model, audio))
            audios.append(audio)
        latent = gpt_cond_latent(
            model,
            torch.cat(audios, dim=-1),
            gpt_cond_len=settings.gpt_cond_len,
            gpt_cond_chunk_len=settings.gpt_cond_chunk_len,
        )
        voice = Voice(latent, torch.stack(embeddings).mean(dim=0))

    if cache is not None and key is not None:
        cache.put(key, voice)
    return voice


# ---------------------------------------------------------------------------------------------
# Studio speakers


class SpeakerFileError(LowvoxError):
    """speakers_xtts.pth is missing, unsafe or not in the expected layout."""


def load_studio_speakers(path: str | os.PathLike[str]) -> dict[str, Voice]:
    """Read the released `speakers_xtts.pth` ({name: {gpt_cond_latent, speaker_embedding}})."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise SpeakerFileError(f"speaker file not found: {path}") from e
    except pickle.UnpicklingError as e:
        # Not torch's message, which suggests `weights_only=False`: running the file's code.
        raise SpeakerFileError(
            f"{path} is not a file of tensors alone (damaged, or it holds code); "
            "refusing to load it"
        ) from e
    except Exception as e:  # torch raises several unrelated types for damaged files
        raise SpeakerFileError(f"cannot read speaker file {path}: {e!r}") from e
    if not isinstance(raw, dict):
        raise SpeakerFileError(f"{path}: expected a mapping of speaker names")
    voices: dict[str, Voice] = {}
    for name, entry in raw.items():
        try:
            latent, emb = entry["gpt_cond_latent"], entry["speaker_embedding"]
            if not (isinstance(latent, torch.Tensor) and isinstance(emb, torch.Tensor)):
                raise TypeError("not tensors")
        except (TypeError, KeyError) as e:
            raise SpeakerFileError(f"{path}: speaker {name!r} is malformed ({e})") from e
        try:
            latent = latent.float().reshape(1, *latent.shape[-2:])  # [1, 32, D]
            emb = emb.float().reshape(1, -1, 1)  # [1, 512, 1]
        except RuntimeError as e:  # more than one speaker's worth of values, or none
            raise SpeakerFileError(
                f"{path}: speaker {name!r} has tensors of shapes {tuple(latent.shape)} and "
                f"{tuple(emb.shape)}, not one voice's [1, 32, D] and [1, 512, 1]"
            ) from e
        voices[str(name)] = Voice(latent, emb, name=str(name))
    return voices
