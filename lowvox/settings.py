"""All of lowvox's settings in one object.

Precedence, highest first: explicit values (CLI flags), `LOWVOX_*` environment variables,
the TOML config file (`--config`, or `LOWVOX_CONFIG`), then the defaults below.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lowvox.audio.formats import get_format
from lowvox.errors import LowvoxError, UnsupportedFormat


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lowvox"


class Settings(BaseSettings):
    """The effective configuration of a lowvox process."""

    model_config = SettingsConfigDict(env_prefix="LOWVOX_", extra="forbid", frozen=True)

    # Network
    host: str = "127.0.0.1"
    port: int = Field(7851, ge=1, le=65535)
    api_key: str | None = None
    # Web pages (origins, e.g. "http://localhost:8000" for SillyTavern) allowed to call the
    # API from a browser; none by default. "*" allows every page and needs api_key.
    cors_origins: Annotated[list[str], NoDecode] = []
    public_url: str | None = None  # makes returned audio URLs absolute when set
    # Home Assistant's Wyoming protocol, on `host` like HTTP (it has no authentication).
    wyoming: bool = False
    wyoming_port: int = Field(10200, ge=1, le=65535)
    wyoming_zeroconf: bool = False  # announce it over mDNS (needs lowvox[zeroconf])

    # Data folders; each defaults to a folder under `home`.
    home: Path = Field(default_factory=_default_home)
    voices_dir: Path | None = None
    outputs_dir: Path | None = None
    models_dir: Path | None = None
    cache_dir: Path | None = None

    # Defaults for requests
    engine: str = "espeak"
    voice: str | None = None
    language: str = "en"
    audio_format: str = "wav"
    # OpenAI voice names (alloy, nova, ...) -> lowvox voices; unmapped ones use the default.
    openai_voice_map: dict[str, str] = {}

    # XTTS
    model_dir: Path | None = None
    model_name: str = "xtts-v2"
    accept_model_license: bool = False

    # Runtime
    device: str = "auto"
    precision: str = "auto"
    residency: str = "auto"
    # The XTTS vocoder: auto picks int8 convolutions (every stage's resblocks; lowvox's C
    # kernel) on CPUs with AVX-512 VNNI but no AMX when the GPT runs in int8, bf16 on CPUs
    # with native bf16 when the GPT runs in int8 or bf16 (~4x fp32), else fp32. Both keep
    # >= 30 dB SNR against fp32.
    vocoder_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    threads: int | None = Field(None, ge=1)
    keep_alive: float = Field(0, ge=0)  # seconds idle before unloading; 0 keeps it loaded
    # Requests decoded together (continuous batching), and the KV-cache memory they may
    # reserve (None: half the memory free when the model loads). Decoding is memory-bound,
    # so rows share each step's weight reads: 2-core AMD EPYC, full-size int8, one process,
    # a step of 1 / 8 / 12 / 16 rows took 15.7 / 25.8 / 32.3 / 42.3 ms (2.6 ms a row at 16).
    # Long-form jobs fill the rows listeners leave free, and wait while a listener is short
    # of audio (`pipeline.LISTENER_SLACK_S`), so they never slow a stream.
    max_batch_size: int = Field(16, ge=1, le=64)
    kv_cache_mb: int | None = Field(None, ge=1)

    # Limits
    max_text_chars: int = Field(20_000, ge=1)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_queue: int = Field(32, ge=1)
    outputs_max_age_hours: float = Field(24 * 7, ge=0)
    outputs_max_bytes: int = Field(2 * 1024**3, ge=0)

    # Long-form jobs (books): the largest input file and text, the quality retakes of a
    # flagged sentence, and where sentences are spoken (this process, or a Ray cluster).
    max_job_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_job_chars: int = Field(5_000_000, ge=1)
    # Jobs the server keeps, whatever their state (0: no limit): one more is refused (413)
    # until finished ones are deleted. `lowvox book`'s own jobs are not counted.
    max_jobs: int = Field(200, ge=0)
    job_retakes: int = Field(2, ge=0, le=10)
    # A speech recognition check of every take (faster-whisper model name or folder, e.g.
    # "tiny"; needs lowvox[asr]); None: off.
    job_asr_model: str | None = None
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: start a local Ray; "auto" or ray://host:port
    ray_actors: int = Field(1, ge=1, le=256)  # loaded models, one per node or GPU

    # Hardening: which names and clients the server answers, and how long a client may
    # take. (CORS is `cors_origins` above.) The Host header must be localhost, an IP
    # address, `host`, `public_url`'s host, this machine's name or one of `allowed_hosts`
    # (names clients use: "tts.lan", a Docker service name; "*" turns the check off).
    allowed_hosts: Annotated[list[str], NoDecode] = []
    # Networks (CIDR, e.g. "192.168.1.0/24") whose clients need no api_key: AllTalk clients
    # that cannot send one. The socket's peer address decides, never X-Forwarded-For.
    trusted_networks: Annotated[list[str], NoDecode] = []
    header_timeout: float = Field(20.0, gt=0)  # seconds to send a request's headers
    # Seconds of silence while a body arrives; after as many, a body must average 500 B/s.
    body_timeout: float = Field(30.0, gt=0)
    # Seconds a client may take none of an answer that waits for it (a paused <audio>
    # player, a hung reader) before its connection is reset and its job cancelled.
    send_timeout: float = Field(300.0, gt=0)
    max_connections: int = Field(200, ge=1)  # open HTTP connections; beyond, 503

    # Clients and responses (issue 14). A response's encoded audio is held in memory up to
    # `response_memory_bytes`, the rest waits in a temporary file (slow readers cost disk,
    # not memory). Voice uploads are stored mono at `voice_sample_rate` at most, within
    # `max_voice_bytes` per voice and `max_library_bytes` for the library (0: no limit).
    # AllTalk's output_file_url: "auto" answers V1 clients (SillyTavern <= 1.12, its
    # "AllTalk V1" mode) with an absolute URL, V2 clients with a relative one and
    # text-generation-webui's extension (either mode) with `//host:port/audio/<file>`.
    response_memory_bytes: int = Field(1024 * 1024, ge=0)
    voice_sample_rate: int = Field(48_000, ge=8_000, le=192_000)
    max_voice_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_library_bytes: int = Field(2 * 1024**3, ge=0)
    alltalk_url_style: Literal["auto", "absolute", "relative"] = "auto"

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("home", "voices_dir", "outputs_dir", "models_dir", "cache_dir", "model_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("audio_format")
    @classmethod
    def _check_format(cls, value: str) -> str:
        # Checked here, where the mistake is, rather than in every request that falls
        # back on it (each would get a 400 for a format its client never asked for).
        try:
            return get_format(value).name
        except UnsupportedFormat as e:
            raise ValueError(f"audio_format: {e}") from None

    @field_validator("cors_origins", "allowed_hosts", "trusted_networks", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # Environment variables may hold a JSON list or a comma-separated one.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        return [_normalise_origin(origin) for origin in origins]

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for host in hosts:
            name = host.strip().lower().rstrip(".")
            if name.count(":") == 1:  # "lowvox:7851": the port plays no part
                name = name.split(":", 1)[0]
            if not name or "/" in name or " " in name:
                raise ValueError(f"allowed_hosts: {host!r} is not a host name (e.g. tts.lan)")
            if "*" in name and name != "*":  # it would match no Host at all
                raise ValueError(
                    f"allowed_hosts: {host!r} is not a host name; '.home.lan' allows every "
                    "name under home.lan, '*' alone every name"
                )
            out.append(name)
        return out

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, networks: list[str]) -> list[str]:
        out = []
        for network in networks:
            try:
                out.append(str(ipaddress.ip_network(network.strip(), strict=False)))
            except ValueError as e:
                raise ValueError(
                    f"trusted_networks: {network!r} is not a network (e.g. 192.168.1.0/24)"
                ) from e
        return out

    @model_validator(mode="after")
    def _no_open_cors_without_key(self) -> Settings:
        if "*" in self.cors_origins and not self.api_key:
            raise ValueError(
                'cors_origins "*" lets every web page you visit use this server; '
                "list the origins that need it (e.g. http://localhost:8000) or set api_key"
            )
        return self

    @property
    def voices_path(self) -> Path:
        return self.voices_dir or self.home / "voices"

    @property
    def outputs_path(self) -> Path:
        return self.outputs_dir or self.home / "outputs"

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def cache_path(self) -> Path:
        return self.cache_dir or self.home / "cache"

    @property
    def jobs_path(self) -> Path:
        return self.home / "jobs"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE or os.environ.get("LOWVOX_CONFIG")
        if config_file:
            try:
                toml = TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file))
            except (OSError, ValueError) as e:  # unreadable, not UTF-8, not TOML
                raise LowvoxError(
                    f"invalid settings: cannot read config file {config_file}: {e}"
                ) from e
            sources.append(toml)
        return tuple(sources)


def _normalise_origin(origin: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin` (lower case, no slash)."""
    text = origin.strip()
    if text == "*":
        return text
    if "*" in text:  # browsers send one origin: a pattern would match none
        raise ValueError(
            f"cors_origins: {origin!r} is a pattern; list each origin (e.g. "
            'http://localhost:8000), or "*" alone for every page (which needs api_key)'
        )
    parts = urlsplit(text.rstrip("/"))
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path
        or parts.query
        or parts.fragment
        or port == -1
    ):
        raise ValueError(
            f"cors_origins: {origin!r} is not an origin; give scheme, host and port only, "
            "e.g. http://localhost:8000"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    # Browsers leave out the scheme's default port: http://host:80 is sent as http://host.
    default = {"http": 80, "https": 443}[parts.scheme]
    suffix = "" if port in (None, default) else f":{port}"
    return f"{parts.scheme}://{host}{suffix}".lower()


# Set only for the duration of `load_settings`; pydantic-settings asks for sources on a
# classmethod, so the path travels through here rather than through an argument.
_CONFIG_FILE: str | None = None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the config file, the environment and explicit overrides.

    Overrides whose value is None are ignored, so CLI flags that were not given do not
    hide the environment or the file.
    """
    global _CONFIG_FILE
    # A file named but not there is an error wherever it was named: ignored, its settings
    # (an api_key, say) would silently not apply.
    named_by = "--config"
    if config_file is None and os.environ.get("LOWVOX_CONFIG"):
        config_file, named_by = os.environ["LOWVOX_CONFIG"], "LOWVOX_CONFIG"
    if config_file is not None and not Path(config_file).is_file():
        raise LowvoxError(f"config file not found: {config_file} (from {named_by})")
    explicit = {k: v for k, v in overrides.items() if v is not None}
    _CONFIG_FILE = str(config_file) if config_file is not None else None
    try:
        return Settings(**explicit)
    except ValidationError as e:
        raise LowvoxError(f"invalid settings: {_describe(e)}") from e
    except ValueError as e:  # a LOWVOX_* value its source cannot parse (JSON fields)
        raise LowvoxError(f"invalid settings: {e}") from e
    finally:
        _CONFIG_FILE = None


def _describe(error: ValidationError) -> str:
    """One line per wrong setting: its name, what is wrong and the value given."""
    problems = []
    for err in error.errors():
        name = ".".join(str(p) for p in err.get("loc", ()))
        message = err.get("msg", "invalid value")
        if err.get("type") == "value_error":  # our own validators' messages say it all
            message = message.removeprefix("Value error, ").removeprefix(f"{name}: ")
        elif "input" in err:
            message += f" (got {err['input']!r})"
        problems.append(f"{name}: {message}" if name else message)
    return "; ".join(problems)
