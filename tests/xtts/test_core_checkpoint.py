"""Checkpoint loading: safe unpickling, key mapping, weight-norm folding, cache, layouts."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lowvox.engines.xtts.checkpoint import (
    CheckpointError,
    check_keys,
    convert_state_dict,
    default_cache_path,
    load_checkpoint,
    load_weights,
    read_state_dict,
)
from lowvox.engines.xtts.config import XttsConfig
from lowvox.engines.xtts.loader import from_state_dict
from lowvox.errors import LowvoxError
from tests.full_disk import files_limited_to

# ---------------------------------------------------------------------------------------------
# The golden checkpoint through the real loader


def test_golden_model_pth_loads_and_maps(golden_dir: Path) -> None:
    raw = load_checkpoint(golden_dir / "model.pth")
    assert raw.config is not None and raw.config["model_args"]["gpt_layers"] == 2
    sd = read_state_dict(golden_dir / "model.pth")
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    assert not any(k.startswith("gpt.text_head.") for k in sd)
    assert not any(".parametrizations." in k for k in sd)
    # A weight-normed upsampler became a plain weight equal to g * v / |v|.
    g = raw.state_dict["hifigan_decoder.waveform_decoder.ups.0.parametrizations.weight.original0"]
    v = raw.state_dict["hifigan_decoder.waveform_decoder.ups.0.parametrizations.weight.original1"]
    expected = g.float() * v.float() / v.float().norm(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(sd["hifigan_decoder.waveform_decoder.ups.0.weight"], expected)


def test_golden_state_dict_matches_model_exactly(golden_dir: Path) -> None:
    config = XttsConfig.from_file(golden_dir / "config.json")
    model = from_state_dict(config, read_state_dict(golden_dir / "model.pth"))
    assert not any(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Unsafe and legacy pickles


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"config": _Exploit(marker), "model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="system") as info:
        load_checkpoint(path)
    assert isinstance(info.value, LowvoxError)
    assert "not a safe XTTS checkpoint" in str(info.value)
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    with path.open("wb") as f:  # a legacy (non-zip) torch file is just a pickle stream
        pickle.dump(_Exploit(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match="not a safe XTTS checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.fixture
def tts_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Stand-ins for coqui's config classes, registered under coqui's module names so that
    pickle records exactly the names a legacy checkpoint holds."""

    @dataclass
    class XttsAudioConfig:
        sample_rate: int = 22050
        output_sample_rate: int = 24000

    @dataclass
    class XttsArgs:
        gpt_layers: int = 2
        gpt_n_model_channels: int = 64

    @dataclass
    class XttsConfig:
        model: str = "xtts"
        temperature: float = 0.65
        model_args: XttsArgs = field(default_factory=XttsArgs)
        audio: XttsAudioConfig = field(default_factory=XttsAudioConfig)
        languages: list = field(default_factory=lambda: ["en", "de"])

    module = types.ModuleType("TTS.tts.configs.xtts_config")
    for cls in (XttsAudioConfig, XttsArgs, XttsConfig):
        cls.__module__ = module.__name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    for name in ("TTS", "TTS.tts", "TTS.tts.configs"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_legacy_config_object_loads_without_tts(tmp_path: Path, tts_module) -> None:
    path = tmp_path / "model.pth"
    state = {"xtts.gpt.mel_head.bias": torch.arange(4, dtype=torch.float16)}
    torch.save({"config": tts_module.XttsConfig(), "model": state}, path)
    data = path.read_bytes()
    assert b"TTS.tts.configs.xtts_config" in data  # really pickled as coqui objects
    for name in [n for n in sys.modules if n == "TTS" or n.startswith("TTS.")]:
        sys.modules.pop(name)  # the loader must not need (or import) them
    ckpt = load_checkpoint(path)
    assert ckpt.config == {
        "model": "xtts",
        "temperature": 0.65,
        "model_args": {"gpt_layers": 2, "gpt_n_model_channels": 64},
        "audio": {"sample_rate": 22050, "output_sample_rate": 24000},
        "languages": ["en", "de"],
    }
    assert torch.equal(convert_state_dict(ckpt.state_dict)["gpt.mel_head.bias"], torch.arange(4.0))


def test_unknown_class_in_config_is_refused(tmp_path: Path, tts_module, monkeypatch) -> None:
    # Same stand-in, but under a module name the loader does not know.
    cls = tts_module.XttsArgs
    cls.__module__ = "TTS.tts.configs.evil"
    monkeypatch.setitem(sys.modules, cls.__module__, types.SimpleNamespace(XttsArgs=cls))
    path = tmp_path / "model.pth"
    torch.save({"config": cls(), "model": {}}, path)
    with pytest.raises(CheckpointError, match="TTS.tts.configs.evil"):
        load_checkpoint(path)


def test_legacy_non_zip_checkpoint_loads(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    state = {"gpt.mel_head.bias": torch.ones(3)}
    torch.save({"config": {"a": 1}, "model": state}, path, _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(path)
    assert ckpt.config == {"a": 1} and torch.equal(
        ckpt.state_dict["gpt.mel_head.bias"], torch.ones(3)
    )


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# Key mapping


def test_prefix_ignored_keys_and_float32() -> None:
    raw = {
        "xtts.gpt.mel_head.weight": torch.ones(3, 2, dtype=torch.float16),
        "xtts.dvae.encoder.weight": torch.ones(1),
        "xtts.torch_mel_spectrogram_dvae.window": torch.ones(1),
        "torch_mel_spectrogram_style_encoder.window": torch.ones(1),
        "gpt.gpt_inference.transformer.h.0.ln_1.weight": torch.ones(1),
        "gpt.gpt.wte.weight": torch.ones(1),
        "gpt.text_head.weight": torch.ones(1),
        "hifigan_decoder.speaker_encoder.bn1.num_batches_tracked": torch.tensor(3),
    }
    out = convert_state_dict(raw)
    assert sorted(out) == [
        "gpt.mel_head.weight",
        "hifigan_decoder.speaker_encoder.bn1.num_batches_tracked",
    ]
    assert out["gpt.mel_head.weight"].dtype == torch.float32
    assert out["hifigan_decoder.speaker_encoder.bn1.num_batches_tracked"].dtype == torch.int64


def test_both_weight_norm_forms_fold_to_the_same_weight() -> None:
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose1d(6, 4, 5)
    new = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5))
    with torch.no_grad():
        new.parametrizations.weight.original0.mul_(1.7)
    legacy = {
        "ups.0.weight_g": new.parametrizations.weight.original0.detach(),
        "ups.0.weight_v": new.parametrizations.weight.original1.detach(),
        "ups.0.bias": conv.bias.detach(),
    }
    current = {f"ups.0.{k}": v for k, v in new.state_dict().items()}
    a, b = convert_state_dict(legacy), convert_state_dict(current)
    assert sorted(a) == sorted(b) == ["ups.0.bias", "ups.0.weight"]
    torch.testing.assert_close(a["ups.0.weight"], b["ups.0.weight"])
    torch.testing.assert_close(a["ups.0.weight"], new.weight.detach())


def test_half_a_weight_norm_pair_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="conv"):
        convert_state_dict({"conv.weight_g": torch.ones(2, 1, 1)})


def test_missing_unexpected_and_misshaped_keys_are_listed(golden_dir: Path) -> None:
    config = XttsConfig.from_file(golden_dir / "config.json")
    sd = read_state_dict(golden_dir / "model.pth")
    del sd["gpt.final_norm.bias"]
    sd["gpt.surprise.weight"] = torch.zeros(1)
    sd["mel_stats"] = torch.zeros(81)
    with pytest.raises(CheckpointError) as info:
        from_state_dict(config, sd)
    message = str(info.value)
    assert "missing keys: gpt.final_norm.bias" in message
    assert "unexpected keys: gpt.surprise.weight" in message
    assert "mel_stats: expected (80,), got (81,)" in message


def test_check_keys_passes_on_a_match() -> None:
    check_keys({"a": (2,)}, {"a": torch.zeros(2)})


# ---------------------------------------------------------------------------------------------
# safetensors cache


@pytest.mark.slow
def test_cache_is_created_reused_and_invalidated(random_bundle, tmp_path: Path) -> None:
    source = tmp_path / "model.pth"
    source.write_bytes((random_bundle.path / "model.pth").read_bytes())
    cache = default_cache_path(source, tmp_path / "cache")
    assert cache is not None and not cache.exists()

    first = load_weights(source, cache)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns

    second = load_weights(source, cache)
    assert cache.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert second.fingerprint == first.fingerprint
    assert sorted(second.state_dict) == sorted(first.state_dict)
    for k, v in first.state_dict.items():
        assert torch.equal(second.state_dict[k], v), k
    assert second.config == first.config

    # Replace the source with different weights: the cache must be rebuilt.
    ckpt = torch.load(source, weights_only=True)
    ckpt["model"]["xtts.mel_stats"] = ckpt["model"]["xtts.mel_stats"] * 2
    torch.save(ckpt, source)
    third = load_weights(source, cache)
    assert third.fingerprint != first.fingerprint
    torch.testing.assert_close(third.state_dict["mel_stats"], first.state_dict["mel_stats"] * 2)
    fourth = load_weights(source, cache)
    assert torch.equal(fourth.state_dict["mel_stats"], third.state_dict["mel_stats"])


def test_corrupt_cache_is_rebuilt(random_bundle, tmp_path: Path) -> None:
    cache = tmp_path / "weights.safetensors"
    cache.write_bytes(b"garbage")
    weights = load_weights(random_bundle.path / "model.pth", cache)
    assert "gpt.mel_head.weight" in weights.state_dict
    assert load_weights(random_bundle.path / "model.pth", cache).fingerprint == weights.fingerprint


def test_a_full_disk_while_writing_the_cache_still_loads(random_bundle, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "weights.safetensors"
    cache.parent.mkdir()
    with files_limited_to(4096):
        weights = load_weights(random_bundle.path / "model.pth", cache)
    assert "gpt.mel_head.weight" in weights.state_dict
    assert not cache.exists()


def test_cache_goes_beside_a_writable_checkpoint_only(tmp_path: Path, golden_dir: Path) -> None:
    assert default_cache_path(tmp_path / "model.pth", None) == tmp_path / "model.lowvox.safetensors"
    if not os.access(golden_dir, os.W_OK):
        assert default_cache_path(golden_dir / "model.pth", None) is None


# ---------------------------------------------------------------------------------------------
# The full-size layout, on the meta device


def full_size_config(golden_dir: Path) -> XttsConfig:
    """The golden config with the released model's sizes (30 layers, 1024 wide, 16 heads,
    6681 text tokens; the rest of model_args is the same in both)."""
    raw = json.loads((golden_dir / "config.json").read_text(encoding="utf-8"))
    raw["model_args"].update(
        gpt_layers=30,
        gpt_n_model_channels=1024,
        gpt_n_heads=16,
        gpt_number_text_tokens=6681,
        gpt_start_text_token=261,
        decoder_input_dim=1024,
    )
    return XttsConfig.from_dict(raw)


def test_full_size_layout_builds_on_meta(golden_dir: Path) -> None:
    layout = json.loads((golden_dir / "full_size_layout.json").read_text(encoding="utf-8"))
    assert len(layout) > 900
    dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
    stored = {
        k: torch.empty(v["shape"], dtype=dtypes.get(v["dtype"], torch.float32), device="meta")
        for k, v in layout.items()
    }
    mapped = convert_state_dict(stored)
    # Every stored key is accounted for: mapped, or one of the documented ignored keys.
    dropped = set(layout) - set(mapped)
    assert all(
        k.startswith("gpt.text_head.") or ".parametrizations.weight." in k for k in dropped
    ), sorted(dropped)
    model = from_state_dict(full_size_config(golden_dir), mapped, "full_size_layout")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in mapped.items()}
    assert len(model.gpt.gpt.h) == 30
    n_params = sum(p.numel() for p in model.parameters())
    assert 400e6 < n_params < 600e6  # the released model has ~470M parameters
