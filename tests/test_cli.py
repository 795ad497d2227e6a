"""The `lowvox` command, run as a user would: a real subprocess."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def run_cli(*args: str, home: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWVOX_")}
    env["LOWVOX_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "lowvox", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
    )


def test_say_writes_intelligible_length_speech(tmp_path):
    out = tmp_path / "hello.wav"
    proc = run_cli("say", "Hello from lowvox", "-o", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    audio, rate = sf.read(out, dtype="float32")
    assert audio.ndim == 1
    duration = len(audio) / rate
    assert 0.6 < duration < 4.0
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silence


@pytest.mark.slow
def test_say_format_from_extension_and_flag(tmp_path):
    out = tmp_path / "hello.flac"
    proc = run_cli("say", "Format test", "-o", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sf.info(out).format == "FLAC"

    out = tmp_path / "forced.bin"
    proc = run_cli("say", "Format test", "-o", str(out), "--format", "mp3", home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    import av

    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name.startswith("mp3")


def test_say_to_stdout_streams_wav(tmp_path):
    proc = run_cli("say", "Streaming to standard output", "-o", "-", home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:4] == b"RIFF"
    # The streaming header has unknown sizes; read the samples after the 44-byte header.
    pcm = np.frombuffer(proc.stdout[44:], dtype="<i2")
    assert len(pcm) > 10_000
    assert np.abs(pcm).max() > 1000


def test_say_reads_text_from_stdin(tmp_path):
    out = tmp_path / "stdin.wav"
    proc = run_cli("say", "-", "-o", str(out), home=tmp_path, stdin=b"Text from a pipe")
    assert proc.returncode == 0, proc.stderr.decode()
    assert sf.info(out).duration > 0.5


def test_speed_changes_duration(tmp_path):
    durations = {}
    for speed in ("0.5", "2.0"):
        out = tmp_path / f"s{speed}.wav"
        proc = run_cli(
            "say", "The same sentence twice", "-o", str(out), "--speed", speed, home=tmp_path
        )
        assert proc.returncode == 0, proc.stderr.decode()
        durations[speed] = sf.info(out).duration
    assert durations["0.5"] > 2 * durations["2.0"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["say", "   ", "-o", "x.wav"], "text is empty"),
        (["say", "hi", "-o", "x.wav", "--voice", "no-such-voice"], "unknown voice"),
        (["say", "hi", "-o", "x.wav", "--language", "xx"], "unknown language"),
        (["say", "hi", "-o", "x.xyz"], "unsupported audio format"),
        (["say", "hi", "-o", "x.wav", "--speed", "9"], "out of range"),
        (["say", "hi", "-o", "x.wav", "--engine", "nope"], "unknown engine"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    args = [a if a != "x.wav" and not a.startswith("x.") else str(tmp_path / a) for a in args]
    proc = run_cli(*args, home=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("x.*"))  # nothing written


def test_text_over_the_limit(tmp_path):
    env_home = tmp_path
    os.environ.pop("LOWVOX_MAX_TEXT_CHARS", None)
    (tmp_path / "cfg.toml").write_text("max_text_chars = 10\n")
    proc = run_cli(
        "say",
        "this text is too long",
        "-o",
        str(tmp_path / "x.wav"),
        "--config",
        str(tmp_path / "cfg.toml"),
        home=env_home,
    )
    assert proc.returncode == 2
    assert "over the limit of 10" in proc.stderr.decode()


def test_stdin_is_read_no_further_than_the_limit(tmp_path):
    """`yes | lowvox say - -o x.wav` once read the endless pipe into memory (gigabytes in
    seconds) before any check; now it reads one character past the limit and stops. A
    file as standard input shows how far it was read: its offset is shared."""
    (tmp_path / "cfg.toml").write_text("max_text_chars = 10\n")
    source = tmp_path / "endless.txt"
    source.write_bytes(b"endless text " * 400_000)  # 5 MB stands in for a pipe that never ends
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWVOX_")}
    env["LOWVOX_HOME"] = str(tmp_path)
    with source.open("rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-m", "lowvox", "say", "-", "-o", str(tmp_path / "x.wav"),
             "--config", str(tmp_path / "cfg.toml")],
            stdin=stdin, capture_output=True, env=env, timeout=120,
        )  # fmt: skip
        consumed = os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert "standard input is over the limit of 10 characters" in err
    assert consumed < 1_000_000  # the buffer of one read, not the whole input
    assert not list(tmp_path.glob("x.*"))


def test_voices_lists_english(tmp_path):
    proc = run_cli("voices", home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) > 10
    assert any("\ten" in line for line in lines)


@pytest.mark.slow
def test_doctor_shows_settings_and_environment(tmp_path):
    proc = run_cli("doctor", home=tmp_path)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "port = 7851" in out
    assert f"home = {tmp_path}" in out
    assert "torch:" in out and "espeak-ng: found" in out
    assert "cpu kernels: " in out
    assert "memory read bandwidth: " in out and "int8: " in out and "ms/token" in out


@pytest.mark.slow
def test_doctor_hides_api_key(tmp_path):
    env_key = "s3cret-key"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'api_key = "{env_key}"\n')
    proc = run_cli("doctor", "--config", str(cfg), home=tmp_path)
    assert proc.returncode == 0
    assert env_key not in proc.stdout.decode()


def test_stdout_wav_decodes_with_soundfile_after_patch(tmp_path):
    """A player that needs real sizes can fix the header; the data itself is plain PCM."""
    proc = run_cli("say", "Header check", "-o", "-", home=tmp_path)
    data = bytearray(proc.stdout)
    assert data[4:8] == b"\xff\xff\xff\xff"
    data[4:8] = (len(data) - 8).to_bytes(4, "little")
    data[40:44] = (len(data) - 44).to_bytes(4, "little")
    audio, rate = sf.read(io.BytesIO(bytes(data)), dtype="float32")
    assert rate > 8000 and len(audio) > rate // 2


@pytest.mark.parametrize("language", ["auto", "de_DE", "DE"])
def test_say_accepts_every_spelling_of_a_language(tmp_path, language):
    """`--help` offers 'auto'; region and case spellings resolve like the server's."""
    out = tmp_path / "guten.wav"
    text = "Guten Tag, wie geht es dir heute? Ich hoffe, es geht dir gut."
    proc = run_cli("say", text, "-o", str(out), "--language", language, home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sf.info(out).frames > 0


@pytest.mark.parametrize("command", [["models", "list"], ["jobs", "list"]])
def test_shared_flags_work_before_a_nested_subcommand(tmp_path, command):
    """`lowvox models --home X list` is `lowvox models list --home X`: the inner parser
    must not reset a flag its parent took to None (it did, and the default folder was
    used without a word)."""
    home = tmp_path / "given"
    default_home = tmp_path / "default"
    proc = run_cli(command[0], "--home", str(home), *command[1:], home=default_home)
    assert proc.returncode == 0, proc.stderr.decode()
    if command[0] == "models":
        assert str(home / "models") in proc.stdout.decode()
    else:
        assert (home / "jobs").is_dir() and not default_home.exists()
    # And a config file given there is read (a missing one is an error, not ignored).
    proc = run_cli(command[0], "--config", str(tmp_path / "nope.toml"), *command[1:], home=home)
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr.decode()


@pytest.mark.parametrize("where", ["folder", "missing_place"])
def test_unwritable_output_is_a_clear_error(tmp_path, where):
    if where == "folder":
        out = tmp_path / "taken.wav"
        out.mkdir()
    else:
        out = Path("/proc/lowvox-test/out.wav")  # /proc takes no new folders, even as root
    proc = run_cli("say", "Nowhere to go", "-o", str(out), home=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert f"cannot write {out}" in err
    assert not list(tmp_path.glob(".*.part"))  # no temporary left behind


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_output_folder_is_refused_before_the_engine_loads(tmp_path, where):
    """`-o` naming a folder, or a place under a file, is known at once: it was found only
    when the audio was written, after the model had loaded and spoken the whole text (here
    the missing model would have been the first complaint). `lowvox book` checks its
    output with the same helper."""
    taken = tmp_path / "taken"
    if where == "a folder":
        taken.mkdir()
        out, why = taken, "it is a folder"
    else:
        taken.write_bytes(b"a file")
        out, why = taken / "deeper" / "x.wav", f"{taken} is a file"
    proc = run_cli(
        "say", "Hi", "-o", str(out),
        "--engine", "xtts", "--model-dir", str(tmp_path / "no-model"),
        home=tmp_path,
    )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert err == f"lowvox: error: cannot write {out}: {why}\n"


@pytest.mark.slow
def test_serve_on_a_taken_port_is_a_clear_error_not_ready(tmp_path):
    """A port in use is said at once, in one line; the server used to load its engine,
    log `lowvox is ready: http://...` and only then fail to bind (exit 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), home=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert f"lowvox: error: cannot listen on 127.0.0.1:{port}" in err
    assert "is ready" not in err and "Traceback" not in err


def test_data_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    proc = run_cli("jobs", "list", "--home", "/proc/lowvox-test-home", home=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert "lowvox: error:" in err and "/proc/lowvox-test-home" in err
