"""Device planner: turn `device`, `precision` and `residency` settings into a concrete plan.

`auto` looks at the machine: the whole model on the GPU in fp16 when it fits, low-VRAM
residency (weights in RAM, moved to the GPU per request) when it does not, and the CPU with
int8 weights without a GPU (float32 activations through lowvox's kernel; prompts in bf16
on CPUs with native bf16 matrix units). Every choice can be
forced, and a forced choice the machine cannot honour is a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lowvox.errors import LowvoxError
from lowvox.runtime.devices import MachineInfo

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
RESIDENCIES = ("auto", "gpu", "low_vram", "cpu")

# Full-size XTTS v2 parameter counts (from full_size_layout.json): the GPT's linear layers
# are quantisable; the rest (embeddings, conditioning, HiFi-GAN, speaker encoder) stays fp32.
FULL_SIZE_PARAMS = 466_000_000
FULL_SIZE_GPT_LINEAR_PARAMS = 380_000_000
# Activations, KV cache for a few sequences, the vocoder's buffers and CUDA's own context.
GPU_WORKSPACE_BYTES = 450 * 1024**2


class PlanError(LowvoxError):
    status_code = 400


@dataclass(frozen=True)
class Plan:
    """Where and how the model runs, with the reasons for each choice."""

    device: str  # "cpu" or "cuda:N"
    precision: str  # fp32 | bf16 | fp16 | int8
    residency: str  # gpu | low_vram | cpu
    compute_dtype: str  # the dtype of activations: float32 | bfloat16 | float16
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = f"device={self.device} precision={self.precision} residency={self.residency}"
        return head + "".join(f"\n  - {r}" for r in self.reasons)


def model_bytes(
    precision: str, params: int = FULL_SIZE_PARAMS, linear: int = FULL_SIZE_GPT_LINEAR_PARAMS
) -> int:
    """Bytes the weights take in a precision (int8 only shrinks the GPT's linear layers)."""
    other = params - linear
    if precision == "fp32":
        return params * 4
    if precision in ("fp16", "bf16"):
        return linear * 2 + other * 4  # vocoder and speaker encoder stay fp32
    if precision == "int8":
        return linear * 1 + other * 4
    raise PlanError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    value = value.strip().lower()
    base, colon, index = value.partition(":")
    # Only a GPU takes an index ("cuda:1"); "cpu:0", "int8:x" or "cuda:x" are typos.
    indexed = name == "device" and base == "cuda"
    if base not in allowed or (colon and not (indexed and index.isascii() and index.isdigit())):
        choices = ", ".join(allowed) + (", cuda:N" if name == "device" else "")
        raise PlanError(f"unknown {name} {value!r} (choose from {choices})")
    return value


def check_device(device: str) -> str:
    """`device` normalised ("CUDA:1" -> "cuda:1"); PlanError for what no plan takes."""
    return _check_choice("device", device, DEVICES)


def plan(
    machine: MachineInfo,
    device: str = "auto",
    precision: str = "auto",
    residency: str = "auto",
    params: int = FULL_SIZE_PARAMS,
    linear_params: int = FULL_SIZE_GPT_LINEAR_PARAMS,
) -> Plan:
    device = _check_choice("device", device, DEVICES)
    precision = _check_choice("precision", precision, PRECISIONS)
    residency = _check_choice("residency", residency, RESIDENCIES)
    reasons: list[str] = []

    gpu = None
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        gpu = next((g for g in machine.gpus if g.index == index), None)
        if gpu is None:
            have = ", ".join(f"cuda:{g.index}" for g in machine.gpus) or "none"
            raise PlanError(
                f"device {device!r} asked for, but this machine has no such GPU (GPUs: {have})"
            )
        reasons.append(f"device {device} forced by settings")
    elif device == "auto" and machine.gpus and residency != "cpu":
        gpu = max(machine.gpus, key=lambda g: g.free_bytes)
        reasons.append(f"GPU found: {gpu.name} with {gpu.free_bytes / 1024**3:.1f} GiB free")
    elif device == "cpu":
        reasons.append("device cpu forced by settings")
    else:
        reasons.append("no CUDA GPU found: running on the CPU")

    if gpu is None:
        if residency in ("gpu", "low_vram"):
            raise PlanError(f"residency {residency!r} needs a GPU, but the plan runs on the CPU")
        if precision == "fp16":
            raise PlanError("precision fp16 needs a GPU: on the CPU use fp32, bf16 or int8")
        if precision == "auto":
            precision = "int8"
            reasons.append(
                "CPU: int8 weights for the GPT (it is memory-bound; 4x fewer bytes per token)"
            )
        if precision == "bf16":
            reasons.append(
                "CPU bf16: bf16 weights for the GPT (2x fewer bytes per token than fp32), "
                "float32 activations"
            )
            if not machine.cpu_has_bf16:
                reasons.append(
                    "this CPU has no native bf16: prompts run on lowvox's CPU kernels, "
                    "not matrix units (without those kernels, bf16 is slow)"
                )
        # int8 and bf16 layers pick their own compute (runtime/quant.py); the rest, and
        # every activation, is float32.
        return Plan("cpu", precision, "cpu", "float32", reasons)

    dev = f"cuda:{gpu.index}"
    if precision == "auto":
        precision = "fp16"
        reasons.append("GPU: fp16 weights and compute")
    need = model_bytes(precision, params, linear_params) + GPU_WORKSPACE_BYTES
    fits = need <= gpu.free_bytes
    if residency == "auto":
        residency = "gpu" if fits else "low_vram"
        reasons.append(
            f"model needs ~{need / 1024**3:.2f} GiB on the GPU in {precision}: "
            + ("fits, kept on the GPU" if fits else "does not fit, weights stay in RAM (low-VRAM)")
        )
    elif residency == "gpu" and not fits:
        raise PlanError(
            f"residency 'gpu' forced, but the model needs ~{need / 1024**3:.2f} GiB and "
            f"{dev} has {gpu.free_bytes / 1024**3:.2f} GiB free: use residency low_vram"
        )
    elif residency == "cpu":
        raise PlanError("residency 'cpu' contradicts a GPU device: set device cpu instead")
    compute = {"fp16": "float16", "bf16": "bfloat16", "int8": "bfloat16"}.get(precision, "float32")
    return Plan(dev, precision, residency, compute, reasons)
