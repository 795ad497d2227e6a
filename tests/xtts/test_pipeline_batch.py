"""The continuous batch (`pipeline.Batch`): utterances join and leave mid-decode, each with
its own options, voice, cancel and failure, and each gets what it would alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lowvox.engines.xtts.options import XttsOptions
from lowvox.engines.xtts.pipeline import Batch, Utterance, encode_text, synthesize
from lowvox.engines.xtts.voices import Voice
from lowvox.errors import Cancelled, InvalidRequest, LowvoxError
from tests.tolerance import FP32_PIPELINE

TEXTS = [
    "Hello there, how are you?",
    "A somewhat longer sentence for the second request. And a second sentence.",
    "Third.",
    "Numbers like 42 are spoken too.",
]


@pytest.fixture(scope="module")
def model(narrow_vocoder_model):
    """The golden GPT with a narrow vocoder: these tests are about who decodes and vocodes
    when, and the released-size HiFi-GAN would be most of their time."""
    return narrow_vocoder_model


def utterance(model, text: str, voice: Voice, **options) -> Utterance:
    opts = XttsOptions(**{"do_sample": False, "max_new_tokens": 24, **options})
    opts = opts.resolved(model.config)
    limit = model.config.model_args.gpt_max_text_tokens
    pieces = encode_text(model.tokenizer, text, "en", opts.split_sentences, limit)
    return Utterance(pieces, voice, opts)


def run(
    batch: Batch,
    plan: dict[int, list[Utterance]],
    cancel_at: dict[int, int] | None = None,
    bulk: set[int] = frozenset(),
    log: list[tuple[int, int, bool]] | None = None,
    sizes: list[tuple[int, int, int]] | None = None,
):
    """Step `batch`, adding plan[k] before step k; cancel utterance i (its index in the
    order added) before step cancel_at[i]; the utterances in `bulk` (by that index) are
    added as bulk. Each utterance's audio, codes and outcome; `log` gets (step, index,
    sentence ended) for every chunk, `sizes` (step, index, samples)."""
    cancel_at = cancel_at or {}
    ids: dict[int, int] = {}  # batch id -> order added
    cancels: dict[int, threading.Event] = {}
    wavs: dict[int, list[np.ndarray]] = {}
    codes: dict[int, list[np.ndarray]] = {}
    outcome: dict[int, object] = {}
    step = 0
    while step <= max(plan) or len(batch):
        for utt in plan.get(step, []):
            order = len(ids)
            cancels[order] = threading.Event()
            ids[batch.add(utt, cancels[order], bulk=order in bulk)] = order
            wavs[order], codes[order] = [], []
        for order, at in cancel_at.items():
            if at == step:
                cancels[order].set()
        for event in batch.step():
            order = ids[event.utterance]
            if event.chunk is not None:
                wavs[order].append(event.chunk.wav)
                if log is not None:
                    log.append((step, order, event.chunk.codes is not None))
                if sizes is not None:
                    sizes.append((step, order, event.chunk.wav.size))
                if event.chunk.codes is not None:
                    codes[order].append(event.chunk.codes)
            elif event.error is not None:
                outcome[order] = event.error
            elif event.done:
                outcome[order] = "done"
        step += 1
    return {
        order: (
            np.concatenate(wavs[order]) if wavs[order] else np.zeros(0),
            codes[order],
            outcome[order],
        )
        for order in ids.values()
    }


def record_steps(batch: Batch) -> list[set[int]]:
    """Filled as the batch runs: the decode rows each `batch.step()` decoded, one entry a
    step (empty for a step that decoded none)."""
    stepped: list[set[int]] = []
    step, decode = batch.step, batch.decoder.step

    def spy_step():
        stepped.append(set())
        return step()

    def spy_decode(only=None):
        steps = decode(only)
        stepped[-1].update(st.row for st in steps)
        return steps

    batch.step = spy_step  # type: ignore[method-assign]
    batch.decoder.step = spy_decode  # type: ignore[method-assign]
    return stepped


def assert_same_as_alone(model, utt: Utterance, result) -> None:
    wav, codes, outcome = result
    alone = synthesize(model, utt)
    assert outcome == "done"
    assert len(codes) == len(alone.codes)
    for got, want in zip(codes, alone.codes, strict=True):
        np.testing.assert_array_equal(got, want)  # token ids: exact
    assert wav.shape == alone.wav.shape
    FP32_PIPELINE.check(wav, alone.wav)


def test_rows_join_mid_decode_and_each_equals_alone(model, golden_voice) -> None:
    utts = [utterance(model, t, golden_voice) for t in TEXTS]
    batch = Batch(model, max_rows=4)
    # The second joins at step 3, the third at step 7, the fourth when others have left.
    results = run(batch, {0: [utts[0]], 3: [utts[1]], 7: [utts[2]], 30: [utts[3]]})
    for i, utt in enumerate(utts):
        assert_same_as_alone(model, utt, results[i])


def test_each_row_keeps_its_own_options_and_seed(model, golden_voice) -> None:
    utts = [
        utterance(model, TEXTS[0], golden_voice, do_sample=True, seed=1, temperature=0.7),
        utterance(model, TEXTS[1], golden_voice, do_sample=True, seed=2, top_k=5),
        utterance(model, TEXTS[2], golden_voice, max_new_tokens=6, speed=1.5),
    ]
    results = run(Batch(model, max_rows=3), {0: utts[:2], 2: utts[2:]})
    for i, utt in enumerate(utts):
        assert_same_as_alone(model, utt, results[i])


def test_a_cancelled_row_leaves_and_the_others_finish(model, golden_voice) -> None:
    utts = [utterance(model, t, golden_voice) for t in TEXTS[:3]]
    results = run(Batch(model, max_rows=3), {0: utts}, cancel_at={1: 5})
    assert isinstance(results[1][2], Cancelled)
    assert_same_as_alone(model, utts[0], results[0])
    assert_same_as_alone(model, utts[2], results[2])


def test_a_failing_row_fails_alone(model, golden_voice) -> None:
    good = [utterance(model, t, golden_voice) for t in TEXTS[:2]]
    broken_voice = Voice(torch.randn(1, 32, 7), golden_voice.speaker_embedding)  # wrong width
    bad = utterance(model, TEXTS[2], broken_voice)
    results = run(Batch(model, max_rows=3), {0: [good[0], bad], 1: [good[1]]})
    assert isinstance(results[1][2], LowvoxError)
    assert_same_as_alone(model, good[0], results[0])
    assert_same_as_alone(model, good[1], results[2])


def test_a_row_whose_token_choice_fails_fails_alone(model, golden_voice, monkeypatch) -> None:
    """An exception choosing one row's token mid-decode (here: for the generator seeded
    666) ends that utterance with its own error; its batch-mates finish as alone."""
    from lowvox.engines.xtts import decode

    real = decode.select_token

    def select(scores, do_sample, generator=None):
        if generator is not None and generator.initial_seed() == 666:
            raise RuntimeError("no token for this row")
        return real(scores, do_sample, generator)

    monkeypatch.setattr(decode, "select_token", select)
    good = [utterance(model, t, golden_voice) for t in TEXTS[:2]]
    bad = utterance(model, TEXTS[2], golden_voice, do_sample=True, seed=666)
    results = run(Batch(model, max_rows=3), {0: [good[0]], 2: [bad, good[1]]})
    assert isinstance(results[1][2], LowvoxError)
    monkeypatch.undo()
    assert_same_as_alone(model, good[0], results[0])
    assert_same_as_alone(model, good[1], results[2])


def test_a_near_zero_temperature_row_speaks_beside_others(model, golden_voice) -> None:
    """Options the validator accepts (a temperature of 1e-40 overflows the scores) once
    made `multinomial` raise inside the shared step, failing every request of the batch;
    now every row is spoken, each as alone."""
    utts = [
        utterance(model, TEXTS[0], golden_voice),
        utterance(model, TEXTS[1], golden_voice, do_sample=True, seed=3, temperature=1e-40),
        utterance(model, TEXTS[2], golden_voice, do_sample=True, seed=4),
    ]
    results = run(Batch(model, max_rows=3), {0: utts})
    for i, utt in enumerate(utts):
        assert_same_as_alone(model, utt, results[i])


@pytest.mark.parametrize("bad", ["nan_latent", "inf_embedding", "embedding_shape"])
def test_a_voice_with_non_finite_or_misshaped_tensors_fails_alone(
    model, golden_voice, bad: str
) -> None:
    """Sampled, a NaN voice's logits make its row's multinomial draw raise inside the
    shared decode step: every request batched with it failed. It must fail alone, with a
    clear error, before any of its tokens are decoded."""
    latent, emb = golden_voice.gpt_cond_latent.clone(), golden_voice.speaker_embedding.clone()
    if bad == "nan_latent":
        latent[0, 3, 5] = float("nan")
    elif bad == "inf_embedding":
        emb[0, 7, 0] = float("inf")
    else:
        emb = emb[:, :-1]
    good = utterance(model, TEXTS[0], golden_voice, do_sample=True, seed=3)
    broken = utterance(model, TEXTS[2], Voice(latent, emb), do_sample=True, seed=3)
    results = run(Batch(model, max_rows=2), {0: [good, broken]})
    assert isinstance(results[1][2], InvalidRequest) and results[1][2].field == "voice"
    assert results[1][1] == []  # no sentence of it was decoded
    assert_same_as_alone(model, good, results[0])


def test_bulk_rows_hold_their_vocoding_until_a_listener_has_audio(model, golden_voice) -> None:
    """Long-form sentences (bulk) beside an interactive request: no bulk chunk is vocoded
    from the interactive request's arrival until its first audio is out (not even a
    sentence's end), and the bulk rows' audio is the same, sample for sample, as without
    it."""
    long = [utterance(model, t, golden_voice, max_new_tokens=60) for t in TEXTS[:3]]
    quick = utterance(model, TEXTS[3], golden_voice, max_new_tokens=60)
    plan = {0: [long[0]], 5: [long[1]], 10: [long[2]]}
    solo_log: list[tuple[int, int, bool]] = []
    alone = run(Batch(model, max_rows=4), plan, bulk={0, 1, 2}, log=solo_log)
    log: list[tuple[int, int, bool]] = []
    mixed = run(Batch(model, max_rows=4), {**plan, 15: [quick]}, bulk={0, 1, 2}, log=log)
    first = min(step for step, order, _ in log if order == 3)

    def window(entries: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
        return [(st, o) for st, o, _ in entries if o < 3 and 15 <= st < first]

    assert window(solo_log)  # alone, bulk chunks fall in that window...
    assert not window(log)  # ...beside a listener waiting for audio, they wait
    assert any(order < 3 and step >= first for step, order, _ in log)  # then catch up
    for i in range(3):
        assert mixed[i][2] == "done"
        np.testing.assert_array_equal(mixed[i][0], alone[i][0])
    assert_same_as_alone(model, quick, mixed[3])


@pytest.mark.parametrize("in_hand", [True, False])
def test_listeners_mid_stream_wait_for_a_new_listeners_first_audio(
    in_hand, model, golden_voice
) -> None:
    """First audio first: from a new request's arrival until its first audio, an
    interactive row that already sends audio puts its vocoding off (a sentence's end too),
    however much audio its listener has in hand, then catches up. Every utterance's audio
    is the same, sample for sample."""
    a = utterance(model, TEXTS[1], golden_voice, max_new_tokens=90)
    b = utterance(model, TEXTS[3], golden_voice, max_new_tokens=40)
    ticks = iter(range(10**9))
    # A frozen clock: a's listener keeps all it was sent. A racing one (10 s a reading):
    # it has played everything long ago and waits.
    clock = (lambda: 0.0) if in_hand else (lambda: 10.0 * next(ticks))
    solo_sizes: list[tuple[int, int, int]] = []
    alone = run(Batch(model, max_rows=2, clock=clock), {0: [a]}, sizes=solo_sizes)
    # b arrives after a's first chunk, so that a's next chunk falls before b's first (a
    # chunk is 20 tokens; b's first comes 13 steps after it arrives).
    join = solo_sizes[0][0] + 10
    log: list[tuple[int, int, bool]] = []
    mixed = run(Batch(model, max_rows=2, clock=clock), {0: [a], join: [b]}, log=log)
    first = min(step for step, order, _ in log if order == 1)
    assert [st for st, _, _ in solo_sizes if join <= st < first]  # alone, a vocodes then
    assert not [st for st, o, _ in log if o == 0 and join <= st < first]
    assert any(o == 0 and st >= first for st, o, _ in log)  # then catches up
    np.testing.assert_array_equal(mixed[0][0], alone[0][0])
    assert mixed[0][2] == mixed[1][2] == "done"
    assert_same_as_alone(model, b, mixed[1])


def test_a_sentence_ending_while_a_new_listener_waits_is_finished_after(
    model, golden_voice
) -> None:
    """A listener's sentence whose decoding ends while a new listener waits for its first
    audio keeps its last audio back (its row leaves the decoder) and sends it after; the
    audio is the same, and the utterance's next sentence follows."""
    import dataclasses

    one = utterance(model, TEXTS[1], golden_voice, max_new_tokens=30)
    two = utterance(model, TEXTS[0], golden_voice, max_new_tokens=30)
    a = dataclasses.replace(one, pieces=one.pieces + two.pieces)  # two sentences
    b = utterance(model, TEXTS[3], golden_voice, max_new_tokens=30)
    solo: list[tuple[int, int, bool]] = []
    alone = run(Batch(model, max_rows=2, clock=lambda: 0.0), {0: [a]}, log=solo)
    end = min(st for st, _, last in solo if last)  # a's first sentence ends here, alone
    join = end - 4
    log: list[tuple[int, int, bool]] = []
    mixed = run(Batch(model, max_rows=2, clock=lambda: 0.0), {0: [a], join: [b]}, log=log)
    first = min(st for st, o, _ in log if o == 1)
    assert first > end  # b still waits when a's decoding of that sentence ends...
    assert not [st for st, o, _ in log if o == 0 and join <= st < first]  # ...a waits too
    assert min(st for st, o, last in log if o == 0 and last) >= first
    np.testing.assert_array_equal(mixed[0][0], alone[0][0])
    assert len(mixed[0][1]) == len(alone[0][1]) == len(a.pieces) == 2
    assert mixed[0][2] == "done"
    assert_same_as_alone(model, b, mixed[1])


def test_only_a_new_listeners_row_decodes_until_its_first_audio(model, golden_voice) -> None:
    """From a new listener's prefill to its first audio, the batch's steps decode its row
    alone (the others wait; their audio would wait anyway); then every row decodes again.
    Every utterance still gets what it would alone, tokens exactly."""
    utts = [utterance(model, t, golden_voice, max_new_tokens=50) for t in TEXTS[:3]]
    batch = Batch(model, max_rows=3)
    stepped = record_steps(batch)
    log: list[tuple[int, int, bool]] = []
    results = run(batch, {0: utts[:1], 20: utts[1:2], 24: utts[2:]}, log=log)
    firsts = [min(st for st, o, _ in log if o == order) for order in range(3)]
    # Rows are numbered as they join (one prefill per step: the second at step 20; the
    # third waits for the second's first audio).
    assert all(stepped[st] == {1} for st in range(20, firsts[1] + 1))
    assert firsts[1] < firsts[2] and all(
        stepped[st] == {2} for st in range(firsts[1] + 1, firsts[2] + 1)
    )
    assert stepped[firsts[2] + 1] == {0, 1, 2}
    for i, utt in enumerate(utts):
        assert_same_as_alone(model, utt, results[i])


@pytest.mark.parametrize("in_hand", [True, False])
def test_bulk_rows_wait_while_a_listener_is_short_of_audio(
    in_hand, model, golden_voice, monkeypatch
) -> None:
    """Bulk rows (a long-form job's sentences) decode beside a listener who has enough sent
    audio left to play; while the listener is short of it (`LISTENER_SLACK_S`), only the
    listener's row decodes, and no bulk chunk is vocoded. Either way every utterance's
    audio is the same, sample for sample."""
    from lowvox.engines.xtts import pipeline

    ticks = iter(range(10**9))
    if in_hand:
        # A frozen clock: the listener keeps all it was sent, and any of it is enough.
        clock = lambda: 0.0  # noqa: E731
        monkeypatch.setattr(pipeline, "LISTENER_SLACK_S", 0.0)
    else:
        clock = lambda: 10.0 * next(ticks)  # noqa: E731 -- it played everything long ago
    books = [utterance(model, t, golden_voice, max_new_tokens=60) for t in TEXTS[:2]]
    listener = utterance(model, TEXTS[3], golden_voice, max_new_tokens=40)
    plan = {0: books, 5: [listener]}
    alone = run(Batch(model, max_rows=3, clock=clock), {0: books}, bulk={0, 1})
    batch = Batch(model, max_rows=3, clock=clock)
    stepped = record_steps(batch)
    log: list[tuple[int, int, bool]] = []
    mixed = run(batch, plan, bulk={0, 1}, log=log)
    heard = [st for st, o, _ in log if o == 2]
    first, last = min(heard), max(heard)
    # Rows are numbered as they join: the books 0 and 1 (steps 0 and 1), the listener 2.
    window = range(first + 1, last)
    assert len(window) > 10
    if in_hand:
        assert any(stepped[st] == {0, 1, 2} for st in window)
    else:
        assert all(stepped[st] <= {2} for st in window)
        assert not [st for st, o, _ in log if o < 2 and st in window]
    for i in range(2):
        assert mixed[i][2] == "done"
        np.testing.assert_array_equal(mixed[i][0], alone[i][0])
    assert_same_as_alone(model, listener, mixed[2])


def test_the_decoder_steps_any_subset_of_its_rows(model, golden_voice) -> None:
    """Rows that sit out steps (`Decoder.step(only=...)`, in runs of cache rows that are
    not contiguous) choose the same tokens as rows stepped every time."""
    from lowvox.engines.xtts.decode import Decoder, DecodeRow

    utts = [utterance(model, t, golden_voice, max_new_tokens=30) for t in TEXTS]

    def rows() -> list[DecodeRow]:
        return [
            DecodeRow(golden_voice.gpt_cond_latent, u.pieces[0], u.options.sampling, 30)
            for u in utts
        ]

    def codes(decoder: Decoder, pattern) -> dict[int, list[int]]:
        ids = [decoder.add(r) for r in rows()]
        out: dict[int, list[int]] = {i: [] for i in ids}
        k = 0
        while len(decoder):
            for st in decoder.step(pattern(k, ids)):
                if not st.is_stop:
                    out[st.row].append(int(st.token))
            k += 1
        return out

    together = codes(Decoder(model.gpt, max_rows=4), lambda k, ids: None)
    # Rows 0 and 2 on even steps, 1 and 3 on odd ones: two runs of one row each.
    apart = codes(Decoder(model.gpt, max_rows=4), lambda k, ids: set(ids[k % 2 :: 2]))
    assert list(together.values()) == list(apart.values())
    assert all(together.values())


def test_a_held_backlog_is_caught_up_a_few_chunks_a_step(model, golden_voice) -> None:
    """After rows were held for a new listener, no step vocodes more than CHUNKS_PER_STEP
    chunks of rows already heard (first chunks and sentence ends aside), nor more than one
    of any row; the rows whose listeners have the least audio in hand go first. (Where the
    decoder steps every row whatever it is asked, as with CUDA graphs: otherwise the other
    rows wait out a new listener's first chunk and build no backlog.)"""
    import dataclasses

    from lowvox.engines.xtts.decode import Decoder
    from lowvox.engines.xtts.pipeline import CHUNKS_PER_STEP

    heard = [utterance(model, t, golden_voice, max_new_tokens=120) for t in TEXTS[:3]]
    # A late listener whose first chunk takes 24 tokens: every other row has a chunk due
    # (one every 20 tokens) while it waits.
    late = dataclasses.replace(
        utterance(model, TEXTS[3], golden_voice, max_new_tokens=40), first_chunk_tokens=24
    )
    # A clock that stands still: what each listener has in hand is what it was sent.
    plan = {0: heard[:1], 1: heard[1:2], 2: heard[2:3], 40: [late]}
    log: list[tuple[int, int, bool]] = []
    sizes: list[tuple[int, int, int]] = []
    batch = Batch(model, max_rows=4, clock=lambda: 0.0)
    batch.decoder.step = lambda only=None: Decoder.step(batch.decoder)  # type: ignore[method-assign]
    results = run(batch, plan, log=log, sizes=sizes)
    firsts = {o: min(st for st, oo, _ in log if oo == o) for o in range(4)}
    per_step: dict[int, list[int]] = {}
    for st, o, last in log:
        if not last and st > firsts[o]:
            per_step.setdefault(st, []).append(o)
    assert max(len(v) for v in per_step.values()) <= CHUNKS_PER_STEP
    assert all(len(set(v)) == len(v) for v in per_step.values())  # one chunk a row a step
    # All three were held while the late one waited: the next step serves the two sent
    # least so far, the third comes the step after.
    assert not [st for st in per_step if 40 <= st <= firsts[3] and set(per_step[st]) & {0, 1, 2}]
    sent = {o: sum(n for st, oo, n in sizes if oo == o and st <= firsts[3]) for o in range(3)}
    after = sorted(st for st in per_step if st > firsts[3])
    assert len(per_step[after[0]]) == CHUNKS_PER_STEP == 2
    assert sorted(per_step[after[0]]) == sorted(sorted(sent, key=sent.get)[:2])
    assert max(sent, key=sent.get) in per_step[after[1]] and after[1] == after[0] + 1
    for i, utt in enumerate([*heard, late]):
        assert_same_as_alone(model, utt, results[i])


def test_new_listeners_beyond_a_few_wait_for_a_first_audio(model, golden_voice) -> None:
    """Requests arriving together: FIRST_AUDIO_AT_ONCE are prefilled (one a step); the
    next waits until one of them has its first audio (so theirs are not pushed back by
    its prefill); all get what they would alone."""
    from lowvox.engines.xtts.pipeline import FIRST_AUDIO_AT_ONCE

    n = FIRST_AUDIO_AT_ONCE + 1
    texts = (TEXTS * n)[:n]
    utts = [utterance(model, t, golden_voice, max_new_tokens=40) for t in texts]
    log: list[tuple[int, int, bool]] = []
    results = run(Batch(model, max_rows=n), {0: utts}, log=log)
    firsts = [min(st for st, o, _ in log if o == order) for order in range(n)]
    # The last one's prefill comes after the others' first audio begins, and its own first
    # audio a first chunk of steps after that.
    assert firsts[-1] >= min(firsts[:-1]) + utts[-1].first_chunk_tokens
    assert max(firsts[:-1]) - min(firsts[:-1]) < utts[0].first_chunk_tokens  # together
    for i, utt in enumerate(utts):
        assert_same_as_alone(model, utt, results[i])


def test_a_step_that_prefills_a_bulk_sentence_vocodes_no_bulk_chunk(model, golden_voice) -> None:
    """Bulk work comes one heavy piece a step (a prompt or a chunk), so that a request
    arriving meanwhile waits for less; the audio is what each would be alone."""
    utts = [utterance(model, t, golden_voice, max_new_tokens=60) for t in TEXTS]
    batch = Batch(model, max_rows=4)
    prefills: list[int] = []
    real_add = batch.decoder.add
    step = [0]

    def add(row):
        prefills.append(step[0])
        return real_add(row)

    batch.decoder.add = add  # type: ignore[method-assign]
    real_step = batch.step

    def counted():
        events = real_step()
        step[0] += 1
        return events

    batch.step = counted  # type: ignore[method-assign]
    log: list[tuple[int, int, bool]] = []
    # The later prefills fall on steps where the first's chunks are due (its first after
    # 12 tokens, at step 11, then every 20).
    results = run(batch, {0: utts[:1], 31: utts[1:2], 51: utts[2:3], 52: utts[3:]},
                  bulk={0, 1, 2, 3}, log=log)  # fmt: skip
    chunks = {st for st, _, _ in log}
    assert prefills[:3] == [0, 31, 51] and len(prefills) == 4
    assert not chunks & set(prefills[1:])
    # The first's chunks come at the next step with no bulk prefill.
    assert {32, 53} <= {st for st, o, _ in log if o == 0}
    for i, utt in enumerate(utts):
        assert_same_as_alone(model, utt, results[i])


def test_an_interactive_sentence_is_prefilled_before_waiting_bulk_ones(model, golden_voice) -> None:
    utts = [utterance(model, t, golden_voice, max_new_tokens=13) for t in TEXTS]
    log: list[tuple[int, int, bool]] = []
    # All four arrive together; only the last is interactive; one prefill per step.
    run(Batch(model, max_rows=4), {0: utts}, bulk={0, 1, 2}, log=log)
    firsts = {order: min(s for s, o, _ in log if o == order) for order in range(4)}
    assert firsts[3] < min(firsts[0], firsts[1], firsts[2])


def test_admission_is_bounded_by_rows_and_kv_budget(model, golden_voice) -> None:
    utt = utterance(model, TEXTS[1], golden_voice)
    probe = Batch(model, max_rows=2)
    need = probe.positions(utt.pieces, utt.options)
    batch = Batch(model, max_rows=2, kv_positions=need + 10)
    assert batch.fits(utt.pieces, utt.options)  # an empty batch takes anything
    batch.add(utt)
    assert not batch.fits(utt.pieces, utt.options)  # a second would pass the budget
    roomy = Batch(model, max_rows=2, kv_positions=3 * need)
    roomy.add(utt)
    assert roomy.fits(utt.pieces, utt.options)
    roomy.add(utt)
    assert not roomy.fits(utt.pieces, utt.options)  # rows: full
    with pytest.raises(RuntimeError):
        roomy.add(utt)


@pytest.mark.slow
def test_int8_rows_in_a_batch_give_the_codes_they_give_alone(random_bundle, tmp_path) -> None:
    from lowvox.engines.xtts.loader import load_model

    model = load_model(random_bundle.path, precision="int8", cache_dir=tmp_path)
    voice = model.speakers["Test Speaker"]
    utts = [utterance(model, t, voice, max_new_tokens=16) for t in TEXTS]
    results = run(Batch(model, max_rows=4), {0: utts[:2], 4: utts[2:]})
    for i, utt in enumerate(utts):
        alone = synthesize(model, utt)
        for got, want in zip(results[i][1], alone.codes, strict=True):
            np.testing.assert_array_equal(got, want)
