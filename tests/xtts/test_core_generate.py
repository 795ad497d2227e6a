"""The GPT and the decode loop: parity with the reference, and cache/stop/limit behaviour."""

from __future__ import annotations

import pytest
import torch

from lowvox.engines.xtts.decode import Decoder, DecodeRow, generate, voice_prefixes
from lowvox.engines.xtts.sampling import SamplingOptions
from lowvox.engines.xtts.vocode import LatentStretcher, stretch_latents
from tests.tolerance import FP32_OTHER_KERNELS, FP32_REORDER

GREEDY = SamplingOptions(repetition_penalty=5.0, do_sample=False)


def text_ids(golden_cases, case_id: int) -> torch.Tensor:
    case = next(c for c in golden_cases["text_cases"] if c["id"] == case_id)
    return torch.tensor([case["token_ids"]])


# ---------------------------------------------------------------------------------------------
# Golden parity


def test_teacher_forced_latents_match_reference(
    golden_model, golden_ref, golden_cases, close
) -> None:
    # tf.*: the reference's GPT forward (return_latent) over known codes, text case 0, voice 0.
    with torch.inference_mode():
        latents = golden_model.gpt.teacher_forced_latents(
            golden_ref["voice0.gpt_cond_latent"], text_ids(golden_cases, 0), golden_ref["tf.codes"]
        )
    close(latents, golden_ref["tf.latents"], "tf.latents")


def test_greedy_generation_matches_reference(
    golden_model, golden_ref, golden_cases, close, gen_case: int
) -> None:
    case_id = gen_case
    settings = golden_cases["generation"]
    options = SamplingOptions(
        repetition_penalty=settings["repetition_penalty"], do_sample=settings["do_sample"]
    )
    gen = generate(
        golden_model.gpt,
        DecodeRow(
            golden_ref["voice0.gpt_cond_latent"],
            text_ids(golden_cases, case_id),
            options,
            settings["max_new_tokens"],
        ),
    )
    assert torch.equal(gen.codes, golden_ref[f"gen{case_id}.codes"][0])
    close(gen.latents, golden_ref[f"gen{case_id}.latents"], f"gen{case_id}.latents")
    # gen*.logits: the raw (unprocessed) logits of the first 32 decoding steps.
    ref_logits = golden_ref[f"gen{case_id}.logits"]
    close(gen.logits[:, : ref_logits.shape[1]], ref_logits, f"gen{case_id}.logits")


# ---------------------------------------------------------------------------------------------
# Behaviour, on the test-made random model


def test_cached_decoding_equals_one_full_pass(random_model) -> None:
    gpt = random_model.gpt
    torch.manual_seed(1)
    cond = torch.randn(1, 32, gpt.dim)
    ids = torch.randint(30, 200, (1, 17))
    options = SamplingOptions(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=2.0)
    gen = generate(gpt, DecodeRow(cond, ids, options, 40, torch.Generator().manual_seed(5)))
    assert not gen.stopped and gen.codes.shape == (40,)
    with torch.inference_mode():
        full = gpt.teacher_forced_latents(cond, ids, gen.codes[None])
    # Decode steps against one pass: other kernels. The latents keep an atol ten times
    # tighter than FP32_OTHER_KERNELS' (a bound they have always met); the logits take the row.
    torch.testing.assert_close(gen.latents, full, atol=1e-5, rtol=1e-4)
    FP32_OTHER_KERNELS.check(gen.logits, gpt.logits(full))


def test_forced_codes_are_teacher_forcing_through_decode_steps(random_model) -> None:
    """Forced codes are fed as they are, whatever would be chosen, and the logits are
    those of the one-pass teacher-forced forward."""
    gpt = random_model.gpt
    torch.manual_seed(2)
    cond = torch.randn(1, 32, gpt.dim)
    ids = torch.randint(30, 200, (1, 9))
    codes = torch.randint(0, gpt.args.gpt_num_audio_tokens - 2, (12,))
    gen = generate(gpt, DecodeRow(cond, ids, GREEDY, 100, forced=codes))
    assert torch.equal(gen.codes, codes) and not gen.stopped
    with torch.inference_mode():
        full = gpt.logits(gpt.teacher_forced_latents(cond, ids, codes[None]))
    FP32_OTHER_KERNELS.check(gen.logits, full)
    assert not torch.equal(gen.logits.argmax(-1)[0], codes)  # not what greedy would pick


def test_static_shape_decode_step_matches_eager(random_model) -> None:
    """Per-row positions over the whole cache (the graph-capturable step) give the latents
    of the one-pass forward, for rows of different lengths in one batch."""
    gpt = random_model.gpt
    torch.manual_seed(2)
    conds = [torch.randn(1, 32, gpt.dim) for _ in range(2)]
    ids = [torch.randint(30, 200, (1, 11)), torch.randint(30, 200, (1, 4))]
    codes = torch.randint(0, 500, (2, 12))
    start = torch.tensor([[gpt.args.gpt_start_audio_token]])
    with torch.inference_mode():
        caches = gpt.make_caches(64, batch=2)
        lengths = []
        for r in range(2):
            prompt = torch.cat(
                [gpt.prompt_embeddings(conds[r], ids[r]), gpt.audio_embeddings(start, 0)], 1
            )
            gpt.hidden(prompt, 0, [c.rows(r, r + 1) for c in caches])
            lengths.append(prompt.shape[1])
        static = []
        for i in range(codes.shape[1]):
            seq = torch.tensor(lengths) + i
            audio = torch.full((2,), i + 1)
            static.append(gpt.decode(codes[:, i : i + 1], audio, seq, caches, static=True))
        steps = torch.cat(static, 1)  # [2, 12, D]
        for r in range(2):
            full = torch.cat([codes[r : r + 1], codes[r : r + 1, :1]], 1)
            expected = gpt.teacher_forced_latents(conds[r], ids[r], full)
            # Other kernels, with the tighter atol of test_cached_decoding_equals_one_full_pass.
            torch.testing.assert_close(steps[r : r + 1], expected[:, 1:], atol=1e-5, rtol=1e-4)


def test_conv1d_layers_swap_for_linear(random_bundle) -> None:
    from lowvox.engines.xtts.gpt import conv1d_to_linear
    from lowvox.engines.xtts.loader import load_model

    model = load_model(random_bundle.path)
    cond, ids = torch.randn(1, 32, model.gpt.dim), torch.randint(30, 200, (1, 9))
    before = generate(model.gpt, DecodeRow(cond, ids, GREEDY, 10))
    layers = model.config.model_args.gpt_layers
    assert conv1d_to_linear(model.gpt) == 4 * layers
    assert isinstance(model.gpt.gpt.h[0].mlp.c_fc, torch.nn.Linear)
    after = generate(model.gpt, DecodeRow(cond, ids, GREEDY, 10))
    assert torch.equal(before.codes, after.codes)
    # nn.Linear's kernels in place of Conv1D's, held to FP32_REORDER as it always was
    # (tighter than FP32_OTHER_KERNELS).
    FP32_REORDER.check(after.latents, before.latents)


def test_seeded_sampling_repeats_and_differs_by_seed(random_model) -> None:
    gpt = random_model.gpt
    cond, ids = torch.randn(1, 32, gpt.dim), torch.randint(30, 200, (1, 9))
    options = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0)

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return generate(gpt, DecodeRow(cond, ids, options, 25, g)).codes.tolist()

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_stop_token_ends_generation(random_model) -> None:
    gpt = random_model.gpt
    a = gpt.args
    cond, ids = torch.randn(1, 32, gpt.dim), torch.randint(30, 200, (1, 9))
    first = generate(gpt, DecodeRow(cond, ids, GREEDY, 12))
    assert not first.stopped and len(first.codes) == 12
    # With a huge bias on the stop token, the first step stops.
    bias = gpt.mel_head.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[a.gpt_stop_audio_token] = 1e4
        gen = generate(gpt, DecodeRow(cond, ids, GREEDY, 12))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert gen.stopped and gen.codes.numel() == 0
    assert gen.latents.shape == (1, 1, gpt.dim)  # the reference keeps the stop step's latent


def test_placeholders_count_for_the_repetition_penalty(random_model) -> None:
    gpt = random_model.gpt
    cond, ids = torch.randn(1, 32, gpt.dim), torch.randint(30, 200, (1, 9))
    bias = gpt.mel_head.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[1] = 50.0  # audio token 1 is the prompt placeholder id
        plain = generate(gpt, DecodeRow(cond, ids, SamplingOptions(do_sample=False), 1))
        strong = SamplingOptions(repetition_penalty=1e3, do_sample=False)
        penalised = generate(gpt, DecodeRow(cond, ids, strong, 1))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert plain.codes.tolist() == [1]
    assert penalised.codes.tolist() != [1]


def test_limits(random_model) -> None:
    gpt = random_model.gpt
    a = gpt.args
    cond = torch.randn(1, 32, gpt.dim)
    decoder = Decoder(gpt, max_rows=1)
    # A prompt longer than the position table is refused before any work (the pipeline
    # refuses such text as a request error long before it gets here).
    too_long = torch.full((1, a.gpt_max_text_tokens + 1), 40)
    with pytest.raises(ValueError):
        decoder.add(DecodeRow(cond, too_long, GREEDY, 5))
    with pytest.raises(ValueError):
        decoder.add(DecodeRow(cond, too_long[:, :5], GREEDY, 0))
    # max_new_tokens is capped at what the position table allows.
    gen = generate(gpt, DecodeRow(cond, too_long[:, :5], GREEDY, 10_000))
    assert len(gen.codes) <= a.max_generated_tokens
    decoder.add(DecodeRow(cond, too_long[:, :5], GREEDY, 3))
    with pytest.raises(RuntimeError):  # one row of room
        decoder.add(DecodeRow(cond, too_long[:, :5], GREEDY, 3))


@pytest.mark.parametrize("speed", [0.5, 0.8, 1.0, 1.25, 1.7, 3.0])
@pytest.mark.parametrize("piece", [1, 7, 20])
def test_incremental_stretch_equals_whole(speed: float, piece: int) -> None:
    latents = torch.randn(1, 53, 16)
    whole = stretch_latents(latents, speed)
    stretcher = LatentStretcher(speed)
    parts = []
    for i in range(0, 53, piece):
        parts.append(stretcher.push(latents[:, i : i + piece]))
        # Only the next output's two source frames are kept: a push's cost does not grow
        # with the sentence (it used to keep, and copy, every frame received).
        assert stretcher.held <= 2
    parts.append(stretcher.finish())
    joined = torch.cat([p for p in parts if p.numel()], dim=1)
    assert joined.shape == whole.shape
    FP32_REORDER.check(joined, whole)  # another chunking of one operation


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_voices_prompt_prefix_is_computed_once_and_reused(
    precision, random_bundle, random_model, tmp_path
) -> None:
    """A GPT's decoders run a voice's 32 latents through it once and copy their keys and
    values into the next prompt of that voice (same latents, by value): the cache and the
    tokens are exactly those of a fresh decoder. Other latents, or the same tensor
    changed in place, are run again. Where lowvox's CPU kernels take the prompt (int8), the
    split prompt is also, bit for bit, the whole prompt run at once."""
    from lowvox.engines.xtts.loader import load_model

    model = random_model if precision == "fp32" else load_model(
        random_bundle.path, precision="int8", cache_dir=tmp_path
    )  # fmt: skip
    gpt = model.gpt
    torch.manual_seed(3)
    cond, other = torch.randn(1, 32, gpt.dim), torch.randn(1, 32, gpt.dim)
    ids = torch.randint(30, 200, (1, 21))
    lengths: list[int] = []
    real = gpt.gpt.forward

    def spy(x, *args, **kwargs):
        lengths.append(x.shape[1])
        return real(x, *args, **kwargs)

    def prefill(decoder: Decoder, latents: torch.Tensor) -> torch.Tensor:
        lengths.clear()
        decoder.add(DecodeRow(latents, ids, GREEDY, 4))
        return torch.stack([c.k[len(decoder) - 1, :, :60] for c in decoder._caches])

    gpt.gpt.forward = spy
    try:
        reusing = Decoder(gpt, max_rows=5)
        first = prefill(reusing, cond)
        assert lengths == [32, 24]  # the voice, then text and the start token
        again = prefill(reusing, cond.clone())  # equal latents, another tensor
        assert lengths == [24]
        assert torch.equal(again, first)
        # Another decoder of this GPT (each `stream` makes one) finds it kept too.
        assert torch.equal(prefill(Decoder(gpt, max_rows=4), cond), first)
        assert lengths == [24]
        prefill(reusing, other)
        assert lengths == [32, 24]
        cond += 1.0  # in place: no longer what was kept
        prefill(reusing, cond)
        assert lengths == [32, 24]
        prefill(reusing, other)  # kept, though not the latest
        assert lengths == [24]
    finally:
        del gpt.gpt.forward
    # Where lowvox's kernels take a prompt's rows: not on a CPU whose torch bf16 matmul
    # takes them instead (AMX switched off, LOWVOX_AMX=0), whose sums vary with the rows.
    from lowvox.runtime import kernels
    from lowvox.runtime.quant import cpu_has_fast_bf16

    on_kernels = kernels.available() and (
        kernels.amx() or kernels.int8_panels() or not cpu_has_fast_bf16()
    )
    if precision == "int8" and on_kernels:
        whole = Decoder(gpt, max_rows=1)
        caches = whole._ensure(1, 60)
        emb = torch.cat([gpt.prompt_embeddings(cond, ids), gpt.audio_embeddings(
            torch.full((1, 1), gpt.args.gpt_start_audio_token), 0)], dim=1)  # fmt: skip
        with torch.inference_mode():
            gpt.gpt(emb, 0, [c.rows(0, 1) for c in caches])
        split = Decoder(gpt, max_rows=1)
        with torch.inference_mode():
            split.add(DecodeRow(cond, ids, GREEDY, 4))
        n = emb.shape[1]
        for a, b in zip(whole._caches, split._caches, strict=True):
            assert torch.equal(a.k[0, :, :n], b.k[0, :, :n])
            assert torch.equal(a.v[0, :, :n], b.v[0, :, :n])


def test_a_gpts_kept_voice_prefixes_go_when_its_weights_change(random_bundle) -> None:
    """Kept keys/values belong to the weights that made them: after an in-place change of
    one block's weights, or in another model of the same checkpoint, the voice is run
    again, and what the changed weights give is what a fresh model with them gives."""
    from lowvox.engines.xtts.loader import load_model

    torch.manual_seed(4)
    ids = torch.randint(30, 200, (1, 9))

    def prefill(gpt, cond: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        lengths: list[int] = []
        real = gpt.gpt.forward

        def spy(x, *args, **kwargs):
            lengths.append(x.shape[1])
            return real(x, *args, **kwargs)

        gpt.gpt.forward = spy
        try:
            decoder = Decoder(gpt, max_rows=1)
            decoder.add(DecodeRow(cond, ids, GREEDY, 4))
        finally:
            del gpt.gpt.forward
        return lengths, torch.stack([c.k[0, :, :32] for c in decoder._caches])

    model = load_model(random_bundle.path)  # its own: its weights are changed below
    cond = torch.randn(1, 32, model.gpt.dim)
    assert prefill(model.gpt, cond)[0] == [32, 12]
    lengths, before = prefill(model.gpt, cond)
    assert lengths == [12]
    with torch.no_grad():
        model.gpt.gpt.h[1].attn.c_attn.weight.mul_(1.5)
    lengths, after = prefill(model.gpt, cond)
    assert lengths == [32, 12]  # run again
    assert len(voice_prefixes(model.gpt)) == 1  # the old weights' keys/values went
    assert torch.equal(after[0], before[0])  # block 0's keys come before the change
    assert not torch.equal(after[1:], before[1:])

    fresh = load_model(random_bundle.path)
    with torch.no_grad():
        fresh.gpt.gpt.h[1].attn.c_attn.weight.mul_(1.5)
    lengths, expected = prefill(fresh.gpt, cond)
    assert lengths == [32, 12]  # another model keeps its own
    assert torch.equal(after, expected)
