"""The machine's floor for decoding: how fast weights can stream from memory.

One decode step of one sequence reads every weight of the GPT's transformer once (plus
`mel_head` and one row of each audio embedding), so no kernel can beat
`decode_weight_bytes / read bandwidth` per token. `lowvox bench` measures the bandwidth in
the same run as its decode timings, right before them, in a child process (so that the
gigabyte it reads never counts towards the case's peak memory), and reports each case's
measured ms/token as a multiple of that floor.

Invoked as `python -m lowvox.bench.floor '<json>'`; prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from lowvox.errors import LowvoxError

if TYPE_CHECKING:
    from lowvox.engines.xtts.gpt import XttsGpt

# Much larger than any L3 cache (32 MiB on the EPYC we bench on), so the sum streams from
# memory; best of a few repeats, as the machines are shared.
BANDWIDTH_BUFFER_BYTES = 1 << 30
BANDWIDTH_REPEATS = 5
BANDWIDTH_TIMEOUT_S = 300


def decode_weight_bytes(gpt: XttsGpt) -> int:
    """Bytes of GPT weights one decode step of one sequence reads, as the model stores them.

    Every tensor of the transformer stack (each block's linears with their int8 scales,
    biases and LayerNorms, and `ln_f`), `final_norm` and `mel_head` (the step's logits),
    plus the one row of `mel_embedding` and of `mel_pos_embedding` the new token looks up.
    Not counted: the KV cache, which is activations, not weights, and grows with position.
    """
    streamed = (gpt.gpt, gpt.final_norm, gpt.mel_head)
    # The tensors as held, not a state dict: int8 layers that keep only their packed panels
    # would unpack a copy of every weight for it (a stand-in counts as the weights' bytes).
    total = sum(
        t.nbytes
        for module in streamed
        for t in itertools.chain(module.parameters(), module.buffers())
    )
    rows = (gpt.mel_embedding.weight, gpt.mel_pos_embedding.emb.weight)
    return total + sum(w[0].nbytes for w in rows)


# Bytes per stored weight, and per int8 row scale (bf16), as the loader stores each precision.
STORED_BYTES = {"fp32": (4, 0), "bf16": (2, 0), "int8": (1, 2)}


def step_bytes(layers: int, channels: int, audio_tokens: int, precision: str) -> int:
    """What `decode_weight_bytes` counts, from the architecture's sizes alone (for a model
    not loaded, e.g. the released one in `lowvox doctor`): per block 12 D^2 weights (c_attn
    3D, attn c_proj D, c_fc 4D, mlp c_proj D outputs: 9D rows with their scales and fp32
    biases) and two fp32 LayerNorms; ln_f and final_norm; the fp32 mel_head; one fp32 row
    each of the audio token and position embeddings."""
    weight, scale = STORED_BYTES[precision]
    d, v = channels, audio_tokens
    block = 12 * d * d * weight + 9 * d * (scale + 4) + 4 * d * 4
    return layers * block + 2 * (2 * d * 4) + (v * d + v) * 4 + 2 * d * 4


def released_floor_lines(bytes_per_s: float) -> list[str]:
    """The floor of a full-size XTTS v2 (the released model's sizes) per precision at
    `bytes_per_s`, one line each."""
    from lowvox.bench.workload import FULL_SIZE_MODEL_ARGS as args

    sizes = (args["gpt_layers"], args["gpt_n_model_channels"], args["gpt_num_audio_tokens"])
    return [
        f"{precision}: {step_bytes(*sizes, precision) / 1e6:.0f} MB/token, "
        f"{floor_ms_per_token(step_bytes(*sizes, precision), bytes_per_s):.1f} ms/token"
        for precision in ("int8", "bf16", "fp32")
    ]


def floor_ms_per_token(weight_bytes: int, bytes_per_s: float) -> float:
    """The weight-streaming floor: milliseconds to read `weight_bytes` at `bytes_per_s`."""
    return weight_bytes / bytes_per_s * 1000.0


def read_bandwidth(
    nbytes: int = BANDWIDTH_BUFFER_BYTES, repeats: int = BANDWIDTH_REPEATS, device: str = "cpu"
) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` torch sums over an `nbytes` float32
    buffer, with torch's threads (all cores unless set)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # written: pages are in
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_in_child(threads: int, device: str = "cpu") -> dict[str, Any]:
    """`read_bandwidth` in a fresh interpreter with `threads` threads: the buffer never
    counts towards the caller's peak RSS. Returns this module's JSON result."""
    job = {"threads": threads, "device": device}
    cmd = [sys.executable, "-m", "lowvox.bench.floor", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BANDWIDTH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise LowvoxError(f"the bandwidth probe timed out after {BANDWIDTH_TIMEOUT_S} s") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise LowvoxError(f"the bandwidth probe failed (exit {proc.returncode}): {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(int(job["threads"]))
    device = job.get("device", "cpu")
    bw = read_bandwidth(device=device)
    print(
        json.dumps(
            {
                "read_bandwidth_gb_per_s": bw / 1e9,
                "bandwidth_buffer_bytes": BANDWIDTH_BUFFER_BYTES,
                "bandwidth_repeats": BANDWIDTH_REPEATS,
                "bandwidth_threads": torch.get_num_threads(),
                "bandwidth_device": device,
            }
        )
    )


if __name__ == "__main__":
    main()
