"""Installing and listing XTTS models in the models folder.

`download_model` fetches a released model through `huggingface_hub`, only after the user has
accepted the model's licence, into `<models>/<name>/` (files land in a temporary folder and
are moved in place at the end, so an interrupted download never looks installed). Files the
hub publishes a sha256 for (its large, LFS-stored files: model.pth, speakers_xtts.pth) are
checked against it. One download of a model runs at a time: a second is refused while the
first holds the folder's lock.
`list_models` shows every model folder, including fine-tunes dropped in by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lowvox.errors import LowvoxError
from lowvox.files import write_atomic

log = logging.getLogger(__name__)

MARKER = "lowvox-model.json"  # written by download_model: where the files came from
REQUIRED_FILES = ("config.json", "model.pth", "vocab.json")
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelSource:
    repo_id: str
    files: tuple[str, ...]
    license_name: str
    license_url: str
    default_revision: str = "main"


KNOWN_MODELS: dict[str, ModelSource] = {
    "xtts-v2": ModelSource(
        repo_id="coqui/XTTS-v2",
        files=("config.json", "model.pth", "vocab.json", "speakers_xtts.pth"),
        license_name="Coqui Public Model License 1.0.0 (non-commercial use only)",
        license_url="https://coqui.ai/cpml",
    ),
}


class ModelError(LowvoxError):
    """A model cannot be downloaded or read."""


class LicenseNotAccepted(ModelError):
    status_code = 403


@dataclass(frozen=True)
class InstalledModel:
    """A folder in the models directory that holds (or should hold) an XTTS model."""

    name: str
    path: Path
    complete: bool
    missing: tuple[str, ...] = ()
    size_bytes: int = 0
    languages: tuple[str, ...] = ()
    source: str = "local"  # "huggingface:<repo>" for downloaded models
    revision: str | None = None
    license_name: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for `lowvox models list` and `lowvox doctor`: where the model came from,
        or what keeps it from loading."""
        if not self.complete:
            why = [f"missing {', '.join(self.missing)}"] if self.missing else []
            if "error" in self.details:
                why.append(str(self.details["error"]))
            return "incomplete: " + "; ".join(why)
        origin = self.source + (f"@{self.revision}" if self.revision else "")
        return f"{origin}, {len(self.languages)} languages, {self.size_bytes / 1e9:.2f} GB"


def licence_notice(name: str) -> str:
    source = _source(name)
    return (
        f"{name} is distributed under the {source.license_name} ({source.license_url}). "
        "Accept it with `--accept-license` or the setting `accept_model_license = true` "
        "(LOWVOX_ACCEPT_MODEL_LICENSE=1)."
    )


def _source(name: str) -> ModelSource:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r} (downloadable: {', '.join(KNOWN_MODELS)})"
        ) from None


def _check_network(endpoint: str) -> None:
    """Fail in seconds, with a clear message, when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelError("cannot download: HF_HUB_OFFLINE is set (offline mode)")
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ModelError(
            f"cannot download: no network connection to {endpoint} ({e}). "
            "Connect to the internet, or copy a model folder into the models directory."
        ) from e


def download_model(
    name: str,
    models_dir: str | os.PathLike[str],
    revision: str | None = None,
    accept_license: bool = False,
) -> Path:
    """Download model `name` into `<models_dir>/<name>` and return that folder."""
    source = _source(name)
    if not accept_license:
        raise LicenseNotAccepted(
            f"the licence of {name} has not been accepted. " + licence_notice(name)
        )
    try:
        import huggingface_hub
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ModelError("downloading models needs the huggingface_hub package") from e

    _check_network(huggingface_hub.constants.ENDPOINT)
    models_dir = Path(models_dir)
    target = models_dir / name
    partial = models_dir / f".{name}.partial"
    rev = revision or source.default_revision
    with _download_lock(models_dir, name):
        partial.mkdir(parents=True, exist_ok=True)
        for filename in source.files:
            log.info("downloading %s/%s (%s)", source.repo_id, filename, rev)
            try:
                local = hf_hub_download(source.repo_id, filename, revision=rev, local_dir=partial)
                _verify(source.repo_id, filename, rev, Path(local))
            except ModelError:
                raise
            except Exception as e:  # the hub client raises many unrelated types (HTTP, OS, ...)
                raise ModelError(
                    f"downloading {source.repo_id}/{filename} ({rev}) failed: {e}"
                ) from e
        marker = {
            "name": name,
            "source": f"huggingface:{source.repo_id}",
            "revision": rev,
            "files": list(source.files),
            "license": source.license_name,
            "license_url": source.license_url,
            "license_accepted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            write_atomic(partial / MARKER, json.dumps(marker, indent=2).encode(), fsync=False)
            target.mkdir(parents=True, exist_ok=True)
            for filename in [*source.files, MARKER]:
                os.replace(partial / filename, target / filename)
        except OSError as e:
            raise ModelError(f"cannot install {name} in {target}: {e}") from e
        shutil.rmtree(partial, ignore_errors=True)
    log.info("installed %s in %s", name, target)
    return target


@contextlib.contextmanager
def _download_lock(models_dir: Path, name: str) -> Iterator[None]:
    """Held while `name` downloads into `models_dir`: a second download (another process or
    thread) would share the temporary folder and move or delete the first one's files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(models_dir / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ModelError(f"cannot write to the models folder {models_dir}: {e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelError(
                f"another download of {name} into {models_dir} is running; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _verify(repo_id: str, filename: str, revision: str, path: Path) -> None:
    """Check a downloaded file against the sha256 the hub publishes for it (the ETag of an
    LFS-stored file). A mismatch removes the file, so that running again downloads it anew;
    files without a published sha256 (small git-stored ones) are left to the size check
    the hub client makes itself."""
    from lowvox.engines.xtts.checkpoint import file_sha256

    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
    except ImportError:  # a client (or stand-in) without file metadata: nothing to check
        return
    meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    expected = (meta.etag or "").strip('"').lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        return
    found = file_sha256(path)
    if found != expected:
        path.unlink(missing_ok=True)
        raise ModelError(
            f"{repo_id}/{filename} ({revision}) arrived corrupted: its sha256 is {found}, the "
            f"hub's is {expected}. The file was removed; run the download again."
        )


def list_models(models_dir: str | os.PathLike[str]) -> list[InstalledModel]:
    """Every model folder under `models_dir`, complete or not, sorted by name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    found = []
    for entry in sorted(models_dir.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        has_any = any((entry / f).is_file() for f in (*REQUIRED_FILES, MARKER))
        if not has_any:
            continue
        found.append(describe_model(entry))
    return found


def describe_model(folder: Path) -> InstalledModel:
    """What `folder` holds: complete or not, its source, languages and size."""
    missing = tuple(f for f in REQUIRED_FILES if not (folder / f).is_file())
    # The model's own files: not the weight caches lowvox writes beside model.pth.
    size = sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(".lowvox.safetensors") and p.name[:1] != "."
    )
    languages: tuple[str, ...] = ()
    details: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            languages = tuple(config.get("languages") or ())
            args = config.get("model_args") or {}
            details = {k: args.get(k) for k in ("gpt_layers", "gpt_n_model_channels")}
        except (OSError, ValueError, AttributeError) as e:
            details = {"error": f"unreadable config.json: {e}"}
    marker: dict[str, Any] = {}
    if (folder / MARKER).is_file():
        try:
            marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = {}
    return InstalledModel(
        name=folder.name,
        path=folder,
        complete=not missing and "error" not in details,
        missing=missing,
        size_bytes=size,
        languages=languages,
        source=str(marker.get("source", "local")),
        revision=marker.get("revision"),
        license_name=marker.get("license"),
        details=details,
    )
