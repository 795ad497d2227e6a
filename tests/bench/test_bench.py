"""`lowvox bench` on a tiny random model: it runs end to end and reports every figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from lowvox.bench.fidelity import compare
from lowvox.bench.random_model import ensure_random_model, random_state_dict
from lowvox.bench.run import format_report
from lowvox.engines.xtts.loader import load_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return ensure_random_model(tmp_path_factory.mktemp("bench"), "tiny", seed=3)


@pytest.mark.slow
def test_random_model_loads_through_the_real_loader(tiny_folder, tmp_path):
    model = load_model(tiny_folder, cache_dir=tmp_path)
    assert model.config.model_args.gpt_layers == 2
    assert model.tokenizer.encode("hello", "en")[0] == 3  # the [en] tag


@pytest.mark.slow
def test_random_state_dict_is_finite_and_seeded(tiny_folder, tmp_path):
    model = load_model(tiny_folder, cache_dir=tmp_path)
    a, b = random_state_dict(model, 1), random_state_dict(model, 1)
    c = random_state_dict(model, 2)
    assert all(torch.isfinite(t.float()).all() for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() > 1)


def _bench_case(*args: str) -> dict:
    """`lowvox bench ... --json` in a subprocess; its one case."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowvox", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads(proc.stdout)["cases"]
    return case


@pytest.mark.slow
def test_bench_command_reports_every_figure(tiny_folder, tmp_path):
    case = _bench_case(
        "--model-dir", str(tiny_folder), "--precision", "fp32", "--new-tokens", "12",
        "--cache-dir", str(tmp_path),
    )  # fmt: skip
    assert "error" not in case, case
    assert case["generated_tokens"] == 12  # the stop token never ends a timing run
    for key in ("load_s", "prefill_s", "decode_ms_per_token", "tokens_per_s", "vocoder_s_per_audio_s",
                "e2e_rtf", "stream_first_audio_s", "peak_rss_bytes"):  # fmt: skip
        assert case[key] > 0, key
    # The kernel path the numbers came from, as `lowvox doctor` names it.
    from lowvox.runtime import kernels

    assert case["cpu_kernels"] == kernels.describe(with_path=False)


@pytest.mark.slow
def test_bench_table_and_bad_model_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lowvox", "bench", "--model-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no model.pth" in proc.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--device", "auto"], "not auto"),
        (["--batch-sizes", "1,0"], "batch size must be 1 or more"),
        (["--new-tokens", "0"], "new tokens must be 1 or more"),
        (["--threads", "0"], "threads must be 1 or more"),
        # --golden adds a model to --fidelity's report: alone it was silently ignored, and
        # a wrong folder failed only after every case had run.
        (["--golden", "/nonexistent-golden"], "--golden needs --fidelity"),
        (["--golden", "/nonexistent-golden", "--fidelity"], "no model.pth in /nonexistent"),
    ],
)
def test_bench_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    """A typo is a clear error (exit 2) at once: no random model is built, no worker runs,
    and no report of failed rows comes back with exit 0. (In process, as `main` returns
    the exit code; `test_bench_table_and_bad_model_dir` runs the command itself.)"""
    from lowvox.cli import main

    code = main(["bench", "--random-weights", "tiny", "--cache-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing built


def test_fidelity_table_shows_the_vocoder_snr() -> None:
    row = dict(logit_cosine_mean=1.0, logit_cosine_min=1.0, top1_agreement=1.0,
               decode_logit_cosine_mean=1.0, decode_logit_cosine_min=1.0,
               decode_top1_agreement=1.0)  # fmt: skip
    report = {
        "model": "m",
        "new_tokens": 8,
        "cases": [],
        "fidelity": {
            "model": [
                {"precision": "fp32", **row, "vocoder_snr_db": math.inf},
                {"precision": "bf16", **row, "vocoder_snr_db": 35.04},
            ]
        },
    }
    text = format_report(report)
    assert "model fp32: " in text and "vocoder SNR identical (fp32 vocoder)" in text
    assert "vocoder SNR 35.0 dB" in text


@pytest.mark.slow
def test_fidelity_of_a_model_against_itself_is_perfect(tiny_folder, tmp_path):
    a = load_model(tiny_folder, cache_dir=tmp_path)
    b = load_model(tiny_folder, cache_dir=tmp_path)
    r = compare(a, b, "hello there, how are you?", tokens=16)
    assert r["logit_cosine_min"] > 0.99999
    assert r["top1_agreement"] == 1.0
    # Two loads of one fp32 model: the same maths, maybe in another order (FP32_REORDER), so
    # last-bit differences at most (~120 dB measured), never a reduced precision's ~30-40 dB.
    assert r["vocoder_snr_db"] >= 100.0
    # One instance against itself: the same computation repeated, bit for bit.
    assert compare(a, a, "hello there.", tokens=8)["vocoder_snr_db"] == math.inf
    # Decode steps compute the same logits as the one pass (other kernels, same maths).
    assert r["decode_logit_cosine_min"] > 0.99999
    assert r["decode_top1_agreement"] == 1.0
    # ... so sampling draws from the same distributions: last-bit logit differences move
    # no visible probability (a reduced precision's is ~1e-2 per step).
    assert r["sampling_tv_max"] < 1e-3
    # The checkpoint's defaults, as a request without options gets them.
    assert r["sampling_options"] == dict(
        temperature=0.75, top_k=50, top_p=0.85, repetition_penalty=5.0, do_sample=True
    )


@pytest.mark.slow
def test_fidelity_detects_a_perturbed_model(tiny_folder, tmp_path):
    a = load_model(tiny_folder, cache_dir=tmp_path)
    b = load_model(tiny_folder, cache_dir=tmp_path)
    with torch.no_grad():
        for p in b.gpt.gpt.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.5)
    r = compare(a, b, "hello there, how are you?", tokens=16)
    assert r["logit_cosine_mean"] < 0.999
    assert r["decode_logit_cosine_mean"] < 0.999
    assert r["sampling_tv_mean"] > 0.1  # the sampler would draw from other tokens


@pytest.mark.slow
def test_fidelity_pools_positions_over_several_texts(tiny_folder, tmp_path):
    a = load_model(tiny_folder, cache_dir=tmp_path)
    b = load_model(tiny_folder, cache_dir=tmp_path)
    r = compare(a, b, ["hello there.", "how are you today?"], tokens=8)
    assert r["positions"] == 16
    assert r["top1_agreement"] == 1.0


# ---------------------------------------------------------------------------------------------
# The machine's floor and sampling fidelity (issue 16, items 4 and 5)


def _tiny_gpt(precision: str):
    """The tiny random architecture's GPT as each precision stores it (the loader's swaps)."""
    from lowvox.bench.random_model import _config, model_args
    from lowvox.engines.xtts.config import XttsConfig
    from lowvox.engines.xtts.gpt import XttsGpt, conv1d_to_linear
    from lowvox.engines.xtts.loader import BLOCK_LINEARS
    from lowvox.runtime.quant import bf16_linears, quantize_linears

    args = XttsConfig.from_dict(_config(model_args("tiny"))).model_args
    gpt = XttsGpt(args)
    if precision != "fp32":
        conv1d_to_linear(gpt)
        swap = quantize_linears if precision == "int8" else bf16_linears
        assert swap(gpt, include=BLOCK_LINEARS) == 4 * args.gpt_layers
    return gpt


def _expected_step_bytes(args, weight_bytes: int, scale_bytes: int) -> int:
    """A decode step's GPT reads from the architecture's sizes: per block 12 D^2 weights
    (c_attn 3D, attn c_proj D, c_fc 4D, mlp c_proj D outputs: 9D channels with their
    scales and fp32 biases) and two fp32 LayerNorms; ln_f and final_norm; fp32 mel_head;
    one fp32 row each of the audio token and position embeddings."""
    d, v = args.gpt_n_model_channels, args.gpt_num_audio_tokens
    block = 12 * d * d * weight_bytes + 9 * d * (scale_bytes + 4) + 4 * d * 4
    return args.gpt_layers * block + 2 * (2 * d * 4) + (v * d + v) * 4 + 2 * d * 4


@pytest.mark.parametrize(
    "precision, weight_bytes, scale_bytes", [("fp32", 4, 0), ("bf16", 2, 0), ("int8", 1, 2)]
)
def test_decode_weight_bytes_are_the_weights_a_step_reads(precision, weight_bytes, scale_bytes):
    from lowvox.bench.floor import decode_weight_bytes, step_bytes

    gpt = _tiny_gpt(precision)
    counted = decode_weight_bytes(gpt)
    # The model's actual tensors: everything under the transformer stack, final_norm and
    # mel_head, and one row of each audio embedding; nothing of the text side or the voice.
    streamed = ("gpt.", "final_norm.", "mel_head.")
    actual = sum(t.nbytes for k, t in gpt.state_dict().items() if k.startswith(streamed))
    actual += gpt.mel_embedding.weight[0].nbytes + gpt.mel_pos_embedding.emb.weight[0].nbytes
    assert counted == actual
    assert counted == _expected_step_bytes(gpt.args, weight_bytes, scale_bytes)
    args = gpt.args
    sizes = (args.gpt_layers, args.gpt_n_model_channels, args.gpt_num_audio_tokens)
    assert step_bytes(*sizes, precision) == counted  # what doctor uses for the released model
    from lowvox.runtime import kernels
    from lowvox.runtime.quant import pack_panels

    if precision == "int8" and kernels.available() and kernels.int8_panels():
        pack_panels(gpt)  # the panels become the one copy: the count stays the weights'
        assert decode_weight_bytes(gpt) == counted


def test_floor_is_bytes_over_bandwidth():
    from lowvox.bench.floor import floor_ms_per_token

    # 0.4 GB of weights at 20 GB/s: 20 ms per token, whatever the machine.
    assert floor_ms_per_token(400_000_000, 20e9) == pytest.approx(20.0)


def test_total_variation_of_hand_made_distributions():
    from lowvox.bench.fidelity import total_variation

    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert total_variation(p, p).item() == 0.0
    assert total_variation(p, torch.tensor([0.0, 0.0, 0.3, 0.7])).item() == 1.0  # disjoint
    # Half of the mass moved: 0.5 (|0.25| + |0.25| + |0.5| halved).
    assert total_variation(p, torch.tensor([0.25, 0.25, 0.5, 0.0])).item() == pytest.approx(0.5)
    # One row per step: [N, V] -> [N].
    both = total_variation(torch.stack([p, p]), torch.stack([p, torch.tensor([0.0, 1.0, 0, 0])]))
    assert both.tolist() == pytest.approx([0.0, 0.5])


def test_sampling_distributions_go_through_the_engines_processors():
    from lowvox.bench.fidelity import sampling_distributions, teacher_forced_seen
    from lowvox.engines.xtts.sampling import SamplingOptions

    # What the decoder's repetition penalty has seen before each of the codes 5, 7, 5:
    # the prompt's placeholder (1) and start id (1024), then the codes chosen so far.
    seen = teacher_forced_seen(torch.tensor([[5, 7, 5]]), start_token=1024, vocab=1026)
    assert [row.nonzero().flatten().tolist() for row in seen] == [
        [1, 1024], [1, 5, 1024], [1, 5, 7, 1024]
    ]  # fmt: skip
    options = SamplingOptions(temperature=0.75, top_k=50, top_p=0.85, repetition_penalty=5.0)
    logits = torch.randn(3, 1026, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 5] = 20.0  # the best token by far, until it has been seen
    probs = sampling_distributions(logits, seen, options)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert ((probs > 0).sum(-1) <= 50).all()  # top-k
    assert probs[0, 5] > 0.99 and probs[2, 5] < probs[0, 5]  # penalised once seen


def test_report_shows_the_machine_floor_and_sampling_tv():
    case = dict(device="cpu", precision="int8", threads=2, cpu_model="AMD EPYC",
                cpu_kernels="AVX-512 with VNNI", decode_ms_per_token=30.0,
                decode_weight_bytes=400_000_000, read_bandwidth_gb_per_s=20.0,
                bandwidth_buffer_bytes=1 << 30, bandwidth_threads=2, bandwidth_repeats=5,
                floor_ms_per_token=20.0, floor_ratio=1.5)  # fmt: skip
    fid = dict(logit_cosine_mean=1.0, logit_cosine_min=1.0, top1_agreement=1.0,
               decode_logit_cosine_mean=1.0, decode_logit_cosine_min=1.0,
               decode_top1_agreement=1.0, vocoder_snr_db=40.0, sampling_tv_mean=0.0123,
               sampling_tv_max=0.25, sampling_options=dict(temperature=0.75, top_k=50,
               top_p=0.85, repetition_penalty=5.0, do_sample=True))  # fmt: skip
    report = {"model": "m", "new_tokens": 8, "cases": [case],
              "fidelity": {"model": [{"precision": "int8", **fid}]}}  # fmt: skip
    text = format_report(report)
    assert "cpu: AMD EPYC   cpu kernels: AVX-512 with VNNI" in text
    assert "floor ms/token" in text and "x floor" in text
    assert "cpu/int8: 0.400 GB/token / 20.0 GB/s = 20.00 ms/token" in text
    assert "= 1.50x the floor" in text
    assert "top-k 50, top-p 0.85, repetition penalty 5" in text
    assert "mean 0.0123 max 0.2500" in text
    # A case whose bandwidth probe failed still shows its timings, and why no floor.
    failed = {k: v for k, v in case.items() if "floor" not in k and "bandwidth" not in k}
    text = format_report({**report, "cases": [failed | {"floor_error": "probe died"}]})
    assert "no floor: probe died" in text


@pytest.mark.slow
def test_bench_reports_the_machine_floor_on_the_tiny_random_model(tmp_path):
    case = _bench_case(
        "--random-weights", "tiny", "--precision", "int8", "--new-tokens", "8",
        "--cache-dir", str(tmp_path),
    )  # fmt: skip
    assert "error" not in case and "floor_error" not in case, case
    from lowvox.runtime import kernels
    from lowvox.runtime.devices import probe_machine

    assert case["cpu_model"] == probe_machine(with_gpus=False).cpu_model
    assert case["cpu_kernels"] == kernels.describe(with_path=False)
    assert case["read_bandwidth_gb_per_s"] > 0
    # The loaded int8 model streams what its architecture says it should.
    assert case["decode_weight_bytes"] == _expected_step_bytes(_tiny_gpt("int8").args, 1, 2)
    floor = case["decode_weight_bytes"] / (case["read_bandwidth_gb_per_s"] * 1e9) * 1000
    assert case["floor_ms_per_token"] == pytest.approx(floor)
    assert case["floor_ratio"] == pytest.approx(case["decode_ms_per_token"] / floor)
