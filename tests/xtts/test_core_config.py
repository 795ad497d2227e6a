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
