"""The suite's one tolerance policy for comparing numbers (CONTRIBUTING.md, "Tolerances").

Exact, always: token ids, audio codes, text, sentence splits, integer data, tensors that
went through a file and back, what is exact by construction (copies, masks, -inf
filtering, the very same torch op on the same input), and one computation repeated on the
same model instance in the same process with the same thread count (determinism). Exact
comparisons never cross model instances, thread counts, kernel builds or CPUs: the same
fp32 maths summed in another order differs in the last bits (two loads of one model
measured 5.4e-7 apart in vocoder audio on an AMD EPYC).

Floats are compared with one of the rows below, chosen by what differs between the two
sides; every row is an absolute bound plus a relative one (`|a - e| <= atol + rtol*|e|`,
as `torch.testing.assert_close`). Reduced precisions are judged as a user hears them:
`snr_db` of audio, cosine and top-1 of logits, with the bounds named here.

A test never loosens a bound to fit a row: where a test's own bound is tighter than the
row for its case (e.g. relative to the peak of quiet audio, or against a float64
reference), it keeps that bound with a comment saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    """`|actual - expected| <= atol + rtol * |expected|`, elementwise."""

    atol: float
    rtol: float

    def check(self, actual, expected, msg: str = "") -> None:
        """Assert `actual` is within this tolerance of `expected` (numpy or torch)."""
        a, e = _tensor(actual), _tensor(expected)
        torch.testing.assert_close(
            a, e.to(a.dtype), atol=self.atol, rtol=self.rtol, msg=(lambda m: f"{msg} {m}".strip())
        )

    def holds(self, actual, expected) -> bool:
        a, e = _tensor(actual), _tensor(expected)
        return a.shape == e.shape and bool(torch.allclose(a, e.to(a.dtype), self.rtol, self.atol))


def _tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().cpu()


# fp32, the same maths in another order: another model instance, thread count, kernel build
# (AVX-512 / AVX2 / portable / torch) or CPU, another chunking of one operation.
FP32_REORDER = Tolerance(atol=1e-5, rtol=1e-5)

# fp32, the same maths through other kernels: fused C block vs torch ops, a static KV cache
# vs a growing one, a padded batch row vs the sequence alone (latents and logits).
FP32_OTHER_KERNELS = Tolerance(atol=1e-4, rtol=1e-4)

# fp32 against the reference implementation (coqui-tts) in the golden bundle: the bundle's
# own bound for latents, logits, conditioning, speaker embeddings and waveforms; also
# whole-pipeline audio (GPT latents into the vocoder) through another path, e.g. a batch.
FP32_PIPELINE = Tolerance(atol=1e-3, rtol=0.0)

# bf16 weights or activations against fp32 (8 significant bits: ~2 decimal digits).
BF16 = Tolerance(atol=2e-2, rtol=1e-2)

# Audio judged by ear: streamed vs whole-utterance vocoding of the same latents (cross-fades
# at chunk joins), and a reduced-precision vocoder against fp32.
MIN_STREAM_SNR_DB = 40.0
MIN_REDUCED_VOCODER_SNR_DB = 30.0

# Reduced-precision GPT logits against fp32 (the runtime issue's fidelity bounds).
MIN_LOGIT_COSINE = 0.999
MIN_TOP1_AGREEMENT = 0.99


def snr_db(reference: np.ndarray, x: np.ndarray) -> float:
    """Signal-to-noise ratio of `x` against `reference` in dB (inf when identical)."""
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    noise = float(np.sum((reference - x) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(float(np.sum(reference**2)) / noise)
