"""A model folder with random weights in the released format, for benchmarks without a checkpoint.

`ensure_random_model` writes config.json (the released model_args, or a tiny variant),
a synthetic vocab.json of the right size and a model.pth of fp16 random weights, once per
size and seed, so that benchmarks exercise the real loader and its caches.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from lowvox.bench.workload import FULL_SIZE_MODEL_ARGS
from lowvox.files import atomic_path, write_atomic

log = logging.getLogger(__name__)

LANGUAGES = [
    "en",
    "es",
    "fr",
    "de",
    "it",
    "pt",
    "pl",
    "tr",
    "ru",
    "nl",
    "cs",
    "ar",
    "zh-cn",
    "hu",
    "ko",
    "ja",
    "hi",
]

TINY_OVERRIDES = {
    "gpt_layers": 2,
    "gpt_n_model_channels": 256,
    "gpt_n_heads": 4,
    "decoder_input_dim": 256,
}


def model_args(size: str) -> dict:
    if size == "full":
        return dict(FULL_SIZE_MODEL_ARGS)
    if size == "tiny":
        return {**FULL_SIZE_MODEL_ARGS, **TINY_OVERRIDES}
    raise ValueError(f"unknown random model size {size!r} (full or tiny)")


def _config(args: dict) -> dict:
    return {
        "model": "xtts",
        "audio": {"sample_rate": 22050, "output_sample_rate": 24000, "dvae_sample_rate": 22050},
        "model_args": {**args, "tokenizer_file": "vocab.json"},
        "languages": LANGUAGES,
        "temperature": 0.75,
        "length_penalty": 1.0,
        "repetition_penalty": 5.0,
        "top_k": 50,
        "top_p": 0.85,
        "gpt_cond_len": 30,
        "gpt_cond_chunk_len": 4,
        "max_ref_len": 30,
        "sound_norm_refs": False,
    }


def _vocab(size: int) -> dict:
    """A character-level BPE vocabulary of exactly `size` ids laid out like XTTS's."""
    specials = ["[STOP]", "[UNK]", "[SPACE]", *(f"[{lang}]" for lang in LANGUAGES), "[START]"]
    chars = list("!'(),-.0123456789:;?abcdefghijklmnopqrstuvwxyz")
    tokens = specials + chars
    tokens += [f"<pad{i}>" for i in range(size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [
        {
            "id": vocab[t],
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t in specials
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "[UNK]",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Plausible random values for every tensor: scaled normal weights, unit norms, zero biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if ".torch_spec." in name:
            out[name] = t.clone()  # the speaker encoder's fixed front-end: keep it as built
            continue
        if t.dim() <= 1:
            ones = leaf in ("weight", "running_var") or name == "mel_stats"
            out[name] = torch.ones(t.shape) if ones else torch.zeros(t.shape)
            if leaf == "num_batches_tracked":
                out[name] = torch.zeros((), dtype=torch.long)
            continue
        if "embedding" in name or leaf == "latents" or "pos" in name:
            std = 0.02
        elif ".c_attn." in name or ".c_proj." in name or ".c_fc." in name:
            std = 1 / math.sqrt(t.shape[0])  # GPT-2 Conv1D weights are [in, out]
        else:
            std = 1 / math.sqrt(math.prod(t.shape[1:]))
        out[name] = torch.randn(t.shape, generator=g) * std
    return out


def ensure_random_model(root: Path, size: str = "full", seed: int = 0) -> Path:
    """The folder of a random model of `size`, written on first use."""
    from lowvox.engines.xtts.config import XttsConfig
    from lowvox.engines.xtts.model import XttsModel

    folder = Path(root) / f"random-{size}-seed{seed}"
    if (folder / "model.pth").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    args = model_args(size)
    vocab = _vocab(args["gpt_number_text_tokens"])
    args["gpt_start_text_token"] = vocab["model"]["vocab"]["[START]"]
    config = _config(args)
    log.info("writing a random %s-size XTTS model to %s (once)", size, folder)
    model = XttsModel(XttsConfig.from_dict(config))
    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in random_state_dict(model, seed).items()
    }
    del model
    write_atomic(folder / "config.json", json.dumps(config, indent=1).encode())
    write_atomic(folder / "vocab.json", json.dumps(vocab).encode())
    # model.pth last: its presence says the folder is complete.
    with atomic_path(folder / "model.pth") as tmp:
        torch.save({"config": None, "model": state}, tmp)
    return folder
