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


@pytest.mark.slow
def test_bench_command_reports_every_figure(tiny_folder, tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "lowvox", "bench", "--model-dir", str(tiny_folder),
            "--precision", "fp32", "--new-tokens", "12", "--cache-dir", str(tmp_path), "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (case,) = report["cases"]
    assert "error" not in case, case
    assert case["generated_tokens"] == 12  # the stop token never ends a timing run
    for key in ("load_s", "prefill_s", "decode_ms_per_token", "tokens_per_s", "vocoder_s_per_audio_s",
                "e2e_rtf", "stream_first_audio_s", "peak_rss_bytes"):  # fmt: skip
        assert case[key] > 0, key
    # The kernel path the numbers came from, as `lowvox doctor` names it.
    from lowvox.runtime import kernels

    assert case["cpu_kernels"] == kernels.describe(with_path=False)


def test_bench_table_and_bad_model_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lowvox", "bench", "--model-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no model.pth" in proc.stderr


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


@pytest.mark.slow
def test_fidelity_pools_positions_over_several_texts(tiny_folder, tmp_path):
    a = load_model(tiny_folder, cache_dir=tmp_path)
    b = load_model(tiny_folder, cache_dir=tmp_path)
    r = compare(a, b, ["hello there.", "how are you today?"], tokens=8)
    assert r["positions"] == 16
    assert r["top1_agreement"] == 1.0
