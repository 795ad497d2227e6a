"""The fixed benchmark workload, shared by lowvox's runner and the reference worker."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SENTENCE = (
    "The quick brown fox jumps over the lazy dog, and then it runs back home "
    "to tell everyone what happened."
)
DEFAULT_NEW_TOKENS = 215  # about ten seconds of audio at 21.5 tokens per second

# model_args of the released XTTS v2 checkpoint (coqui/XTTS-v2 config.json), used to build
# the full-size architecture with random weights when no checkpoint is at hand.
FULL_SIZE_MODEL_ARGS = {
    "gpt_layers": 30,
    "gpt_n_model_channels": 1024,
    "gpt_n_heads": 16,
    "gpt_number_text_tokens": 6681,
    "gpt_start_text_token": 261,
    "gpt_stop_text_token": 0,
    "gpt_max_audio_tokens": 605,
    "gpt_max_text_tokens": 402,
    "gpt_max_prompt_tokens": 70,
    "gpt_num_audio_tokens": 1026,
    "gpt_start_audio_token": 1024,
    "gpt_stop_audio_token": 1025,
    "gpt_code_stride_len": 1024,
    "gpt_use_masking_gt_prompt_approach": True,
    "gpt_use_perceiver_resampler": True,
    "input_sample_rate": 22050,
    "output_sample_rate": 24000,
    "output_hop_length": 256,
    "decoder_input_dim": 1024,
    "d_vector_dim": 512,
    "cond_d_vector_in_each_upsampling_layer": True,
    "duration_const": 102400,
}


@dataclass(frozen=True)
class Workload:
    """What one benchmark run decodes: text token ids and how many audio tokens to make."""

    token_ids: list[int]
    new_tokens: int = DEFAULT_NEW_TOKENS
    repetition_penalty: float = 5.0


def synthetic_token_ids(text: str, number_text_tokens: int) -> list[int]:
    """Stand-in ids for random weights: one BPE-like token per ~3 characters, fixed by the text."""
    n = max(1, len(text) // 3)
    return [
        1 + (sum(map(ord, text[i * 3 : i * 3 + 3])) * 7919) % (number_text_tokens - 1)
        for i in range(n)
    ]
