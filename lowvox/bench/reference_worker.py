"""Run lowvox's benchmark workload through the reference implementation (coqui-tts).

This file is executed by *another* interpreter (a throwaway venv with coqui-tts), so it
imports nothing from lowvox. It reads one JSON object from argv[1] and prints one JSON
object on its last stdout line. The workload mirrors lowvox's: the same text token ids,
the same number of generated tokens with the stop token suppressed, greedy decoding.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    t0 = time.perf_counter()
    config = XttsConfig()
    if job.get("model_dir"):
        config.load_json(f"{job['model_dir']}/config.json")
        model = Xtts.init_from_config(config)
        model.load_checkpoint(config, checkpoint_dir=job["model_dir"], use_deepspeed=False)
    else:
        for key, value in job["model_args"].items():
            setattr(config.model_args, key, value)
        model = Xtts.init_from_config(config)
        model.gpt.init_gpt_for_inference(kv_cache=True, use_deepspeed=False)
    model.eval()
    load_s = time.perf_counter() - t0

    dim = model.args.gpt_n_model_channels
    cond = torch.randn(1, 32, dim) * 0.1
    spk = torch.nn.functional.normalize(torch.randn(1, 512, 1), dim=1)
    tokens = torch.tensor([job["tokens"]], dtype=torch.int32)
    n_new = int(job["new_tokens"])
    eos_len = n_new + 1  # HF counts the start token; keep the stop token away until the end

    def generate(n: int) -> torch.Tensor:
        return model.gpt.generate(
            cond_latents=cond,
            text_inputs=tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=float(job.get("repetition_penalty", 5.0)),
            max_new_tokens=n,
            min_new_tokens=min(n, eos_len),
            output_attentions=False,
        )

    with torch.inference_mode():
        generate(4)  # warm-up
        t = time.perf_counter()
        generate(1)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        codes = generate(n_new)
        gen_s = time.perf_counter() - t
        n_gen = int(codes.shape[-1])
        t = time.perf_counter()
        latents = model.gpt(
            tokens,
            torch.tensor([tokens.shape[-1]]),
            codes,
            torch.tensor([codes.shape[-1] * model.gpt.code_stride_len]),
            cond_latents=cond,
            return_attentions=False,
            return_latent=True,
        )
        latent_s = time.perf_counter() - t
        t = time.perf_counter()
        wav = model.hifigan_decoder(latents, g=spk).squeeze()
        vocoder_s = time.perf_counter() - t
    audio_s = wav.shape[-1] / model.args.output_sample_rate
    decode_ms = (gen_s - prefill_s) / max(n_gen - 1, 1) * 1000
    print(
        json.dumps(
            {
                "load_s": load_s,
                "prefill_s": prefill_s,
                "generated_tokens": n_gen,
                "decode_ms_per_token": decode_ms,
                "tokens_per_s": 1000 / decode_ms,
                "latent_pass_s": latent_s,
                "vocoder_s_per_audio_s": vocoder_s / audio_s,
                "audio_s": audio_s,
                "e2e_rtf": (gen_s + latent_s + vocoder_s) / audio_s,
                "peak_rss_bytes": _rss_peak_bytes(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
