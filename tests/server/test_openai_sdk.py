"""The OpenAI Python SDK, unmodified, against a running server (test-only dependency)."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import CHUNK_SECONDS, fake_chunks, fake_frequency, live_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory):
    with live_server(
        tmp_path_factory.mktemp("sdk"), api_key="sk-local", openai_voice_map={"nova": "gamma"}
    ) as s:
        yield s


@pytest.fixture()
def sdk(sdk_server):
    return openai.OpenAI(base_url=f"{sdk_server.url}/v1", api_key="sk-local", max_retries=0)


def test_create_and_read(sdk):
    text = "the sdk reads the whole body"
    response = sdk.audio.speech.create(
        model="tts-1", voice="nova", input=text, response_format="wav"
    )
    samples, rate, _ = decode(response.read(), "wav")
    assert abs(len(samples) / rate - fake_chunks(text) * CHUNK_SECONDS) < 0.01
    # nova is mapped to gamma in the settings.
    assert abs(dominant_frequency(samples, rate) - fake_frequency("gamma", text)) < 5


def test_streaming_response_with_speed(sdk):
    text = "streamed through the sdk"
    with sdk.audio.speech.with_streaming_response.create(
        model="tts-1-hd", voice="beta", input=text, response_format="mp3", speed=1.25
    ) as response:
        data = b"".join(response.iter_bytes(1024))
    samples, rate, _ = decode(data, "mp3")
    assert abs(len(samples) / rate - fake_chunks(text) * CHUNK_SECONDS) < 0.1
    assert abs(dominant_frequency(samples, rate) - 1.25 * fake_frequency("beta", text)) < 10


@pytest.mark.parametrize(
    ("model", "voice"),
    [("gpt-4o-mini-tts-2025-12-15", "marin"), ("tts-1-hd-1106", "cedar"), ("tts-1", "coral")],
)
def test_current_openai_model_and_voice_names(sdk, model, voice):
    """The names in the SDK's own SpeechModel and Voice types (and the dated snapshots
    clients hard-code) are accepted; an unmapped OpenAI voice speaks with the default.
    `instructions` is taken and has no effect (no engine here takes a prompt)."""
    text = f"{model} speaks as {voice}"
    response = sdk.audio.speech.create(
        model=model, voice=voice, input=text, response_format="wav", instructions="Whisper."
    )
    samples, rate, _ = decode(response.read(), "wav")
    assert abs(dominant_frequency(samples, rate) - fake_frequency("alpha", text)) < 5


def test_sse_stream_format(sdk):
    """`stream_format="sse"` through the SDK's streaming response: events, read line by
    line as they arrive, whose base64 audio makes the speech."""
    text = "events through the sdk"
    with sdk.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="nova", input=text, response_format="pcm",
        stream_format="sse",
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert events[-1]["type"] == "speech.audio.done"
    assert set(events[-1]["usage"]) == {"input_tokens", "output_tokens", "total_tokens"}
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    samples, rate, _ = decode(audio, "pcm")
    assert abs(len(samples) / rate - fake_chunks(text) * CHUNK_SECONDS) < 0.01
    assert abs(dominant_frequency(samples, rate) - fake_frequency("gamma", text)) < 5


def test_models_list(sdk):
    ids = {m.id for m in sdk.models.list()}
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts-2025-12-15", "espeak", "xtts"} <= ids


def test_models_retrieve(sdk):
    for name in ("tts-1", "gpt-4o-mini-tts-2025-12-15", "espeak"):
        m = sdk.models.retrieve(name)
        assert (m.id, m.object) == (name, "model")
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve("gpt-9")
    assert e.value.param == "model"


def test_errors_surface_as_sdk_exceptions(sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.audio.speech.create(model="tts-1", voice="nobody", input="hi")
    assert "unknown voice" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        sdk.audio.speech.create(model="tts-1", voice="alpha", input="hi", speed=9)
    assert "speed" in str(e.value)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": "x" * 20_001}, "input"),
        ({"input": " "}, "input"),
        ({"response_format": "ogg-vorbis"}, "response_format"),
        ({"speed": 0.1}, "speed"),
        ({"speed": "fast"}, "speed"),  # a mistyped field: OpenAI's 400, not 422
    ],
)
def test_bad_fields_are_bad_requests_naming_the_param(sdk, fields, param):
    """OpenAI's error object names the request field by OpenAI's name, with a string or
    null `code` (the SDK turns a number into a string)."""
    with pytest.raises(openai.BadRequestError) as e:
        sdk.audio.speech.create(**{"model": "tts-1", "voice": "alpha", "input": "hi", **fields})
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"
    assert e.value.code is None


def test_wrong_key_is_rejected(sdk_server):
    bad = openai.OpenAI(base_url=f"{sdk_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice="alpha", input="hi")


def test_queue_full_is_retryable(tmp_path):
    """A full queue answers 429 + Retry-After, which the SDK treats as a rate limit."""
    with live_server(tmp_path, max_queue=1) as s:
        s.engine.gate.clear()

        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        results = []

        def send(t):
            results.append(client.audio.speech.create(model="tts-1", voice="alpha", input=t).read())

        a = threading.Thread(target=send, args=("first",))
        a.start()
        deadline = time.monotonic() + 10
        while s.engine.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        b = threading.Thread(target=send, args=("second",))
        b.start()
        while s.state.hub.loaded()["espeak"].scheduler.queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            client.audio.speech.create(model="tts-1", voice="alpha", input="third")
        s.engine.gate.set()
        a.join()
        b.join()
        assert len(results) == 2
