"""The `lowvox` command: say, book, jobs, voices, doctor, serve, models, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lowvox import __version__
from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.files import check_writable, write_atomic
from lowvox.settings import Settings, load_settings

log = logging.getLogger("lowvox")


# The shared flags may be given at every level of a nested command (`lowvox jobs --home X
# list` as well as `lowvox jobs list --home X`). An absent flag leaves no attribute
# (SUPPRESS), so a subcommand's parser never overwrites what its parent parsed with None;
# `build_parser` gives them their None defaults once, on the top parser.
_COMMON_DEFAULTS = {"config": None, "log_level": None, "home": None}
_ENGINE_DEFAULTS = {"engine": None, "model_dir": None, "device": None, "precision": None}


def _add_common(p: argparse.ArgumentParser) -> None:
    keep = argparse.SUPPRESS
    p.add_argument("--config", default=keep, help="TOML config file (also LOWVOX_CONFIG)")
    p.add_argument("--log-level", default=keep, choices=["debug", "info", "warning", "error"])
    p.add_argument("--home", default=keep, help="data folder (voices, outputs, models, cache)")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    keep = argparse.SUPPRESS
    p.add_argument("--engine", default=keep, help="engine name (espeak, xtts)")
    p.add_argument(
        "--model-dir",
        default=keep,
        help="XTTS model folder (config.json, model.pth, vocab.json)",
    )
    p.add_argument("--device", default=keep, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default=keep, help="auto | fp32 | bf16 | fp16 | int8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowvox", description="Text-to-speech for CPUs and small GPUs, built around XTTS v2."
    )
    parser.add_argument("--version", action="version", version=f"lowvox {__version__}")
    parser.set_defaults(**_COMMON_DEFAULTS, **_ENGINE_DEFAULTS)
    sub = parser.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="speak text into an audio file")
    _add_common(say)
    _add_engine_flags(say)
    say.add_argument("text", help="the text to speak ('-' reads standard input)")
    say.add_argument("-o", "--output", required=True, help="output file ('-' for stdout)")
    say.add_argument("--voice", help="voice name (or, for xtts, a reference clip)")
    say.add_argument("--language", help="language code, or 'auto'")
    say.add_argument("--speed", type=float, default=1.0, help="0.25 to 4.0 (default 1.0)")
    say.add_argument("--format", help="wav, mp3, opus, aac, flac, pcm (default: from -o)")
    say.add_argument("--pitch", type=int, help="espeak pitch, 0-100")

    voices = sub.add_parser("voices", help="list the voices of an engine")
    _add_common(voices)
    _add_engine_flags(voices)

    doctor = sub.add_parser("doctor", help="show settings, machine and models")
    _add_common(doctor)
    _add_engine_flags(doctor)

    serve = sub.add_parser("serve", help="run the HTTP server")
    _add_common(serve)
    _add_engine_flags(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 7851)")
    serve.add_argument(
        "--listen", action="store_true", help="accept connections from other machines (0.0.0.0)"
    )
    serve.add_argument("--api-key", help="require this key (Bearer or X-API-Key)")
    # action="append" leaves None when absent: the environment and the file stay in charge.
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let the web page at ORIGIN use the API from a browser, e.g. "
        "http://localhost:8000 for SillyTavern (repeatable)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a host name clients use for this server besides localhost and IP addresses, "
        "e.g. a Docker service name (repeatable)",
    )
    serve.add_argument(
        "--trusted-network",
        action="append",
        metavar="CIDR",
        help="clients on this network need no API key, e.g. 192.168.1.0/24 (repeatable)",
    )
    # default=None: an absent flag leaves LOWVOX_WYOMING and the config file in charge.
    serve.add_argument(
        "--wyoming",
        action="store_true",
        default=None,
        help="also serve Home Assistant's Wyoming protocol (no authentication)",
    )
    serve.add_argument("--wyoming-port", type=int, help="Wyoming TCP port (default 10200)")
    serve.add_argument(
        "--wyoming-zeroconf",
        action="store_true",
        default=None,
        help="announce Wyoming over mDNS for Home Assistant; implies --wyoming "
        "(pip install lowvox[zeroconf])",
    )

    models = sub.add_parser("models", help="list or download XTTS models")
    _add_common(models)
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser("list", help="installed models")
    _add_common(mlist)
    mdl = msub.add_parser("download", help="download a released model")
    _add_common(mdl)
    mdl.add_argument("name", help="model name, e.g. xtts-v2")
    mdl.add_argument("--revision", help="repository revision (tag, branch or commit)")
    mdl.add_argument(
        "--accept-license",
        action="store_true",
        help="accept the Coqui Public Model License (non-commercial use only)",
    )
    bench = sub.add_parser("bench", help="measure speed, memory and fidelity of the XTTS engine")
    _add_common(bench)
    src = bench.add_mutually_exclusive_group()
    src.add_argument("--model-dir", help="a real model folder")
    src.add_argument(
        "--random-weights",
        choices=["full", "tiny"],
        help="random weights of the full-size (default) or a tiny architecture",
    )
    bench.add_argument("--precision", default="fp32,int8", help="comma list: fp32,bf16,fp16,int8")
    bench.add_argument("--device", default="cpu", help="comma list: cpu,cuda,cuda:1")
    bench.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,8")
    bench.add_argument("--new-tokens", type=int, default=None, help="audio tokens per run (215)")
    bench.add_argument("--text", help="the sentence to speak")
    bench.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    bench.add_argument("--cache-dir", help="where converted weights and random models live")
    bench.add_argument("--compare-reference", metavar="PYTHON", help="a python with coqui-tts")
    bench.add_argument("--fidelity", action="store_true", help="reduced precision vs fp32")
    bench.add_argument("--golden", help="with --fidelity: also report it on this model folder")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    from lowvox.jobs.cli import add_parsers

    add_parsers(sub, _add_common, _add_engine_flags)
    return parser


def _settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        "log_level": getattr(args, "log_level", None),
        "home": getattr(args, "home", None),
        "engine": getattr(args, "engine", None),
        "model_dir": getattr(args, "model_dir", None),
        "device": getattr(args, "device", None),
        "precision": getattr(args, "precision", None),
        **extra,
    }
    return load_settings(getattr(args, "config", None), **overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _read_text(text: str, limit: int) -> str:
    """The text argument, or ('-') standard input: read no further than one character past
    `limit`, so that an endless pipe is refused rather than read into memory."""
    if text != "-":
        return text
    data = sys.stdin.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequest(f"standard input is over the limit of {limit} characters")
    return data


def cmd_say(args: argparse.Namespace) -> int:
    from lowvox.audio.encode import StreamEncoder, encode_audio
    from lowvox.audio.formats import format_from_path, get_format
    from lowvox.engines import SynthesisRequest, concat_chunks, create_engine

    settings = _settings_from_args(args)
    to_stdout = args.output == "-"
    if not to_stdout:
        check_writable(args.output)  # known now, not after the speech
    fmt = (args.format or ("wav" if to_stdout else format_from_path(args.output))).lower()
    text = _read_text(args.text, settings.max_text_chars)
    options = {"pitch": args.pitch} if args.pitch is not None else {}
    # The user's own command: `--voice ref.wav` may name an audio file to clone.
    engine = create_engine(settings.engine, settings, voice_files=True)
    # Check everything before loading weights or writing a byte.
    get_format(fmt)
    engine.load()
    request = engine.validate(
        SynthesisRequest(
            text=text,
            voice=args.voice or settings.voice,
            language=args.language or settings.language,
            speed=args.speed,
            options=options,
        ),
        max_chars=settings.max_text_chars,
    )
    chunks = engine.synthesize_stream(request)
    if to_stdout:
        encoder = StreamEncoder(fmt, engine.sample_rate)
        out = sys.stdout.buffer
        for chunk in chunks:
            out.write(encoder.write(chunk.samples))
            out.flush()
        out.write(encoder.close())
        out.flush()
        return 0
    audio = concat_chunks(chunks, engine.sample_rate)
    data = encode_audio(audio.samples, audio.sample_rate, fmt)
    try:
        write_atomic(Path(args.output), data)
    except OSError as e:  # a folder, a read-only or missing place: the user's to fix
        raise LowvoxError(f"cannot write {args.output}: {e.strerror or e}") from e
    log.info("wrote %s (%.2f s of audio)", args.output, audio.duration)
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    from lowvox.engines import create_engine

    settings = _settings_from_args(args)
    engine = create_engine(settings.engine, settings)
    engine.load()
    for v in engine.voices():
        lang = v.language or "-"
        print(f"{v.id}\t{lang}\t{v.name}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from lowvox.doctor import report

    settings = _settings_from_args(args)
    print(report(settings))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lowvox.server.app import serve

    host = "0.0.0.0" if args.listen else args.host
    settings = _settings_from_args(
        args,
        host=host,
        port=args.port,
        api_key=args.api_key,
        cors_origins=args.cors_origin,
        allowed_hosts=args.allowed_host,
        trusted_networks=args.trusted_network,
        wyoming=args.wyoming,
        wyoming_port=args.wyoming_port,
        wyoming_zeroconf=args.wyoming_zeroconf,
    )
    serve(settings)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lowvox.engines.xtts.download import download_model, list_models

    settings = _settings_from_args(args)
    if args.models_command == "list":
        models = list_models(settings.models_path)
        if not models:
            print(f"no models installed in {settings.models_path}")
        for m in models:
            print(f"{m.name}\t{m.path}\t{m.summary()}")
        return 0
    path = download_model(
        args.name,
        settings.models_path,
        revision=args.revision,
        accept_license=args.accept_license or settings.accept_model_license,
    )
    print(f"installed {args.name} in {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from lowvox.bench.run import BenchOptions, format_report, run_bench
    from lowvox.bench.workload import DEFAULT_NEW_TOKENS, DEFAULT_SENTENCE

    def split(value: str) -> list[str]:
        return [v.strip() for v in value.split(",") if v.strip()]

    settings = load_settings(args.config, log_level=args.log_level, home=args.home)
    try:
        batch_sizes = [int(b) for b in split(args.batch_sizes)]
    except ValueError as e:
        raise LowvoxError(f"--batch-sizes takes integers: {args.batch_sizes!r}") from e
    opts = BenchOptions(
        model_dir=Path(args.model_dir) if args.model_dir else None,
        random_weights=None if args.model_dir else (args.random_weights or "full"),
        precisions=split(args.precision),
        devices=split(args.device),
        batch_sizes=batch_sizes,
        new_tokens=DEFAULT_NEW_TOKENS if args.new_tokens is None else args.new_tokens,
        text=args.text or DEFAULT_SENTENCE,
        threads=settings.threads if args.threads is None else args.threads,
        cache_dir=Path(args.cache_dir) if args.cache_dir else settings.cache_path,
        compare_reference=args.compare_reference,
        fidelity=args.fidelity,
        golden_dir=Path(args.golden) if args.golden else None,
    )
    report = run_bench(opts)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_book(args: argparse.Namespace) -> int:
    from lowvox.jobs.cli import cmd_book as run

    settings = _settings_from_args(
        args, executor=args.executor, ray_address=args.ray_address, job_asr_model=args.asr_model
    )
    return run(args, settings)


def cmd_jobs(args: argparse.Namespace) -> int:
    from lowvox.jobs.cli import cmd_jobs as run

    return run(args, _settings_from_args(args))


COMMANDS = {
    "say": cmd_say,
    "book": cmd_book,
    "jobs": cmd_jobs,
    "voices": cmd_voices,
    "doctor": cmd_doctor,
    "serve": cmd_serve,
    "models": cmd_models,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None) or os.environ.get("LOWVOX_LOG_LEVEL") or "info"
    _setup_logging(level if level in ("debug", "info", "warning", "error") else "info")
    try:
        return COMMANDS[args.command](args)
    except LowvoxError as e:
        print(f"lowvox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        # The machine said no (a data folder that cannot be made, a full disk): say what
        # and where, without a traceback (--log-level debug shows it).
        log.debug("%s failed", args.command, exc_info=True)
        where = ", ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(
            f"lowvox: error: {e.strerror or e}" + (f": {where}" if where else ""), file=sys.stderr
        )
        return 1
