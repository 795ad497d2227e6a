"""Cloning on a small random model: inputs, multiple references, errors, the latent cache and
studio speakers. `clone_voice` only needs the attributes listed in the XTTS contract."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lowvox.audio.io import Audio
from lowvox.engines.xtts import voices as V
from lowvox.errors import InvalidRequest
from tests.full_disk import files_limited_to
from tests.xtts.test_voice_helpers import random_voice_model

SETTINGS = {"gpt_cond_len": 30, "gpt_cond_chunk_len": 4, "max_ref_length": 30}


def speechlike(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.2 * x * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return random_voice_model()


@pytest.fixture()
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "ref.wav"
    sf.write(path, speechlike(5.0, 22050, 1), 22050, subtype="PCM_16")
    return path


class Counter:
    """Counts forward calls of a module (to tell cache hits from recomputation)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1


def test_clone_shapes_and_input_kinds(model, clip: Path) -> None:
    voice = V.clone_voice(model, clip, **SETTINGS)
    assert voice.gpt_cond_latent.shape == (1, 8, 96)  # [1, num_latents, D] of this model
    assert voice.speaker_embedding.shape == (1, 24, 1)
    torch.testing.assert_close(voice.speaker_embedding.norm(dim=1), torch.ones(1, 1))
    # bytes, a list of one path, and decoded arrays give the same voice
    data, rate = sf.read(clip, dtype="float32")
    for same in (clip.read_bytes(), [str(clip)], (data, rate), Audio(data, rate), data):
        other = V.clone_voice(model, same, **SETTINGS)
        torch.testing.assert_close(other.gpt_cond_latent, voice.gpt_cond_latent)
        torch.testing.assert_close(other.speaker_embedding, voice.speaker_embedding)


def test_rate_and_stereo_are_handled(model, tmp_path: Path) -> None:
    mono = speechlike(3.0, 44100, 2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([mono, mono], axis=1), 44100, subtype="FLOAT")
    from_file = V.clone_voice(model, path, **SETTINGS)
    from_array = V.clone_voice(model, (mono, 44100), **SETTINGS)
    torch.testing.assert_close(from_file.gpt_cond_latent, from_array.gpt_cond_latent)
    # Stereo arrays in either layout ([N, 2] as soundfile reads, [2, N] as torch code has).
    for stereo in (np.stack([mono, mono], axis=1), np.stack([mono, mono], axis=0)):
        other = V.clone_voice(model, (stereo, 44100), **SETTINGS)
        torch.testing.assert_close(other.gpt_cond_latent, from_file.gpt_cond_latent)


def test_several_references_average_speaker_embeddings(model, tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"r{i}.wav")
        sf.write(paths[-1], speechlike(2.5, 22050, 10 + i), 22050)
    both = V.clone_voice(model, paths, **SETTINGS)
    singles = [V.clone_voice(model, p, **SETTINGS) for p in paths]
    mean = (singles[0].speaker_embedding + singles[1].speaker_embedding) / 2
    torch.testing.assert_close(both.speaker_embedding, mean)
    # GPT latents come from the concatenated audio, so they differ from either single one.
    assert not torch.allclose(both.gpt_cond_latent, singles[0].gpt_cond_latent)
    # A tuple of paths is a list of references, not one (samples, rate) pair.
    torch.testing.assert_close(
        V.clone_voice(model, tuple(paths), **SETTINGS).gpt_cond_latent, both.gpt_cond_latent
    )


def test_gpt_cond_len_limits_the_audio_used(model, tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    x = speechlike(9.0, 22050, 3)
    sf.write(path, x, 22050, subtype="FLOAT")
    short = V.clone_voice(model, path, gpt_cond_len=4, gpt_cond_chunk_len=4, max_ref_length=30)
    first4 = V.clone_voice(
        model, (x[: 4 * 22050], 22050), gpt_cond_len=4, gpt_cond_chunk_len=4, max_ref_length=30
    )
    torch.testing.assert_close(short.gpt_cond_latent, first4.gpt_cond_latent)


def test_bad_references_are_invalid_requests(model, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="too short"):
        V.clone_voice(model, (speechlike(0.2, 22050, 4), 22050), **SETTINGS)
    with pytest.raises(InvalidRequest, match="silent"):
        V.clone_voice(model, (np.zeros(22050, np.float32), 22050), sound_norm_refs=True, **SETTINGS)
    with pytest.raises(InvalidRequest):
        V.clone_voice(model, b"definitely not audio" * 100, **SETTINGS)
    with pytest.raises(InvalidRequest):
        V.clone_voice(model, tmp_path / "missing.wav", **SETTINGS)
    with pytest.raises(InvalidRequest):
        V.clone_voice(model, [], **SETTINGS)
    with pytest.raises(InvalidRequest):
        V.clone_voice(model, (np.full(22050, np.nan, np.float32), 22050), **SETTINGS)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("value", [2.7, float("nan"), "5", True])
def test_clip_lengths_that_are_not_whole_seconds_are_invalid_requests(
    model, clip: Path, name: str, value
) -> None:
    # The reference slices the audio by these seconds: 2.7 is not silently 2 here, and NaN
    # is not a ValueError from int().
    with pytest.raises(InvalidRequest, match=f"{name} must be a whole number") as e:
        V.clone_voice(model, clip, **{**SETTINGS, name: value})
    assert e.value.field == name
    # numpy integers (a length read from an array) are whole seconds too
    assert V.clone_voice(model, clip, **{**SETTINGS, name: np.int64(SETTINGS[name])})


def test_an_unreadable_reference_file_is_named_in_the_error(model, tmp_path: Path) -> None:
    """`lowvox say --voice broken.wav` said "not a readable audio file: <audio data>": the
    file was read to bytes (for the voice cache's digest) and its name was lost."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"definitely not audio" * 100)
    with pytest.raises(InvalidRequest, match=f"not a readable audio file: {broken}"):
        V.clone_voice(model, broken, **SETTINGS)


@pytest.mark.parametrize("samples", [1, 10, 300])
def test_clips_of_a_few_samples_are_invalid_requests(model, clip: Path, tmp_path, samples) -> None:
    """Shorter than the speaker encoder's STFT window, alone or beside a good clip: a clear
    4xx naming the clip, not a RuntimeError from the padding."""
    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, speechlike(1.0, 22050, 5)[:samples], 22050)
    with pytest.raises(InvalidRequest, match="too short"):
        V.clone_voice(model, tiny, **SETTINGS)
    with pytest.raises(InvalidRequest, match=r"reference audio 2 of 2 is too short"):
        V.clone_voice(model, [clip, tiny], **SETTINGS)
    with pytest.raises(InvalidRequest, match="too short"):
        V.clone_voice(model, (speechlike(1.0, 48000, 5)[:samples], 48000), **SETTINGS)


def test_sound_norm_refs_makes_level_irrelevant(model, clip: Path) -> None:
    data, rate = sf.read(clip, dtype="float32")
    loud = V.clone_voice(model, (data, rate), sound_norm_refs=True, **SETTINGS)
    quiet = V.clone_voice(model, (data * 0.1, rate), sound_norm_refs=True, **SETTINGS)
    torch.testing.assert_close(loud.gpt_cond_latent, quiet.gpt_cond_latent, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Cache


def test_second_clone_of_same_clip_is_a_cache_hit(model, clip: Path, tmp_path: Path) -> None:
    cache = V.VoiceCache(tmp_path / "cache")
    enc = Counter(model.gpt.conditioning_encoder)
    spk = Counter(model.hifigan_decoder.speaker_encoder)
    first = V.clone_voice(model, clip, cache=cache, **SETTINGS)
    computed = (enc.calls, spk.calls)
    assert computed[0] > 0 and computed[1] > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    # Same bytes under another name: still a hit, nothing recomputed.
    copy = tmp_path / "copy.wav"
    copy.write_bytes(clip.read_bytes())
    again = V.clone_voice(model, copy, cache=cache, **SETTINGS)
    assert (enc.calls, spk.calls) == computed
    torch.testing.assert_close(again.gpt_cond_latent, first.gpt_cond_latent)
    torch.testing.assert_close(again.speaker_embedding, first.speaker_embedding)


def test_changed_clip_settings_or_model_miss(model, clip: Path, tmp_path: Path) -> None:
    cache = V.VoiceCache(tmp_path / "cache")
    V.clone_voice(model, clip, cache=cache, **SETTINGS)
    enc = Counter(model.gpt.conditioning_encoder)

    changed = tmp_path / "changed.wav"
    data, rate = sf.read(clip, dtype="int16")
    data[1000] ^= 1  # one sample, one bit
    sf.write(changed, data, rate, subtype="PCM_16")
    V.clone_voice(model, changed, cache=cache, **SETTINGS)
    assert enc.calls > 0
    calls = enc.calls

    V.clone_voice(model, clip, cache=cache, sound_norm_refs=True, **SETTINGS)
    assert enc.calls > calls
    calls = enc.calls

    other_model = random_voice_model()  # same weights, another fingerprint
    other_model.fingerprint = "another-checkpoint"
    other = Counter(other_model.gpt.conditioning_encoder)
    V.clone_voice(other_model, clip, cache=cache, **SETTINGS)
    assert other.calls > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


@pytest.mark.parametrize(
    "content", [b"", b"garbage" * 50, None], ids=["empty", "garbage", "wrong-tensors"]
)
def test_corrupt_cache_file_is_ignored_and_rewritten(
    model, clip: Path, tmp_path: Path, content
) -> None:
    from safetensors.torch import save_file

    cache = V.VoiceCache(tmp_path / "cache")
    good = V.clone_voice(model, clip, cache=cache, **SETTINGS)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    if content is None:
        save_file({"something": torch.zeros(3)}, str(path))
    else:
        path.write_bytes(content)
    enc = Counter(model.gpt.conditioning_encoder)
    again = V.clone_voice(model, clip, cache=cache, **SETTINGS)
    assert enc.calls > 0  # recomputed, not crashed
    torch.testing.assert_close(again.gpt_cond_latent, good.gpt_cond_latent)
    assert cache.get(path.stem.removeprefix("voice-")) is not None  # rewritten, readable
    calls = enc.calls
    V.clone_voice(model, clip, cache=cache, **SETTINGS)
    assert enc.calls == calls


def test_the_cache_keeps_at_most_max_entries_least_recently_used_first(
    model, clip: Path, tmp_path: Path
) -> None:
    # Every changed, deleted or re-uploaded voice left its latents behind for good: the
    # cache folder grew without bound.
    cache = V.VoiceCache(tmp_path / "cache", max_entries=2)
    data, rate = sf.read(clip, dtype="float32")
    a, b, c = ((data * g, rate) for g in (0.5, 0.6, 0.7))
    V.clone_voice(model, a, cache=cache, **SETTINGS)
    (fa,) = (tmp_path / "cache").glob("*.safetensors")
    V.clone_voice(model, b, cache=cache, **SETTINGS)
    (fb,) = set((tmp_path / "cache").glob("*.safetensors")) - {fa}
    os.utime(fa, (1, 1))  # a was stored first ...
    os.utime(fb, (2, 2))
    V.clone_voice(model, a, cache=cache, **SETTINGS)  # ... but is used again: b goes
    V.clone_voice(model, c, cache=cache, **SETTINGS)
    left = set((tmp_path / "cache").glob("*.safetensors"))
    assert len(left) == 2 and fa in left and fb not in left
    enc = Counter(model.gpt.conditioning_encoder)
    V.clone_voice(model, a, cache=cache, **SETTINGS)
    V.clone_voice(model, c, cache=cache, **SETTINGS)
    assert enc.calls == 0  # the two kept are hits


def test_unwritable_cache_does_not_fail_cloning(model, clip: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    voice = V.clone_voice(model, clip, cache=V.VoiceCache(blocker / "cache"), **SETTINGS)
    assert voice.gpt_cond_latent.shape == (1, 8, 96)


def test_a_full_disk_does_not_fail_cloning(model, clip: Path, tmp_path: Path) -> None:
    cache = V.VoiceCache(tmp_path / "cache")
    with files_limited_to(1024):
        voice = V.clone_voice(model, clip, cache=cache, **SETTINGS)
    assert voice.gpt_cond_latent.shape == (1, 8, 96)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written file, no leftover


# ------------------------------------------------------------------------------------------
# Studio speakers


def test_load_studio_speakers(tmp_path: Path) -> None:
    speakers = {
        "Ana Florence": {
            "gpt_cond_latent": torch.randn(1, 32, 64),
            "speaker_embedding": torch.randn(1, 512, 1),
        },
        "Bo": {
            "gpt_cond_latent": torch.randn(1, 32, 64),
            "speaker_embedding": torch.randn(1, 512, 1),
        },
    }
    path = tmp_path / "speakers_xtts.pth"
    torch.save(speakers, path)
    voices = V.load_studio_speakers(path)
    assert list(voices) == ["Ana Florence", "Bo"]
    assert voices["Bo"].name == "Bo"
    torch.testing.assert_close(voices["Bo"].gpt_cond_latent, speakers["Bo"]["gpt_cond_latent"])
    torch.testing.assert_close(voices["Bo"].speaker_embedding, speakers["Bo"]["speaker_embedding"])


class _Evil:
    def __reduce__(self):
        return (Path.write_text, (Path("/tmp/lowvox-pwned"), "x"))


def test_studio_speakers_never_unpickle_code(tmp_path: Path) -> None:
    path = tmp_path / "speakers_xtts.pth"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(V.SpeakerFileError, match="refusing to load") as caught:
        V.load_studio_speakers(path)
    assert "weights_only" not in str(caught.value)  # torch's advice would run the payload
    assert not Path("/tmp/lowvox-pwned").exists()


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        {"a": {"gpt_cond_latent": torch.zeros(1, 32, 4)}},
        {"a": 3},
        # Two voices' latents: no reshape makes one voice of them.
        {
            "a": {
                "gpt_cond_latent": torch.zeros(2, 32, 4),
                "speaker_embedding": torch.zeros(1, 8, 1),
            }
        },
    ],
)
def test_malformed_speaker_files(tmp_path: Path, payload) -> None:
    path = tmp_path / "speakers_xtts.pth"
    torch.save(payload, path)
    with pytest.raises(V.SpeakerFileError):
        V.load_studio_speakers(path)
    with pytest.raises(V.SpeakerFileError):
        V.load_studio_speakers(tmp_path / "missing.pth")


def test_random_bundle_clones_finite_voices(random_model, golden_dir) -> None:
    """A test-made model must give usable voices, or the tests on it prove little."""
    voice = random_model.clone_voice([golden_dir / "ref_a.wav"])
    assert torch.isfinite(voice.gpt_cond_latent).all()
    assert torch.isfinite(voice.speaker_embedding).all()


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"gpt_cond_latent": torch.randn(1, 32, 1024)}, "do not fit this model"),
        ({"speaker_embedding": torch.randn(1, 256, 1)}, "does not fit this model"),
        ({"gpt_cond_latent": torch.randn(0)}, "do not fit this model"),
        ({"gpt_cond_latent": torch.full((1, 32, 256), float("nan"))}, "NaN or infinite"),
    ],
)
def test_a_studio_speaker_that_does_not_fit_the_model_fails_the_load(
    golden_dir: Path, tmp_path: Path, entry, message
) -> None:
    """Not at the first request with that speaker (a 500 after decoding, or a NaN that
    fails the decode step of every request batched with it)."""
    from lowvox.engines.xtts.loader import load_model
    from lowvox.engines.xtts.voices import SpeakerFileError

    speakers = torch.load(golden_dir / "speakers_xtts.pth", weights_only=True)
    good = next(iter(speakers.values()))
    for name in ("config.json", "model.pth", "vocab.json"):
        (tmp_path / name).symlink_to(golden_dir / name)
    torch.save({**speakers, "Odd One": {**good, **entry}}, tmp_path / "speakers_xtts.pth")
    with pytest.raises(SpeakerFileError, match=f"'Odd One': .*{message}"):
        load_model(tmp_path, cache_dir=tmp_path / "cache")
