"""Fixtures for the XTTS tests: the golden reference bundle and a test-made random bundle.

The random bundle is written in the released format (config.json, a torch-zip `model.pth`
holding {"config", "model"} with fp16 tensors, `xtts.`-prefixed keys, weight-norm stored as
parametrizations, training-only keys the loader must drop, speakers_xtts.pth) with sizes and
a seed that differ from the golden bundle, so nothing can be tuned to one bundle.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.golden import GOLDEN
from tests.tolerance import FP32_PIPELINE


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """These tiny models gain nothing from threads; on a shared, busy machine OpenMP's
    spinning threads make them tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def golden_path() -> Path:
    if not (GOLDEN / "model.pth").is_file():
        pytest.skip(f"golden bundle not found at {GOLDEN}")
    return GOLDEN.resolve()


def _golden_generation_cases() -> list[int]:
    path = GOLDEN / "cases.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8"))["generation_case_ids"])


def _golden_infer_speeds() -> list[float]:
    """Speeds the reference rendered `infer*` audio at (1.0 plus every `.speedX.wav`)."""
    path = GOLDEN / "reference.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    speeds = {1.0}
    for key in keys:
        if key.startswith("infer") and ".speed" in key and key.endswith(".wav"):
            speeds.add(float(key.split(".speed", 1)[1].removesuffix(".wav")))
    return sorted(speeds)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`gen_case` runs a test for every generation case of the golden bundle, and
    `infer_speed` for every speed it rendered: nothing is tied to one bundle's ids."""
    absent = [pytest.param(None, marks=pytest.mark.skip(reason="golden bundle not found"))]
    if "gen_case" in metafunc.fixturenames:
        metafunc.parametrize("gen_case", _golden_generation_cases() or absent)
    if "infer_speed" in metafunc.fixturenames:
        metafunc.parametrize("infer_speed", _golden_infer_speeds() or absent)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return golden_path()


@pytest.fixture(scope="session")
def golden_ref(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "reference.safetensors")


@pytest.fixture(scope="session")
def golden_cases(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "cases.json").read_text(encoding="utf-8"))


def tolerance(
    reference: torch.Tensor, atol: float = 1e-4, rtol: float = FP32_PIPELINE.atol
) -> float:
    """Allowed max abs error of an fp32 tensor against the golden reference: the FP32_PIPELINE
    row (the bundle's own 1e-3) scaled to the tensor's peak, plus `atol` per unit of
    magnitude (at least `atol`) so that near-silent audio keeps a floor. A waveform peaking
    at 1 may differ by 1.1e-3; latents of magnitude 10, by 1.1e-2."""
    peak = float(reference.abs().max())
    return atol * max(1.0, peak) + rtol * peak


def assert_close(actual: torch.Tensor, reference: torch.Tensor, name: str = "") -> float:
    actual = torch.as_tensor(actual).float().reshape(reference.shape)
    err = float((actual - reference.float()).abs().max())
    tol = tolerance(reference)
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
    return err


@pytest.fixture(scope="session")
def close():
    """`close(actual, reference, name)`: assert within `tolerance`, return the max error."""
    return assert_close


# Which stored convolutions are weight-normed in the released checkpoint (HiFi-GAN's
# upsamplers and residual convolutions).
def is_weight_normed(key: str) -> bool:
    return (
        key.startswith("hifigan_decoder.waveform_decoder.")
        and (".ups." in key or ".convs1." in key or ".convs2." in key)
        and key.endswith(".weight")
    )


@dataclass(frozen=True)
class RandomBundle:
    path: Path
    state: dict[str, torch.Tensor]  # the float32 weights the model should end up with
    seed: int


def random_config(golden_dir: Path, layers: int, dim: int, heads: int) -> dict:
    raw = json.loads((golden_dir / "config.json").read_text(encoding="utf-8"))
    vocab = json.loads((golden_dir / "vocab.json").read_text(encoding="utf-8"))
    raw["model_args"].update(
        gpt_layers=layers,
        gpt_n_model_channels=dim,
        gpt_n_heads=heads,
        decoder_input_dim=dim,
        gpt_number_text_tokens=len(vocab["model"]["vocab"]),
        gpt_num_audio_tokens=514,
        gpt_start_audio_token=512,
        gpt_stop_audio_token=513,
        gpt_max_audio_tokens=150,
        gpt_max_text_tokens=300,
    )
    raw.update(temperature=0.6, top_k=30, top_p=0.9, repetition_penalty=3.0)
    return raw


def make_random_bundle(
    out: Path, golden_dir: Path, seed: int, layers: int = 3, dim: int = 128, heads: int = 2
) -> RandomBundle:
    """Write a random XTTS model in the released format to `out`."""
    from lowvox.engines.xtts.config import XttsConfig
    from lowvox.engines.xtts.model import XttsModel

    out.mkdir(parents=True, exist_ok=True)
    raw_config = random_config(golden_dir, layers, dim, heads)
    config = XttsConfig.from_dict(raw_config)
    torch.manual_seed(seed)
    model = XttsModel(config)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or ".torch_spec." in name:
            # Integers, and the speaker encoder's fixed front-end (pre-emphasis filter,
            # window, mel filterbank), keep the values the modules compute.
            state[name] = t.clone()
        elif name.endswith("running_var") or name == "mel_stats":
            state[name] = torch.rand_like(t) + 0.5
        elif t.dim() == 1 and ("norm" in name or "ln_" in name or name.endswith("gamma")):
            state[name] = 1.0 + 0.1 * torch.randn_like(t)
        else:
            fan_in = t[0].numel() if t.dim() > 1 else 50
            state[name] = torch.randn_like(t) / fan_in**0.5
    # What the model should load is the fp16-rounded version of these weights.
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}

    stored: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if is_weight_normed(name):
            # Store as g * v / |v| with g = |v| (per output channel), so folding restores t.
            base = name[: -len(".weight")]
            g = torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)
            stored[f"xtts.{base}.parametrizations.weight.original0"] = g.half()
            stored[f"xtts.{base}.parametrizations.weight.original1"] = t.half()
        else:
            stored[f"xtts.{name}"] = t.half() if t.is_floating_point() else t
    # Keys a released checkpoint carries that the loader must ignore.
    vocab_n = config.model_args.gpt_number_text_tokens
    stored["xtts.gpt.text_head.weight"] = torch.randn(vocab_n, dim).half()
    stored["xtts.gpt.text_head.bias"] = torch.randn(vocab_n).half()
    stored["xtts.dvae.codebook.embed"] = torch.randn(8, 4).half()
    stored["xtts.torch_mel_spectrogram_dvae.mel_stft.window"] = torch.ones(4).half()
    stored["xtts.gpt.gpt_inference.lm_head.1.weight"] = stored["xtts.gpt.mel_head.weight"]
    torch.save({"config": raw_config, "model": stored}, out / "model.pth")

    (out / "config.json").write_text(json.dumps(raw_config, indent=2), encoding="utf-8")
    shutil.copy(golden_dir / "vocab.json", out / "vocab.json")
    speakers = {
        "Test Speaker": {
            "gpt_cond_latent": torch.randn(1, 32, dim),
            "speaker_embedding": torch.nn.functional.normalize(torch.randn(1, 512, 1), dim=1),
        }
    }
    torch.save(speakers, out / "speakers_xtts.pth")
    return RandomBundle(out, state, seed)


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path) -> RandomBundle:
    return make_random_bundle(tmp_path_factory.mktemp("xtts-random"), golden_dir, seed=7)


@pytest.fixture(scope="session")
def golden_model(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from lowvox.engines.xtts.loader import load_model

    return load_model(golden_dir, cache_dir=tmp_path_factory.mktemp("xtts-cache"))


@pytest.fixture(scope="session")
def narrow_vocoder_model(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The golden model with a narrow random HiFi-GAN (32 channels where the released one
    has 512; same rates, kernels and fused oneDNN path): for tests of scheduling and
    cadence, whose vocoding is otherwise most of their time. Audio tests use
    `golden_model`."""
    from lowvox.engines.xtts.hifigan import GeneratorConfig, HifiganGenerator
    from lowvox.engines.xtts.loader import load_model

    model = load_model(golden_dir, cache_dir=tmp_path_factory.mktemp("xtts-narrow"))
    old = model.hifigan_decoder.waveform_decoder
    args = model.config.model_args
    torch.manual_seed(0)
    narrow = HifiganGenerator(
        args.decoder_input_dim,
        args.d_vector_dim,
        GeneratorConfig(upsample_initial_channel=32),
        old.conds is not None,
    ).eval()
    narrow.requires_grad_(False)
    # Speech-like loudness (peaks ~0.3; the narrow net alone gives ~1e-3), so that audio
    # compared within FP32_PIPELINE's absolute bound is compared for real.
    narrow.conv_post.weight.mul_(400.0)
    narrow.fused = True
    model.hifigan_decoder.waveform_decoder = narrow
    return model


@pytest.fixture(scope="session")
def random_model(random_bundle: RandomBundle):
    from lowvox.engines.xtts.loader import load_model

    return load_model(random_bundle.path)


@pytest.fixture(scope="session")
def golden_voice(golden_ref):
    """The voice the reference generated gen*/infer* with (ref_a.wav's latents)."""
    from lowvox.engines.xtts.voices import Voice

    return Voice(golden_ref["voice0.gpt_cond_latent"], golden_ref["voice0.speaker_embedding"])
