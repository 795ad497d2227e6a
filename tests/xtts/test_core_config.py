"""config.json reading: every size from the file, clear errors for bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowvox.engines.xtts.config import ConfigError, XttsConfig
from lowvox.engines.xtts.loader import load_model


def test_golden_config(golden_dir: Path) -> None:
    c = XttsConfig.from_file(golden_dir / "config.json")  # holds `Infinity` values
    a = c.model_args
    assert (a.gpt_layers, a.gpt_n_model_channels, a.gpt_n_heads) == (2, 256, 4)
    assert a.mel_positions == 608 and a.text_positions == 404  # the checkpoint's table sizes
    assert a.max_generated_tokens == 602
    assert c.sampling.repetition_penalty == 5.0 and c.sampling.top_k == 50
    assert c.conditioning.gpt_cond_chunk_len == 4
    assert c.audio.output_sample_rate == 24000
    assert len(c.languages) == 17


def test_missing_required_fields_are_listed(golden_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((golden_dir / "config.json").read_text())
    del raw["model_args"]["gpt_layers"]
    del raw["model_args"]["gpt_n_heads"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="gpt_layers, gpt_n_heads"):
        XttsConfig.from_file(path)


@pytest.mark.parametrize(
    "field, value",
    [("gpt_layers", "thirty"), ("gpt_layers", 2.5), ("gpt_use_perceiver_resampler", "yes")],
)
def test_wrong_types_are_errors(golden_dir: Path, field: str, value) -> None:
    raw = json.loads((golden_dir / "config.json").read_text())
    raw["model_args"][field] = value
    with pytest.raises(ConfigError, match=field):
        XttsConfig.from_dict(raw)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        XttsConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        XttsConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model_args"):
        XttsConfig.from_file(tmp_path / "config.json")


@pytest.mark.slow
def test_config_from_the_checkpoint_when_config_json_is_absent(random_bundle, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(random_bundle.path, folder)
    (folder / "config.json").unlink()
    model = load_model(folder)
    assert model.config.model_args.gpt_layers == 3
    assert model.config.sampling.temperature == 0.6


def _edited(golden_dir: Path, edit) -> dict:
    raw = json.loads((golden_dir / "config.json").read_text())
    edit(raw)
    return raw


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model_args"].update(gpt_n_heads=0), "gpt_n_heads must be positive"),
        (lambda c: c["model_args"].update(gpt_n_heads=3), "does not split into gpt_n_heads"),
        (lambda c: c["model_args"].update(gpt_layers=-1), "gpt_layers must be positive"),
        (lambda c: c["model_args"].update(output_hop_length=0), "output_hop_length"),
        (lambda c: c["model_args"].update(gpt_code_stride_len=0), "gpt_code_stride_len"),
        (lambda c: c["model_args"].update(gpt_stop_audio_token=1026), "gpt_stop_audio_token"),
        (lambda c: c["model_args"].update(gpt_start_audio_token=-1), "gpt_start_audio_token"),
        (lambda c: c["audio"].update(sample_rate=0), "audio.sample_rate must be positive"),
        (lambda c: c["audio"].update(output_sample_rate=-24000), "audio.output_sample_rate"),
        (lambda c: c.update(audio=[24000]), "audio must be an object"),
        (lambda c: c.update(languages="en"), "languages must be a list"),
        (lambda c: c.update(languages=["en", 3]), "languages must be a list"),
        (lambda c: c.update(temperature=-1), "config.temperature"),
        (lambda c: c.update(top_p=1.5), "config.top_p"),
        (lambda c: c.update(top_k=-2), "config.top_k"),
        (lambda c: c.update(repetition_penalty=0), "config.repetition_penalty"),
        (lambda c: c.update(gpt_cond_chunk_len=0), "gpt_cond_chunk_len must be positive"),
    ],
)
def test_values_no_model_can_have_are_config_errors(golden_dir: Path, edit, message) -> None:
    """Right type, impossible value: a ConfigError naming the field, not a division by zero
    at load, a language list of single letters, or a 4xx on every request later."""
    with pytest.raises(ConfigError, match=message):
        XttsConfig.from_dict(_edited(golden_dir, edit))


def test_neutral_and_legacy_values_stay_accepted(golden_dir: Path) -> None:
    # top_k 0 switches top-k off; gpt_cond_len 0 uses all the audio; a stop id of 0 is
    # the released vocabulary's [STOP].
    raw = _edited(golden_dir, lambda c: c.update(top_k=0, top_p=1.0, gpt_cond_len=0))
    c = XttsConfig.from_dict(raw)
    assert c.sampling.top_k == 0 and c.conditioning.gpt_cond_len == 0
    assert c.model_args.gpt_stop_text_token == 0


def test_a_bad_config_makes_the_engine_unavailable(golden_dir: Path, tmp_path: Path) -> None:
    from lowvox.engines.xtts.engine import XttsEngine
    from lowvox.errors import EngineUnavailable

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.pth", "vocab.json"):
        (folder / name).symlink_to(golden_dir / name)
    raw = _edited(golden_dir, lambda c: c["model_args"].update(gpt_n_heads=0))
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(EngineUnavailable, match="gpt_n_heads"):
        XttsEngine(folder, device="cpu")
