"""The xtts engine's runtime: device plan, threads, batching, residency, keep-alive."""

from __future__ import annotations

import logging

import pytest
import torch

from lowvox.engines import SynthesisRequest
from lowvox.engines.xtts.engine import XttsEngine
from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.runtime.devices import probe_machine
from lowvox.runtime.planner import Plan, PlanError
from lowvox.settings import Settings
from tests.tolerance import FP32_PIPELINE, FP32_REORDER

GREEDY = {"max_new_tokens": 8, "do_sample": False}
CPU_FP32 = Plan("cpu", "fp32", "cpu", "float32", ["test"])


@pytest.fixture(autouse=True)
def _keep_one_thread():
    """Engines set torch's thread count at load; give the other tests back theirs."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def settings(bundle, tmp_path, **kw) -> Settings:
    return Settings(home=tmp_path, model_dir=bundle.path, engine="xtts", threads=1, **kw)


def request(text: str = "Hello there.", **options) -> SynthesisRequest:
    return SynthesisRequest(text=text, voice="Test Speaker", options={**GREEDY, **options})


def test_from_settings_applies_the_plan(random_bundle, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lowvox.engines.xtts.engine"):
        engine = XttsEngine.from_settings(settings(random_bundle, tmp_path, precision="bf16"))
    assert (engine.plan.device, engine.plan.precision) == ("cpu", "bf16")
    assert "xtts plan: device=cpu precision=bf16" in caplog.text
    engine.load()
    assert engine.model.precision == "bf16"
    assert engine.model.gpt.gpt.h[0].attn.c_attn.weight.dtype == torch.bfloat16


def test_auto_follows_the_planner(random_bundle, tmp_path) -> None:
    from lowvox.runtime.planner import plan

    engine = XttsEngine.from_settings(settings(random_bundle, tmp_path))
    expected = plan(probe_machine())
    assert (engine.plan.device, engine.plan.precision) == (expected.device, expected.precision)
    if expected.device == "cpu":
        assert engine.plan.precision == "int8"  # CPU: int8 weights
        engine.load()
        assert engine.model.precision == "int8"


@pytest.mark.parametrize(
    "choice, message",
    [({"precision": "fp16"}, "fp16 needs a GPU"), ({"precision": "int4"}, "unknown precision")],
)
def test_impossible_choices_are_clear_errors(random_bundle, tmp_path, choice, message) -> None:
    if torch.cuda.is_available() and choice.get("precision") == "fp16":
        pytest.skip("this machine has a GPU")
    with pytest.raises(PlanError, match=message):
        XttsEngine.from_settings(settings(random_bundle, tmp_path, **choice))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(random_bundle, tmp_path) -> None:
    with pytest.raises(LowvoxError, match="no such GPU"):
        XttsEngine.from_settings(settings(random_bundle, tmp_path, device="cuda"))


def test_threads_come_from_settings_or_the_machine(random_bundle, tmp_path) -> None:
    engine = XttsEngine.from_settings(settings(random_bundle, tmp_path, precision="fp32"))
    engine.load()
    assert torch.get_num_threads() == 1 == engine.threads
    plain = Settings(home=tmp_path, model_dir=random_bundle.path, engine="xtts")
    assert XttsEngine.from_settings(plain).threads == probe_machine().cpu_count


@pytest.mark.slow
def test_unload_and_reload(random_bundle, tmp_path) -> None:
    engine = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=CPU_FP32)
    engine.load()
    assert engine.loaded
    first = engine.synthesize(request())
    engine.unload()
    assert not engine.loaded
    again = engine.synthesize(request())  # the next request loads the model again
    assert engine.loaded
    # Another load is another model instance: the same maths, maybe in another order.
    FP32_REORDER.check(again.samples, first.samples)


@pytest.mark.slow
def test_batch_equals_requests_alone(random_bundle, tmp_path) -> None:
    engine = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=CPU_FP32)
    requests = [
        request("Hello there."),
        request("A somewhat longer sentence for the second request.", max_new_tokens=12),
        request("Third.", max_new_tokens=5),
    ]
    batched = engine.synthesize_batch(requests)
    assert engine.max_batch_size >= len(requests)
    for req, chunk in zip(requests, batched, strict=True):
        single = engine.synthesize(req)
        assert chunk.sample_rate == single.sample_rate == engine.sample_rate
        assert chunk.samples.shape == single.samples.shape
        FP32_PIPELINE.check(chunk.samples, single.samples)  # whole-pipeline audio via a batch


def test_a_batch_validates_every_request_first(random_bundle, tmp_path) -> None:
    engine = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=CPU_FP32)
    good = request()
    bad = SynthesisRequest(text="Hi.", voice="Test Speaker", options={"top_k": "many"})
    with pytest.raises(InvalidRequest):
        engine.synthesize_batch([good, bad])
    assert not engine.loaded  # refused before any model work


@pytest.mark.slow
def test_low_vram_residency_moves_weights_per_request(random_bundle, tmp_path) -> None:
    """On the CPU the storage and compute devices are the same, but the manager's moves
    show the wiring: weights visit the compute device for each request only."""
    plan = Plan("cpu", "fp32", "low_vram", "float32", ["test"])
    engine = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=plan)
    engine.load()
    residency = engine._residency
    assert residency is not None and residency.moves == 0
    out = engine.synthesize(request())
    after_one = residency.moves
    assert after_one > 0 and not residency.busy
    engine.synthesize(request())
    assert residency.moves > after_one
    plain = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=CPU_FP32)
    FP32_REORDER.check(out.samples, plain.synthesize(request()).samples)  # another instance
    engine.set_low_vram(False)
    assert engine._residency is None and not engine.low_vram
    engine.set_low_vram(True)
    assert engine._residency is not None


@pytest.mark.slow
def test_toggles_on_a_cpu_plan(random_bundle, tmp_path) -> None:
    engine = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=CPU_FP32)
    engine.load()
    engine.set_low_vram(True)  # nothing to move without a GPU: remembered only
    assert engine.low_vram and engine._residency is None
    engine.set_fast_path(True)
    assert engine.fast_path
    assert engine.synthesize(request()).samples.size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_low_vram_on_a_gpu_frees_memory_between_requests(random_bundle, tmp_path) -> None:
    plan = Plan("cuda:0", "fp16", "low_vram", "float16", ["test"])
    engine = XttsEngine(random_bundle.path, cache_dir=tmp_path, plan=plan)
    engine.load()
    assert engine.model.gpt.mel_head.weight.device.type == "cpu"  # no start-up spike
    base = torch.cuda.memory_allocated()
    assert engine.synthesize(request()).samples.size > 0
    assert torch.cuda.memory_allocated() <= base + 1024**2


def test_vocoder_precision_setting_reaches_the_model(random_bundle, tmp_path) -> None:
    engine = XttsEngine.from_settings(settings(random_bundle, tmp_path, vocoder_precision="fp32"))
    engine.load()
    assert engine.model.hifigan_decoder.precision == "fp32"


def test_a_bf16_vocoder_on_a_gpu_plan_is_refused(random_bundle) -> None:
    gpu = Plan("cuda:0", "fp16", "gpu", "float16", ["test"])
    with pytest.raises(PlanError, match="CPU feature"):
        XttsEngine(random_bundle.path, plan=gpu, vocoder_precision="bf16")
    assert XttsEngine(random_bundle.path, plan=gpu).vocoder_precision == "fp32"


def test_low_vram_loads_into_ram_for_the_gpu_it_computes_on(random_bundle, monkeypatch) -> None:
    """The weights load on the CPU, in the form of the device that will run them."""
    from lowvox.engines.xtts import loader as loader_module

    seen = {}

    class Loaded(Exception):
        pass

    def fake_load(model_dir, device, precision, **kwargs):
        seen.update(device=device, precision=precision, **kwargs)
        raise Loaded

    monkeypatch.setattr(loader_module, "load_model", fake_load)
    plan = Plan("cuda:0", "bf16", "low_vram", "bfloat16", ["test"])
    with pytest.raises(Loaded):
        XttsEngine(random_bundle.path, plan=plan).load()
    assert seen["device"] == "cpu" and seen["run_on"] == "cuda:0"
    assert seen["precision"] == "bf16"
