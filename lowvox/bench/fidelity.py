"""How far reduced precision moves the model's outputs from fp32.

Teacher-forced: fp32 picks greedy codes once; both models then score the same sequence,
so one early disagreement cannot snowball. Reported: cosine of the logit vectors, top-1
agreement per position, and the vocoder's SNR on the same latents (a float in dB, inf where
the audio is identical). The test model scores the codes twice: in one pass (the prompt's
path) and fed one decode step at a time (the kernels generation runs, e.g. int8 decode
steps' int16 activations).

Sampling does not take the top-1: it draws from the distribution the logits processors
leave (repetition penalty, temperature, top-k, top-p, with the checkpoint's defaults). At
each decode step along the same fp32 sequence, both models' logits go through the engine's
own processors with the history the sampler would have seen, and the report gives the
total-variation distance between the two distributions (mean and max over steps): the
largest difference, over any set of tokens, in the probability of drawing from that set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lowvox.bench.run import BenchOptions
    from lowvox.engines.xtts.model import XttsModel
    from lowvox.engines.xtts.sampling import SamplingOptions

FIDELITY_TOKENS = 120


def _snr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    n = min(ref.numel(), test.numel())
    ref, test = ref.flatten()[:n].double(), test.flatten()[:n].double()
    noise = (ref - test).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref.pow(2).sum().item() / noise)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance of probability distributions over the last dim: [..., V]
    twice -> [...], in [0, 1] (0: identical, 1: disjoint supports)."""
    return 0.5 * (p.double() - q.double()).abs().sum(dim=-1)


def sampling_distributions(
    logits: torch.Tensor, seen: torch.Tensor, options: SamplingOptions
) -> torch.Tensor:
    """Raw logits [N, V] and the ids seen before each row [N, V] -> the probabilities the
    sampler draws from [N, V], through the engine's own processors (`process_logits`)."""
    from lowvox.engines.xtts.sampling import process_logits

    return process_logits(logits.float(), seen, options).softmax(dim=-1)


def teacher_forced_seen(codes: torch.Tensor, start_token: int, vocab: int) -> torch.Tensor:
    """[1, N] codes -> [N, V]: row i is what the decoder's repetition penalty has seen when
    it chooses code i (the prompt's placeholder and start ids, then codes 0..i-1)."""
    from lowvox.engines.xtts.decode import PROMPT_PLACEHOLDER_ID
    from lowvox.engines.xtts.sampling import seen_mask

    history = codes.new_tensor([[PROMPT_PLACEHOLDER_ID, start_token]])
    return torch.cat(
        [seen_mask(torch.cat([history, codes[:, :i]], dim=1), vocab) for i in range(codes.shape[1])]
    )


def default_sampling(model: XttsModel) -> SamplingOptions:
    """The sampling options a request without options gets from this checkpoint (sampling
    on, whatever the config says: the distribution is what is measured)."""
    from lowvox.engines.xtts.options import XttsOptions

    return XttsOptions(do_sample=True).resolved(model.config).sampling


# Teacher-forced positions decide top-1 agreement in steps of 1/positions: several
# sentences make the figure precise enough to compare with a 99% target.
EXTRA_TEXTS = (
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Numbers like 42 and 1,337 are read out loud, as are dates such as June 5th.",
)


@torch.inference_mode()
def compare(
    reference: XttsModel, test: XttsModel, texts: str | Sequence[str], tokens: int = FIDELITY_TOKENS
) -> dict[str, Any]:
    """Teacher-forced comparison over each text's `tokens` greedy fp32 codes, pooled."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    parts = [_compare_one(reference, test, text, tokens) for text in texts]
    cos = torch.cat([p[0] for p in parts])
    agree = torch.cat([p[1] for p in parts]).float().mean().item()
    snr = _snr_db(torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]))
    cos_steps = torch.cat([p[4] for p in parts])
    agree_steps = torch.cat([p[5] for p in parts]).float().mean().item()
    tv = torch.cat([p[6] for p in parts])
    return {
        "logit_cosine_mean": cos.mean().item(),
        "logit_cosine_min": cos.min().item(),
        "top1_agreement": agree,
        "decode_logit_cosine_mean": cos_steps.mean().item(),
        "decode_logit_cosine_min": cos_steps.min().item(),
        "decode_top1_agreement": agree_steps,
        "sampling_tv_mean": tv.mean().item(),
        "sampling_tv_max": tv.max().item(),
        "sampling_options": asdict(default_sampling(reference)),
        "vocoder_snr_db": snr,  # inf where the two vocoders' audio is identical
        "positions": int(cos.numel()),
    }


def _compare_one(
    reference: XttsModel, test: XttsModel, text: str, tokens: int
) -> tuple[torch.Tensor, ...]:
    """Per-position logit cosines and top-1 matches (one pass), both vocoders' audio, the
    cosines and matches of the decode-step logits, and the decode steps' sampling TV
    distances, for one text."""
    from lowvox.bench.worker import bench_voice, suppress_stop_token
    from lowvox.engines.xtts.decode import DecodeRow, generate
    from lowvox.engines.xtts.pipeline import vocode
    from lowvox.engines.xtts.sampling import SamplingOptions

    voice = bench_voice(reference)
    assert reference.tokenizer is not None  # set by the loader
    ids = torch.tensor([reference.tokenizer.encode(text.strip().lower(), "en")])
    opts = SamplingOptions(repetition_penalty=5.0, do_sample=False)
    # Pick a fixed-length code sequence with the stop token suppressed, then score it with
    # the unmodified heads of both models.
    bias = reference.gpt.mel_head.bias.clone()
    suppress_stop_token(reference)
    gen = generate(reference.gpt, DecodeRow(voice.gpt_cond_latent, ids, opts, tokens))
    reference.gpt.mel_head.bias.copy_(bias)
    codes = gen.codes.view(1, -1)
    ref_logits = reference.gpt.logits(
        reference.gpt.teacher_forced_latents(voice.gpt_cond_latent, ids, codes)
    ).float()
    test_latents = test.gpt.teacher_forced_latents(
        voice.gpt_cond_latent.to(test.device), ids.to(test.device), codes.to(test.device)
    )
    test_logits = test.gpt.logits(test_latents).float().to(ref_logits.device)
    cos = torch.nn.functional.cosine_similarity(ref_logits, test_logits, dim=-1).flatten()
    agree = (ref_logits.argmax(-1) == test_logits.argmax(-1)).flatten()
    row = DecodeRow(voice.gpt_cond_latent.to(test.device), ids, opts, tokens, forced=codes)
    stepped = generate(test.gpt, row)
    step_logits = stepped.logits.float().to(ref_logits.device)
    cos_steps = torch.nn.functional.cosine_similarity(ref_logits, step_logits, dim=-1).flatten()
    agree_steps = (ref_logits.argmax(-1) == step_logits.argmax(-1)).flatten()
    # What sampling sees at each step: fp32's distribution against the test model's decode
    # step, both after the default processors with the same history.
    args = reference.config.model_args
    seen = teacher_forced_seen(codes, args.gpt_start_audio_token, args.gpt_num_audio_tokens)
    sampling = default_sampling(reference)
    vocab = ref_logits.shape[-1]
    tv = total_variation(
        sampling_distributions(ref_logits.reshape(-1, vocab), seen, sampling),
        sampling_distributions(step_logits.reshape(-1, vocab), seen, sampling),
    )
    ref_wav = torch.from_numpy(vocode(reference, gen.latents, voice))
    test_wav = torch.from_numpy(vocode(test, gen.latents.to(test.device), voice))
    n = min(ref_wav.numel(), test_wav.numel())
    return cos, agree, ref_wav[:n], test_wav[:n], cos_steps, agree_steps, tv


def fidelity_report(
    folder: Path, precisions: list[str], opts: BenchOptions
) -> dict[str, list[dict[str, Any]]]:
    from lowvox.engines.xtts.loader import load_model

    sources = {"model": folder}
    if opts.golden_dir is not None:
        sources["golden"] = opts.golden_dir
    report: dict[str, list[dict[str, Any]]] = {}
    for name, path in sources.items():
        reference = load_model(path, precision="fp32", cache_dir=opts.cache_dir)
        rows = []
        for precision in precisions:
            test = load_model(path, precision=precision, cache_dir=opts.cache_dir)
            texts = [opts.text, *EXTRA_TEXTS]
            rows.append({"precision": precision, **compare(reference, test, texts)})
            del test
        report[name] = rows
    return report
