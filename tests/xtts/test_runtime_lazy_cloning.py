"""The voice-cloning modules (conditioning encoder, perceiver, speaker encoder) of a model
loaded from a lowvox cache: left out at load, read from the same cache on the first clone,
exactly as an eager load would have them, once, and kept.

The weights are data read from files: exact. The voices they clone are computed by another
model instance than the eager one's: FP32_REORDER (tests/tolerance.py)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import lowvox.engines.xtts.loader as loader_module
from lowvox.engines.xtts.checkpoint import read_state_dict
from lowvox.engines.xtts.config import XttsConfig
from lowvox.engines.xtts.loader import ensure_cloning_modules, from_state_dict, load_model
from lowvox.engines.xtts.model import CLONING_MODULES, XttsModel
from lowvox.engines.xtts.voices import VoiceCache
from lowvox.engines.xtts.voices import clone_voice as clone_from_references
from lowvox.errors import LowvoxError
from lowvox.runtime.qcache import CacheError, read_quantized, write_quantized
from lowvox.runtime.residency import Residency
from tests.tolerance import FP32_REORDER
from tests.xtts.speak import say, say_stream

PREFIXES = tuple(f"{name}." for name in CLONING_MODULES)
SPEAK = dict(voice="Test Speaker", max_new_tokens=6, do_sample=False, split_sentences=False, seed=0)
# The loads that leave the cloning modules out: from the int8 and the CPU bf16 caches.
CACHED = ["int8", "bf16"]


def speechlike(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 100 + 60 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return (0.2 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for seed in (1, 2):
        path = folder / f"ref{seed}.wav"
        sf.write(path, speechlike(5.0, 22050, seed), 22050, subtype="PCM_16")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def caches(random_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the random bundle's int8 and bf16 caches, written once."""
    folder = tmp_path_factory.mktemp("lazy-cache")
    for precision in CACHED:
        load_model(random_bundle.path, precision=precision, cache_dir=folder)
    return folder


@pytest.fixture(scope="module")
def eager(random_bundle) -> XttsModel:
    """Every module loaded straight from model.pth, no cache involved."""
    config = XttsConfig.from_file(random_bundle.path / "config.json")
    return from_state_dict(config, read_state_dict(random_bundle.path / "model.pth"))


@pytest.fixture(scope="module")
def eager_voices(eager, clips) -> list:
    """The voice of each clip, cloned by the eager model."""
    return [eager.clone_voice([clip]) for clip in clips]


def load_cached(random_bundle, caches: Path, tmp_path: Path, precision: str) -> XttsModel:
    """A load from a private copy of the caches (a test may damage its copy)."""
    folder = tmp_path / "cache"
    shutil.copytree(caches, folder)
    return load_model(random_bundle.path, precision=precision, cache_dir=folder)


def cache_file(model: XttsModel) -> Path:
    assert model.cloning_source is not None
    return model.cloning_source.path


def cloning_modules(model: XttsModel) -> list[torch.nn.Module | None]:
    parts = (name.rpartition(".") for name in CLONING_MODULES)
    return [getattr(model.get_submodule(parent), child) for parent, _, child in parts]


def assert_same_voice(voice, want) -> None:
    """A voice cloned by another model instance than `want`'s, from the same audio."""
    FP32_REORDER.check(voice.gpt_cond_latent, want.gpt_cond_latent, "gpt_cond_latent")
    FP32_REORDER.check(voice.speaker_embedding, want.speaker_embedding, "speaker_embedding")


def count_reads(monkeypatch) -> list[int]:
    calls = [0]
    real = loader_module.read_tensors

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module, "read_tensors", counting)
    return calls


@pytest.mark.parametrize("precision", CACHED)
@pytest.mark.slow
def test_a_cached_load_leaves_the_cloning_modules_out_and_still_speaks(
    random_bundle, caches, tmp_path, monkeypatch, precision
) -> None:
    model = load_cached(random_bundle, caches, tmp_path, precision)
    reads = count_reads(monkeypatch)
    assert cloning_modules(model) == [None, None, None]
    assert not [k for k in model.state_dict() if k.startswith(PREFIXES)]
    # Speaking with a studio speaker and with given latents never needs them.
    out = say(model, "Hello there.", language="en", **SPEAK)
    assert out.wav.size > 0 and np.isfinite(out.wav).all()
    voice = model.speakers["Test Speaker"]
    chunks = list(say_stream(model, "Hello there.", language="en", **{**SPEAK, "voice": voice}))
    assert chunks
    assert reads[0] == 0 and cloning_modules(model) == [None, None, None]
    # What they weigh is really gone: the model holds fewer bytes than the eager one.
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ensure_cloning_modules(model)
    with_them = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    expected = sum(
        t.numel() * t.element_size()
        for k, t in random_bundle.state.items()
        if k.startswith(PREFIXES)
    )
    assert with_them - held == expected


@pytest.mark.parametrize("precision", CACHED)
@pytest.mark.slow
def test_first_clone_loads_them_once_exactly_as_an_eager_load(
    random_bundle, caches, eager, eager_voices, clips, tmp_path, monkeypatch, precision
) -> None:
    model = load_cached(random_bundle, caches, tmp_path, precision)
    reads = count_reads(monkeypatch)
    voice = model.clone_voice([clips[0]])
    assert reads[0] == 1 and model.cloning_source is None
    assert_same_voice(voice, eager_voices[0])
    for name in CLONING_MODULES:
        got, ref = model.get_submodule(name).state_dict(), eager.get_submodule(name).state_dict()
        assert list(got) == list(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key]), f"{name}.{key}"
        assert not any(p.requires_grad for p in model.get_submodule(name).parameters())
        assert not model.get_submodule(name).training
    # A second clone (other audio, nothing cached) uses the modules it has.
    other = model.clone_voice([clips[1]])
    assert reads[0] == 1
    assert_same_voice(other, eager_voices[1])


@pytest.mark.slow
def test_a_voice_cache_hit_never_loads_them(random_bundle, caches, clips, tmp_path) -> None:
    first = load_cached(random_bundle, caches, tmp_path / "a", "int8")
    first.voice_cache = VoiceCache(tmp_path / "voices")
    cloned = first.clone_voice([clips[0]])
    again = load_cached(random_bundle, caches, tmp_path / "b", "int8")
    again.voice_cache = VoiceCache(tmp_path / "voices")
    hit = again.clone_voice([clips[0]])
    assert torch.equal(hit.gpt_cond_latent, cloned.gpt_cond_latent)  # read from the file
    assert cloning_modules(again) == [None, None, None]


# Damage as a new file in the old one's place, the way any rewrite of a cache happens.
def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name("damaged.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _truncate(path: Path) -> None:
    _replace(path, path.read_bytes()[:-1000])


def _garbage(path: Path) -> None:
    _replace(path, b"\xff" * 4096)


def _rebuilt_from_another_source(path: Path) -> None:
    cached = read_quantized(path, {})
    assert cached is not None
    write_quantized(path, cached.state_dict, {**cached.metadata, "sha256": "another"})


@pytest.mark.parametrize(
    "damage",
    [Path.unlink, _truncate, _garbage, _rebuilt_from_another_source],
    ids=["deleted", "truncated", "garbage", "stale"],
)
@pytest.mark.parametrize("precision", CACHED)
@pytest.mark.slow
def test_a_cache_lost_before_the_first_clone_is_a_clear_error(
    random_bundle, caches, eager_voices, clips, tmp_path, precision, damage
) -> None:
    model = load_cached(random_bundle, caches, tmp_path, precision)
    path = cache_file(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = path.with_name("kept")
    shutil.copy(path, kept)
    damage(path)
    with pytest.raises(CacheError, match="reload the model|holds no") as caught:
        model.clone_voice([clips[0]])
    assert isinstance(caught.value, LowvoxError) and str(path) in str(caught.value)
    # Nothing half-loaded, nothing changed: it still speaks exactly as before.
    assert cloning_modules(model) == [None, None, None]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # untouched data
    spoken = say(model, "Hello there.", language="en", **SPEAK)
    assert spoken.wav.size > 0 and np.isfinite(spoken.wav).all()
    # Once the file is back, cloning works (the failure did not stick).
    shutil.copy(kept, path)
    voice = model.clone_voice([clips[0]])
    assert_same_voice(voice, eager_voices[0])


@pytest.mark.slow
def test_concurrent_first_clones_load_once(
    random_bundle, caches, eager_voices, clips, tmp_path, monkeypatch
) -> None:
    model = load_cached(random_bundle, caches, tmp_path, "int8")
    calls = [0]
    real = loader_module.read_tensors
    both_waiting = threading.Barrier(2)

    def slow_read(*args, **kwargs):
        calls[0] += 1
        # Time for the other thread to get past its own check (and wait on the lock).
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module, "read_tensors", slow_read)
    voices: dict[int, object] = {}
    errors: list[BaseException] = []

    def clone(i: int) -> None:
        try:
            both_waiting.wait()
            # The voice module's function: no model-wide lock around it, as a server
            # thread calling it directly would have.
            voices[i] = clone_from_references(
                model, clips[0], gpt_cond_len=30, gpt_cond_chunk_len=4, max_ref_length=30
            )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=clone, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls[0] == 1
    want = eager_voices[0]
    assert len(voices) == 2
    for v in voices.values():
        assert_same_voice(v, want)


@pytest.mark.slow
def test_lazily_loaded_modules_go_where_the_model_is_and_move_with_it(
    random_bundle, caches, tmp_path
) -> None:
    model = load_cached(random_bundle, caches, tmp_path / "a", "int8")
    model.to("meta")  # stands in for a GPU: a device other than the CPU the cache is read to
    ensure_cloning_modules(model)
    for name in CLONING_MODULES:
        assert all(p.is_meta for p in model.get_submodule(name).parameters()), name

    loaded = load_cached(random_bundle, caches, tmp_path / "b", "int8")
    ensure_cloning_modules(loaded)
    loaded.to("meta")  # once loaded they are part of the model and move with it
    assert all(t.is_meta for t in loaded.state_dict().values())


@pytest.mark.slow
def test_residency_keeps_lazily_loaded_modules_in_storage(
    random_bundle, caches, clips, eager_voices, tmp_path
) -> None:
    """Low-VRAM residency points the weights at compute copies during a request only; a
    clone inside a request puts the modules where the weights live, not on the GPU."""
    model = load_cached(random_bundle, caches, tmp_path, "int8")
    residency = Residency(model, "cpu", "meta", layers=list(model.gpt.gpt.h))
    with residency.active():
        assert model.device.type == "meta"
        ensure_cloning_modules(model)
    for name in CLONING_MODULES:
        assert all(p.device.type == "cpu" for p in model.get_submodule(name).parameters())
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    voice = model.clone_voice([clips[0]])
    assert_same_voice(voice, eager_voices[0])


def test_inference_mode_callers_get_ordinary_weights(random_bundle, caches, tmp_path) -> None:
    model = load_cached(random_bundle, caches, tmp_path, "int8")
    with torch.inference_mode():
        ensure_cloning_modules(model)
    encoder = model.gpt.conditioning_encoder
    assert encoder is not None
    assert not any(p.is_inference() for p in encoder.parameters())


def test_loads_not_from_a_weight_only_cache_stay_eager(random_bundle, tmp_path, monkeypatch):
    # fp32 through the float cache: its tensors are memory-mapped, and pages never read
    # take no memory, so leaving the modules out would save nothing.
    fp32 = load_model(random_bundle.path, cache_dir=tmp_path)
    assert fp32.cloning_source is None and None not in cloning_modules(fp32)
    # No cache location at all (a read-only model folder, no cache_dir): from model.pth.
    monkeypatch.setattr(loader_module, "default_cache_path", lambda *args: None)
    model = load_model(random_bundle.path, precision="int8")
    assert model.cloning_source is None and None not in cloning_modules(model)
