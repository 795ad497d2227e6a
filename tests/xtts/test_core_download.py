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


# ---------------------------------------------------------------------------------------------
# The real hub client against a hub served over local HTTP


class _Hub:
    """A local HTTP server answering as the hub's `resolve` URLs do: HEAD with the commit,
    the sha256 ETag of LFS files and the size; GET with Range. `cut`, `flip` and `hold` make
    model.pth's next GET end early, arrive with a byte changed, or wait for an event."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, files: dict[str, bytes]) -> None:
        import http.server
        import threading

        self.files = files
        self.cut = self.flip = 0  # how many GETs of model.pth to spoil
        self.hold: threading.Event | None = None
        self.holding = threading.Event()
        self.gets: list[tuple[str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _start(self, status: int, data: bytes, length: int) -> None:
                import hashlib

                self.send_response(status)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))

            def _name(self) -> str | None:
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                return name if name in hub.files else None

            def do_HEAD(self) -> None:
                name = self._name()
                if name is None:
                    self.send_error(404)
                    return
                self._start(200, hub.files[name], len(hub.files[name]))
                self.end_headers()

            def do_GET(self) -> None:
                name = self._name()
                if name is None:
                    self.send_error(404)
                    return
                data, rng = hub.files[name], self.headers.get("Range")
                hub.gets.append((name, rng))
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self._start(206 if rng else 200, data, len(body))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if name == "model.pth" and hub.hold is not None:
                    hub.holding.set()
                    hub.hold.wait(30)
                if name == "model.pth" and hub.cut:
                    hub.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if name == "model.pth" and hub.flip:
                    hub.flip -= 1
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_hub(monkeypatch):
    from huggingface_hub import constants, hf_hub_download  # noqa: F401 -- loads constants

    files = {
        "config.json": json.dumps({"model_args": {}, "languages": ["en"]}).encode(),
        "model.pth": bytes(range(256)) * 4000,  # LFS-sized in spirit: checked by sha256
        "vocab.json": b'{"model": {"vocab": {}}}',
        "speakers_xtts.pth": b"speakers" * 1000,
    }
    hub = _Hub(files)
    # What HF_ENDPOINT sets when the client is imported.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.close()


def _installed(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / n).is_file() and (folder / n).read_bytes() == d for n, d in files.items())


def test_download_over_http_installs_whole_files(tmp_path, http_hub) -> None:
    path = download_model("xtts-v2", tmp_path, accept_license=True)
    assert _installed(path, http_hub.files)
    assert [m.name for m in list_models(tmp_path)] == ["xtts-v2"]


@pytest.mark.slow
def test_a_cut_connection_is_retried_to_a_whole_file(tmp_path, http_hub) -> None:
    http_hub.cut = 1
    path = download_model("xtts-v2", tmp_path, accept_license=True)
    assert _installed(path, http_hub.files)
    assert [name for name, _ in http_hub.gets].count("model.pth") == 2


def test_a_corrupted_file_is_refused_and_fetched_again(tmp_path, http_hub) -> None:
    http_hub.flip = 1
    with pytest.raises(ModelError, match="model.pth .* corrupted"):
        download_model("xtts-v2", tmp_path, accept_license=True)
    assert not (tmp_path / "xtts-v2").exists() and list_models(tmp_path) == []
    path = download_model("xtts-v2", tmp_path, accept_license=True)  # runs again: good now
    assert _installed(path, http_hub.files)


def test_a_second_download_at_once_is_refused_and_spoils_nothing(tmp_path, http_hub) -> None:
    import threading

    http_hub.hold = threading.Event()
    first: dict = {}

    def run() -> None:
        try:
            first["path"] = download_model("xtts-v2", tmp_path, accept_license=True)
        except Exception as e:  # reported below
            first["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert http_hub.holding.wait(30)  # the first is mid-way through model.pth
        with pytest.raises(ModelError, match="another download of xtts-v2"):
            download_model("xtts-v2", tmp_path, accept_license=True)
    finally:
        http_hub.hold.set()
        thread.join(60)
    assert "error" not in first, first
    assert _installed(first["path"], http_hub.files)


def test_listing_says_what_is_incomplete_and_where_a_model_came_from(
    tmp_path, fake_hub, capsys
) -> None:
    from lowvox.cli import main

    path = download_model("xtts-v2", tmp_path, revision="v2.0.3", accept_license=True)
    (path / "model.lowvox.safetensors").write_bytes(b"x" * 10**6)  # a cache: not the model's
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    models = {m.name: m for m in list_models(tmp_path)}
    assert models["half"].summary() == "incomplete: missing model.pth, vocab.json"
    line = models["xtts-v2"].summary()
    assert line.startswith("huggingface:coqui/XTTS-v2@v2.0.3, 17 languages")
    assert (
        models["xtts-v2"].size_bytes
        < sum((path / f).stat().st_size for f in ("model.pth", "config.json", "vocab.json"))
        + (path / "speakers_xtts.pth").stat().st_size
        + 10_000
    )

    assert main(["models", "list", "--home", str(tmp_path / "home")]) == 0
    home_models = tmp_path / "home" / "models"
    shutil.copytree(tmp_path / "half", home_models / "half")
    capsys.readouterr()
    assert main(["models", "list", "--home", str(tmp_path / "home")]) == 0
    assert "half\t" in (out := capsys.readouterr().out) and "missing model.pth" in out


def test_doctor_says_whether_the_models_can_load(tmp_path, fake_hub) -> None:
    from lowvox.doctor import _models_lines
    from lowvox.settings import Settings

    home = tmp_path / "home"
    download_model("xtts-v2", home / "models", accept_license=True)
    (home / "models" / "xtts-v2" / "vocab.json").unlink()
    lines = _models_lines(Settings(home=home, model_dir=tmp_path / "nowhere"))
    assert f"model dir (setting): {tmp_path / 'nowhere'} (not found)" in lines
    assert any(
        line.startswith("model: xtts-v2 at ") and "incomplete: missing vocab.json" in line
        for line in lines
    ), lines
