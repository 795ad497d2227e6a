"""Model download (through a fake hub) and the installed-model listing."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest

from lowvox.engines.xtts import download
from lowvox.engines.xtts.download import (
    LicenseNotAccepted,
    ModelError,
    download_model,
    list_models,
)
from lowvox.errors import LowvoxError


@pytest.fixture
def fake_hub(monkeypatch, random_bundle):
    """A huggingface_hub stand-in serving the random bundle's files; records its calls."""
    calls = []

    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **_):
        calls.append((repo_id, filename, revision))
        dest = Path(local_dir) / filename
        shutil.copy(random_bundle.path / filename, dest)
        return str(dest)

    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = hf_hub_download
    module.constants = types.SimpleNamespace(ENDPOINT="https://hub.invalid")
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    monkeypatch.setattr(download, "_check_network", lambda endpoint: None)
    return calls


def test_licence_must_be_accepted(tmp_path, fake_hub) -> None:
    with pytest.raises(LicenseNotAccepted, match="Coqui Public Model License") as info:
        download_model("xtts-v2", tmp_path)
    assert isinstance(info.value, LowvoxError)
    assert fake_hub == [] and not any(tmp_path.iterdir())


def test_download_installs_and_lists(tmp_path, fake_hub) -> None:
    path = download_model("xtts-v2", tmp_path, revision="v2.0.3", accept_license=True)
    assert path == tmp_path / "xtts-v2"
    assert {c[1] for c in fake_hub} == {
        "config.json",
        "model.pth",
        "vocab.json",
        "speakers_xtts.pth",
    }
    assert {c[0] for c in fake_hub} == {"coqui/XTTS-v2"} and {c[2] for c in fake_hub} == {"v2.0.3"}
    assert not (tmp_path / ".xtts-v2.partial").exists()
    marker = json.loads((path / "lowvox-model.json").read_text())
    assert marker["revision"] == "v2.0.3" and "Coqui" in marker["license"]

    # A fine-tune dropped in by hand, and an incomplete folder.
    shutil.copytree(path, tmp_path / "my-finetune")
    (tmp_path / "my-finetune" / "lowvox-model.json").unlink()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # not a model: ignored
    models = {m.name: m for m in list_models(tmp_path)}
    assert sorted(models) == ["broken", "my-finetune", "xtts-v2"]
    assert models["xtts-v2"].complete and models["xtts-v2"].source == "huggingface:coqui/XTTS-v2"
    assert models["my-finetune"].complete and models["my-finetune"].source == "local"
    assert "en" in models["my-finetune"].languages
    assert not models["broken"].complete and "model.pth" in models["broken"].missing


def test_downloaded_model_loads(tmp_path, fake_hub) -> None:
    from lowvox.engines.xtts.loader import load_model

    path = download_model("xtts-v2", tmp_path, accept_license=True)
    model = load_model(path)
    assert list(model.speakers) == ["Test Speaker"]


def test_hub_failure_is_a_clear_error(tmp_path, monkeypatch, fake_hub) -> None:
    def broken(*args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(sys.modules["huggingface_hub"], "hf_hub_download", broken)
    with pytest.raises(ModelError, match="connection reset"):
        download_model("xtts-v2", tmp_path, accept_license=True)
    assert not (tmp_path / "xtts-v2").exists()


def test_offline_fails_fast(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelError, match="no network connection"):
        download_model("xtts-v2", tmp_path, accept_license=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline"):
        download_model("xtts-v2", tmp_path, accept_license=True)
    assert not (tmp_path / "xtts-v2").exists()


def test_unknown_model(tmp_path) -> None:
    with pytest.raises(ModelError, match="xtts-v2"):
        download_model("xtts-v9", tmp_path, accept_license=True)


def test_list_models_of_a_missing_folder(tmp_path) -> None:
    assert list_models(tmp_path / "none") == []
