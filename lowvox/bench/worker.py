"""One benchmark case, run in its own process so that peak memory is its own.

Invoked as `python -m lowvox.bench.worker '<json>'`; prints one JSON line of results.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from lowvox.engines.xtts.model import XttsModel
    from lowvox.engines.xtts.pipeline import Utterance
    from lowvox.engines.xtts.voices import Voice


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_job_model(job: dict[str, Any]) -> XttsModel:
    from lowvox.engines.xtts.loader import load_model

    return load_model(
        job["model_dir"],
        device=job.get("device", "cpu"),
        precision=job["precision"],
        cache_dir=job.get("cache_dir"),
    )


def bench_voice(model: XttsModel, seed: int = 0) -> Voice:
    """A studio speaker when the model has one; else fixed random latents."""
    from lowvox.engines.xtts.voices import Voice

    if model.speakers:
        return next(iter(model.speakers.values()))
    g = torch.Generator().manual_seed(seed)
    dim = model.config.model_args.gpt_n_model_channels
    cond = torch.randn(1, 32, dim, generator=g) * 0.1
    spk = torch.nn.functional.normalize(torch.randn(1, 512, 1, generator=g), dim=1)
    return Voice(cond, spk, name="bench")


def suppress_stop_token(model: XttsModel) -> None:
    """Timing runs decode a fixed number of tokens: the stop token is never chosen."""
    stop = model.config.model_args.gpt_stop_audio_token
    with torch.no_grad():
        model.gpt.mel_head.bias[stop] = -1e4


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(job: dict[str, Any]) -> dict[str, Any]:
    from lowvox.engines.xtts.decode import Decoder, DecodeRow, generate
    from lowvox.engines.xtts.options import XttsOptions
    from lowvox.engines.xtts.pipeline import Utterance, encode_text, stream, synthesize, vocode
    from lowvox.engines.xtts.pipeline import warm_up as warm_up_vocoder
    from lowvox.engines.xtts.sampling import SamplingOptions
    from lowvox.runtime import kernels
    from lowvox.runtime.devices import probe_machine

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = job.get("device", "cpu")
    t0 = time.perf_counter()
    model = load_job_model(job)
    load_s = time.perf_counter() - t0
    tokenizer = model.tokenizer
    assert tokenizer is not None  # set by the loader
    suppress_stop_token(model)
    voice = bench_voice(model)
    n_new = int(job["new_tokens"])
    ids = tokenizer.encode(job["text"].strip().lower(), "en")
    text_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    options = SamplingOptions(
        repetition_penalty=float(job.get("repetition_penalty", 5.0)), do_sample=False
    )
    result: dict[str, Any] = {
        "precision": job["precision"],
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_model": probe_machine(with_gpus=False).cpu_model,
        "cpu_kernels": kernels.describe(with_path=False),
        "text_tokens": len(ids),
        "load_s": load_s,
    }

    with torch.inference_mode():
        # Warm-up: a short generation and vocoding, as the server does at start-up.
        warm = generate(model.gpt, DecodeRow(voice.gpt_cond_latent, text_ids, options, 8))
        vocode(model, warm.latents, voice)
        warm_up_vocoder(model)

        # The machine's floor, measured now, right before the timed decode (see `floor`).
        result.update(_floor(model, device))

        times, latents = [], []
        _sync(device)
        start = time.perf_counter()
        decoder = Decoder(model.gpt, max_rows=1)
        decoder.add(DecodeRow(voice.gpt_cond_latent, text_ids, options, n_new))
        while len(decoder):
            (step,) = decoder.step()
            _sync(device)
            times.append(time.perf_counter())
            latents.append(step.latent)
        n = len(times)
        prefill_s = times[0] - start
        decode_s = times[-1] - times[0]
        result.update(
            generated_tokens=n,
            prefill_s=prefill_s,
            decode_ms_per_token=decode_s / max(n - 1, 1) * 1000,
            tokens_per_s=(n - 1) / decode_s if decode_s > 0 else float("nan"),
        )
        if "floor_ms_per_token" in result:
            result["floor_ratio"] = result["decode_ms_per_token"] / result["floor_ms_per_token"]

        lat = torch.cat(latents, dim=1)
        # The vocoder's speed, not its start-up: oneDNN builds its kernels once per input
        # length (the fused path's pieces and tail), so they are built by one untimed call.
        vocode(model, lat, voice)
        t = time.perf_counter()
        wav = vocode(model, lat, voice)
        _sync(device)
        vocoder_s = time.perf_counter() - t
        audio_s = len(wav) / model.sample_rate
        result.update(audio_s=audio_s, vocoder_s_per_audio_s=vocoder_s / audio_s)

    # End to end through the pipeline, text in, audio out.
    opts = XttsOptions(do_sample=False, max_new_tokens=n_new, split_sentences=False)
    opts = opts.resolved(model.config)

    def utterance(text: str) -> Utterance:
        limit = model.config.model_args.gpt_max_text_tokens
        return Utterance(encode_text(tokenizer, text, "en", False, limit), voice, opts)

    t = time.perf_counter()
    out = synthesize(model, utterance(job["text"]))
    e2e_s = time.perf_counter() - t
    result["e2e_rtf"] = e2e_s / (len(out.wav) / model.sample_rate)
    # What a process that loads the model and speaks needs (before streaming and batches).
    result["speak_peak_rss_bytes"] = _peak_rss_bytes()

    # Streaming: time from the request to the first audio chunk.
    t = time.perf_counter()
    chunks = stream(model, utterance(job["text"]))
    next(chunks)
    result["stream_first_audio_s"] = time.perf_counter() - t
    chunks.close()

    for batch in job.get("batch_sizes", []):
        if batch <= 1:
            continue
        texts = [f"{job['text']} Number {i}." for i in range(batch)]
        t = time.perf_counter()
        total_audio = _speak_together(model, [utterance(x) for x in texts], batch)
        elapsed = time.perf_counter() - t
        result[f"batch{batch}_rtf"] = elapsed / total_audio

    result["peak_rss_bytes"] = _peak_rss_bytes()
    if device.startswith("cuda"):
        result["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _floor(model: XttsModel, device: str) -> dict[str, Any]:
    """Read bandwidth (in a child process, with this process's threads), the GPT weight
    bytes one decode step streams, and their quotient, the floor in ms/token."""
    from lowvox.bench.floor import decode_weight_bytes, floor_ms_per_token, measure_in_child
    from lowvox.errors import LowvoxError

    weight_bytes = decode_weight_bytes(model.gpt)
    try:
        probe = measure_in_child(torch.get_num_threads(), device)
    except LowvoxError as e:  # the timings still count; the table says why no floor
        return {"decode_weight_bytes": weight_bytes, "floor_error": str(e)}
    bytes_per_s = probe["read_bandwidth_gb_per_s"] * 1e9
    return probe | {
        "decode_weight_bytes": weight_bytes,
        "floor_ms_per_token": floor_ms_per_token(weight_bytes, bytes_per_s),
    }


def _speak_together(model: XttsModel, utterances: list[Utterance], rows: int) -> float:
    """Speak `utterances` in one continuous batch of `rows`; the seconds of audio made."""
    from lowvox.engines.xtts.pipeline import Batch

    batch = Batch(model, max_rows=rows)
    samples = 0
    waiting = list(utterances)
    while waiting or len(batch):
        while waiting and len(batch) < rows:
            batch.add(waiting.pop(0))
        for event in batch.step():
            if event.error is not None:
                raise event.error
            if event.chunk is not None:
                samples += event.chunk.wav.size
    return samples / model.sample_rate


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        result = run(job)
    except Exception as e:  # reported to the parent, which prints it in the table
        result = {
            "precision": job.get("precision"),
            "device": job.get("device"),
            "error": f"{type(e).__name__}: {e}",
        }
    print(json.dumps(result, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))


if __name__ == "__main__":
    main()
