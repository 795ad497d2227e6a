"""benchmarks/serve_latency.py against a real server on a tiny random model: it runs every
scenario end to end and reports every figure (no timing is asserted: the machine decides)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from lowvox.bench.random_model import ensure_random_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_latency.py"
SCENARIOS = ("alone", "staggered", "short_behind_long", "burst")
# One sentence per repeat, over HTTP and Wyoming: TTFA only (Wyoming disconnects at the
# first audio-chunk).
ONE_SENTENCE = ("http_one_sentence", "wyoming_oneshot", "wyoming_streaming")
TTFA = ("ttfa_p50_s", "ttfa_p95_s", "ttfa_max_s")
FIGURES = ("ttfa_p50_s", "ttfa_p95_s", "ttfa_max_s", "audio_s", "rtf_median", "wall_s",
           "aggregate_rtf")  # fmt: skip


def load_benchmark():
    """The script as a module, by path: `benchmarks/` is not a package."""
    spec = importlib.util.spec_from_file_location("lowvox_serve_latency_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_serve_latency_reports_every_figure(tmp_path):
    bench = load_benchmark()
    model = ensure_random_model(tmp_path / "models", "tiny", seed=3)
    cap = 16  # audio tokens per piece, ~0.75 s of audio
    opts = bench.Options(
        model, tmp_path / "cache", max_new_tokens=cap, repeats=2, staggered=2, stagger_s=0.2,
        long_sentences=3, short_delay_s=0.2, burst=2, start_timeout_s=600, request_timeout_s=300,
    )  # fmt: skip
    report = bench.run_benchmark(opts)

    assert report["voice"] == "bench-voice"  # no studio speakers: the synthetic clip's voice
    assert report["startup_s"] > 0
    scenarios = report["scenarios"]
    assert tuple(scenarios) == SCENARIOS + ONE_SENTENCE
    counts = {"alone": 2, "staggered": 2, "short_behind_long": 1, "burst": 2}
    for name in SCENARIOS:
        s = scenarios[name]
        assert len(s["requests"]) == counts[name], name
        for key in FIGURES:
            assert math.isfinite(s[key]) and s[key] > 0, (name, key)
        assert s["ttfa_p50_s"] <= s["ttfa_p95_s"] <= s["ttfa_max_s"], name
        for r in s["requests"]:
            assert 0 < r["ttfa_s"] <= r["total_s"], (name, r)
            # Audio came back, and the token cap reached the engine: random weights rarely
            # stop by themselves (~28 s of audio per piece without the cap).
            assert 0 < r["audio_s"] < 4 * cap / 21.5, (name, r)
    long_ = scenarios["short_behind_long"]["long"]
    assert 0 < long_["ttfa_s"] <= long_["total_s"] and long_["audio_s"] > 0
    ratios = report["ratios"]
    assert (
        ratios["short_behind_long_over_alone"] == scenarios["short_behind_long"]["ratio_to_alone"]
    )
    for name in ONE_SENTENCE:
        s = scenarios[name]
        assert len(s["requests"]) == 2, name
        for key in TTFA:
            assert math.isfinite(s[key]) and s[key] > 0, (name, key)
        assert s["ttfa_p50_s"] <= s["ttfa_p95_s"] <= s["ttfa_max_s"], name
        assert all(r["ttfa_s"] > 0 for r in s["requests"]), name
    http = scenarios["http_one_sentence"]["ttfa_p50_s"]
    for name in ("wyoming_oneshot", "wyoming_streaming"):
        ratio = ratios[f"{name}_over_http_one_sentence"]
        assert ratio == scenarios[name]["ttfa_p50_s"] / http
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert len(ratios) == 4

    json.dumps(report)  # what --json writes
    table = bench.format_table(report)
    assert all(name in table for name in SCENARIOS + ONE_SENTENCE)
    assert "wyoming_streaming / http_one_sentence" in table
