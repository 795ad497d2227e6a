"""The device planner's choices for machines we describe (no GPU needed)."""

import pytest

from lowvox.runtime.devices import GpuInfo, MachineInfo, probe_machine
from lowvox.runtime.planner import PlanError, model_bytes, plan

GiB = 1024**3


def machine(gpus=(), flags=("avx2",)) -> MachineInfo:
    return MachineInfo("test cpu", 2, frozenset(flags), 24 * GiB, 20 * GiB, list(gpus))


def gpu(free_gib: float, index: int = 0) -> GpuInfo:
    return GpuInfo(index, "Test GPU", int(free_gib * GiB) + GiB, int(free_gib * GiB))


def test_cpu_only_machine_gets_int8_on_cpu():
    p = plan(machine())
    assert (p.device, p.precision, p.residency) == ("cpu", "int8", "cpu")
    assert any("no CUDA GPU" in r for r in p.reasons)


def test_big_gpu_gets_whole_model_in_fp16():
    p = plan(machine([gpu(16)]))
    assert (p.device, p.precision, p.residency, p.compute_dtype) == (
        "cuda:0",
        "fp16",
        "gpu",
        "float16",
    )


def test_small_gpu_falls_back_to_low_vram():
    p = plan(machine([gpu(0.8)]))
    assert p.residency == "low_vram"
    assert any("does not fit" in r for r in p.reasons)


def test_two_gigabyte_card_fits_fp16():
    # The fp16 model plus workspace must fit a 2 GB card (issue 5's target).
    assert model_bytes("fp16") + 450 * 1024**2 < 1.9 * GiB
    assert plan(machine([gpu(1.9)])).residency == "gpu"


def test_picks_gpu_with_most_free_memory():
    p = plan(machine([gpu(2, 0), gpu(10, 1)]))
    assert p.device == "cuda:1"


def test_forced_choices_are_honoured():
    p = plan(machine([gpu(16)]), device="cpu", precision="fp32")
    assert (p.device, p.precision, p.residency) == ("cpu", "fp32", "cpu")
    p = plan(machine([gpu(16)]), residency="low_vram", precision="int8")
    assert (p.residency, p.precision) == ("low_vram", "int8")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cuda"), "no such GPU"),
        (dict(device="cuda:3", gpus=[gpu(8)]), "no such GPU"),
        (dict(residency="low_vram"), "needs a GPU"),
        (dict(precision="fp16"), "fp16 needs a GPU"),
        (dict(precision="int4"), "unknown precision"),
        (dict(device="tpu"), "unknown device"),
        # A device index that is not a number is a typo, not a crash (`--device cuda:x`).
        (dict(device="cuda:x", gpus=[gpu(8)]), "unknown device 'cuda:x'"),
        (dict(device="cuda:", gpus=[gpu(8)]), "unknown device"),
        (dict(device="cpu:0"), "unknown device"),
        (dict(precision="int8:x"), "unknown precision"),
        (dict(residency="gpu", gpus=[gpu(0.5)]), "low_vram"),
    ],
)
def test_impossible_choices_are_clear_errors(kwargs, message):
    gpus = kwargs.pop("gpus", [])
    with pytest.raises(PlanError, match=message):
        plan(machine(gpus), **kwargs)


def test_bf16_on_cpu_keeps_float32_activations_and_warns_without_native_support():
    p = plan(machine(flags=("avx2",)), precision="bf16")
    assert p.compute_dtype == "float32"  # bf16 weights, float32 activations
    assert any("CPU bf16" in r for r in p.reasons)
    assert any("no native bf16" in r for r in p.reasons)
    p = plan(machine(flags=("avx512_bf16",)), precision="bf16")
    assert not any("no native bf16" in r for r in p.reasons)


def test_probe_this_machine():
    m = probe_machine()
    assert m.cpu_count >= 1
    assert plan(m).device  # whatever this machine is, auto gives a plan
