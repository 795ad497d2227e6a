"""espeak's stream, fed chunk by chunk to the streaming encoders, makes playable files."""

from __future__ import annotations

import io

import av
import pytest

pytest.importorskip("espeakng_loader")

from lowvox.audio.encode import FORMATS, StreamEncoder, output_rate  # noqa: E402
from lowvox.engines.base import SynthesisRequest  # noqa: E402
from lowvox.engines.espeak import EspeakEngine  # noqa: E402

TEXT = "Streaming speech from espeak into every output format, chunk by chunk."


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "pcm"])
def test_espeak_stream_encodes_to_a_file_of_the_same_length(fmt: str) -> None:
    engine = EspeakEngine()
    request = engine.validate(SynthesisRequest(text=TEXT))
    encoder = StreamEncoder(fmt, engine.sample_rate)
    data = bytearray()
    produced = 0
    for chunk in engine.synthesize_stream(request):
        produced += len(chunk.samples)
        data += encoder.write(chunk.samples)
    data += encoder.close()
    with av.open(io.BytesIO(bytes(data))) as container:
        stream = container.streams.audio[0]
        decoded = sum(frame.samples for frame in container.decode(stream))
        rate = stream.codec_context.sample_rate
    assert rate == output_rate(fmt, engine.sample_rate)
    expected = produced / engine.sample_rate
    assert expected - 0.01 <= decoded / rate <= expected + 0.1
