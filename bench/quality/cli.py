"""The three experiments and their command line (``python -m bench.quality --help``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from .. import HelpFormatter
from . import __doc__ as PACKAGE_DOC
from .data import (
    HERE,
    RESULTS_DIR,
    batch_layout,
    extract_dataset,
    group_ids_of,
    ids_of,
    layout_stats,
    log,
    minilm_embeddings,
    multi_query_pairs,
    tfidf_embeddings,
)
from .models import LOSSES, TOWERS, alignment_uniformity, finetune_minilm, retrieval_metrics, train_towers
from .report import compare, plot_probes, summarise, write_report
from .report_repeated import SETTINGS, plot_deltas, write_finetune_report, write_repeated_report

MAIN_LOSSES = [name for name in LOSSES if name != "bi-samtone+groups" and not name.endswith("+margin")]
REPEATED_LOSSES = ["infonce", "samtone", "bi-samtone", "bi-samtone+groups"]
ANCHOR_LOSSES = ["infonce", "samtone", "samtone+dups"]
SCRATCH = os.path.join(tempfile.gettempdir(), "samtone-kernels-quality")
QUICK_FILES = 30  # --quick reads the first 30 files of each training package (120 of the standard library)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=PACKAGE_DOC, formatter_class=HelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--repeated",
        action="store_true",
        help="batches in which documents repeat (several queries per document; functions of one "
        "file together), with and without group masking -> bench/REPEATED.md",
    )
    which.add_argument(
        "--finetune",
        action="store_true",
        help="fine-tune all-MiniLM-L6-v2 itself through SamToNeRankingLoss -> bench/FINETUNE.md",
    )
    which.add_argument(
        "--anchors",
        action="store_true",
        help="fine-tune it with repeated anchors: the code is the anchor and its several docstring "
        "sentences its positives (one anchor with several positives, together in a batch) -> bench/ANCHORS.md",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small and fast (a few hundred pairs, one seed, one epoch or a few steps); writes to a "
        "scratch folder "
        f"({SCRATCH}) unless --out / --report say otherwise",
    )
    p.add_argument(
        "--bases",
        nargs="+",
        choices=["minilm", "tfidf"],
        default=["minilm", "tfidf"],
        help="frozen base encoders (default: %(default)s)",
    )
    p.add_argument(
        "--towers", nargs="+", choices=list(TOWERS), default=None, help="default: all three; sde ade with --repeated"
    )
    p.add_argument(
        "--losses",
        nargs="+",
        choices=list(LOSSES),
        default=None,
        help=f"default: {' '.join(MAIN_LOSSES)}; {' '.join(REPEATED_LOSSES)} with --repeated / --finetune",
    )
    p.add_argument("--seeds", type=int, default=3, help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=4, help="tower training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 (towers), 32 (--finetune)")
    p.add_argument("--lr", type=float, default=1e-3, help="tower learning rate (default: %(default)s)")
    p.add_argument(
        "--max-train", type=int, default=6000, help="training pairs, one query per document (default: %(default)s)"
    )
    p.add_argument(
        "--max-docs",
        type=int,
        default=3000,
        help="documents with several queries (--repeated, --finetune; default: %(default)s)",
    )
    p.add_argument("--max-test", type=int, default=1500, help="test pairs (default: %(default)s)")
    p.add_argument(
        "--max-length", type=int, default=None, help="MiniLM tokens per text (default: 128; 96 with --finetune)"
    )
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=3e-5, help="default: %(default)s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    p.add_argument("--out", default=None, help=f"folder for the JSON and the pictures (default: {RESULTS_DIR})")
    p.add_argument(
        "--report",
        default=None,
        help="the Markdown report (default: bench/QUALITY.md, bench/REPEATED.md or bench/FINETUNE.md)",
    )
    args = p.parse_args(argv)
    kind = "repeated" if args.repeated else "finetune" if args.finetune else "anchors" if args.anchors else "quality"
    args.kind = kind
    args.towers = args.towers or (["sde", "ade"] if kind == "repeated" else list(TOWERS))
    args.losses = args.losses or {"quality": MAIN_LOSSES, "anchors": ANCHOR_LOSSES}.get(kind, REPEATED_LOSSES)
    fine_tuning = kind in ("finetune", "anchors")
    args.batch_size = args.batch_size or (32 if fine_tuning else 256)
    if args.quick:
        args.max_train, args.max_test, args.max_docs, args.seeds, args.epochs = 300, 150, 100, 1, 1
        args.max_length = args.max_length or 64
        if fine_tuning:
            args.steps, args.batch_size, args.max_test, args.max_length = 2, 8, 40, 32
    args.max_length = args.max_length or (96 if fine_tuning else 128)
    default_out = SCRATCH if args.quick else RESULTS_DIR
    args.out = args.out or default_out
    args.report = args.report or os.path.join(
        SCRATCH if args.quick else HERE,
        {"quality": "QUALITY.md", "repeated": "REPEATED.md", "finetune": "FINETUNE.md", "anchors": "ANCHORS.md"}[kind],
    )
    return args


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(["python -m bench.quality"] + (sys.argv[1:] if argv is None else list(argv)))
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    log("extracting pairs from installed packages (train) and the standard library (test)")
    train, test, info = extract_dataset(None, args.max_test, files_per_package=QUICK_FILES if args.quick else None)
    test_queries = info.pop("test_queries")
    info.update(device=args.device, commit=_commit())
    run = {"quality": run_quality, "repeated": run_repeated, "finetune": run_finetune, "anchors": run_finetune}[
        args.kind
    ]
    run(args, command, started, train, test, test_queries, info)
    log(f"wrote {args.report} ({(time.time() - started) / 60:.1f} min)")
    return 0


def _embed(base: str, args, train_texts: list[str], texts: list[str], info: dict) -> np.ndarray:
    if base == "minilm":
        emb, cached = minilm_embeddings(texts, args.device, args.max_length)
        info["minilm_cache"] = "reloaded" if cached else "computed and saved"
        return emb
    return tfidf_embeddings(train_texts, texts, dim=256, seed=0)


# --------------------------------------------------------------------------------------------------
# Frozen encoders, random batches -> QUALITY.md
# --------------------------------------------------------------------------------------------------
def run_quality(args, command, started, train, test, test_queries, info) -> None:
    train = train[: args.max_train]
    groups = group_ids_of(train)
    counts = np.bincount(groups)
    info.update(
        train_pairs=len(train),
        train_groups_multi=int((counts > 1).sum()),
        train_grouped_pairs=int(counts[counts > 1].sum()),
    )
    log(f"{len(train)} training pairs, {len(test)} test pairs")
    texts = [p.query for p in train] + [p.code for p in train] + [p.query for p in test] + [p.code for p in test]
    n_train, n_test = len(train), len(test)

    def batches(rng):
        return batch_layout("random", np.arange(n_train), args.batch_size, rng)

    runs, zero_shot, probes, distances, panels, per_query = [], {}, {}, {}, {}, {}
    sample = np.random.default_rng(0).permutation(n_test)[:300]
    for base in args.bases:
        emb = _embed(base, args, texts[: 2 * n_train], texts, info)
        q_tr, d_tr, q_te, d_te = np.split(emb, [n_train, 2 * n_train, 2 * n_train + n_test])
        zero_shot[base], top1, _ = retrieval_metrics(q_te, d_te)
        log(f"{base} zero-shot: " + ", ".join(f"{k} {v:.4f}" for k, v in zero_shot[base].items()))
        if base == args.bases[0]:
            probes[f"{base} zero-shot"] = dict(alignment_uniformity(q_te, d_te), top1_median=float(np.median(top1)))
            distances[f"{base} zero-shot"] = top1
            panels["before training"] = (q_te[sample], d_te[sample])
        for tower in args.towers:
            for loss in args.losses:
                for seed in range(args.seeds):
                    towers = train_towers(
                        tower,
                        loss,
                        q_tr,
                        d_tr,
                        groups,
                        epochs=args.epochs,
                        batches=batches,
                        lr=args.lr,
                        seed=seed,
                        device=args.device,
                    )
                    qe, de = _encode_towers(towers, q_te, d_te, args.device)
                    metrics, top1, rr = retrieval_metrics(qe, de)
                    runs.append(dict(base=base, tower=tower, loss=loss, seed=seed, **metrics))
                    per_query[(base, tower, loss)] = per_query.get((base, tower, loss), 0) + rr / args.seeds
                    if seed == 0 and base == args.bases[0] and tower == "ade" and loss in ("infonce", "samtone"):
                        name = f"{base} ADE {loss}"
                        probes[name] = dict(alignment_uniformity(qe, de), top1_median=float(np.median(top1)))
                        distances[name] = top1
                        panels[f"ADE, {loss}"] = (qe[sample], de[sample])
                log(
                    f"{base} {tower} {loss}: mrr@10 "
                    f"{np.mean([r['mrr@10'] for r in runs[-args.seeds :]]):.4f} over {args.seeds} seed(s)"
                )

    pictures = plot_probes(panels, distances, args.out, "quality", seed=0, tsne_iterations=250 if args.quick else 1000)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(dict(command=command, data=info, zero_shot=zero_shot, runs=runs, probes=probes), f, indent=1)
    write_report(
        args.report,
        command,
        info,
        summarise(runs),
        per_query,
        zero_shot,
        probes,
        pictures,
        args.bases,
        time.time() - started,
    )


def _encode_towers(towers, q: np.ndarray, d: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        return (
            towers.encode(torch.from_numpy(q).to(device), "query").cpu().numpy(),
            towers.encode(torch.from_numpy(d).to(device), "doc").cpu().numpy(),
        )


# --------------------------------------------------------------------------------------------------
# Repeated documents -> REPEATED.md
# --------------------------------------------------------------------------------------------------
def whole_files(train: list, max_pairs: int) -> list:
    """Pairs of whole source files (files in ``train``'s shuffled order), until ``max_pairs``."""
    by_file = {}
    for p in train:
        by_file.setdefault(p.source, []).append(p)
    kept = []
    for pairs in by_file.values():
        if len(kept) >= max_pairs:
            break
        kept += pairs[: max_pairs - len(kept)]
    return kept


def repeated_settings(train, test_queries, args, info) -> dict:
    """setting -> (queries, codes, doc_of [pairs], doc groups [pairs], file groups [pairs])."""
    mq = multi_query_pairs(train, test_queries, max_docs=args.max_docs)
    files = whole_files(train, args.max_train)
    file_ids = ids_of([p.source for p in files])
    info.update(
        {
            "shared-docs_docs": len(mq.codes),
            "shared-docs_pairs": len(mq.queries),
            "min_queries": 3,
            "max_queries": 4,
            "same-file_pairs": len(files),
            "same-file_files": int(file_ids.max()) + 1,
            "batch_size": args.batch_size,
        }
    )
    return {
        "shared-docs": (mq.queries, mq.codes, mq.doc, mq.doc, mq.file),
        "same-file": (
            [p.query for p in files],
            [p.code for p in files],
            np.arange(len(files)),
            np.arange(len(files)),
            file_ids,
        ),
    }


def run_repeated(args, command, started, train, test, test_queries, info) -> None:
    settings = repeated_settings(train, test_queries, args, info)
    test_texts = [p.query for p in test] + [p.code for p in test]
    runs, per_query, stats, zero_shot = [], {}, {}, {}
    for setting, (queries, codes, doc_of, doc, file) in settings.items():
        group = {"document": doc, "file": file}[SETTINGS[setting][1]]
        layouts = {"random": doc, SETTINGS[setting][2]: group}  # layout -> the units it keeps together
        log(f"{setting}: {len(queries)} pairs over {len(codes)} documents")
        for layout, units in layouts.items():
            stats[(setting, layout)] = layout_stats(
                batch_layout(layout, units, args.batch_size, np.random.default_rng(0)), doc, file
            )
        for base in args.bases:
            texts = queries + codes + test_texts
            emb = _embed(base, args, queries + codes, texts, info)
            q_tr, d_tr, q_te, d_te = np.split(
                emb, [len(queries), len(queries) + len(codes), len(queries) + len(codes) + len(test)]
            )
            zero_shot[f"{base} {setting}"] = retrieval_metrics(q_te, d_te)[0]  # TF-IDF is fit per setting
            for layout, units in layouts.items():

                def batches(rng, units=units, layout=layout):
                    return batch_layout(layout, units, args.batch_size, rng)

                for tower in args.towers:
                    for loss in args.losses:
                        key = (base, setting, layout, tower, loss)
                        for seed in range(args.seeds):
                            towers = train_towers(
                                tower,
                                loss,
                                q_tr,
                                d_tr,
                                group,
                                epochs=args.epochs,
                                batches=batches,
                                lr=args.lr,
                                seed=seed,
                                device=args.device,
                                doc_of=doc_of,
                            )
                            metrics, _, rr = retrieval_metrics(*_encode_towers(towers, q_te, d_te, args.device))
                            runs.append(
                                dict(zip(("base", "setting", "layout", "tower", "loss"), key), seed=seed, **metrics)
                            )
                            per_query[key] = per_query.get(key, 0) + rr / args.seeds
                        log(f"{' '.join(key)}: mrr@10 {np.mean([r['mrr@10'] for r in runs[-args.seeds :]]):.4f}")
    summary = summarise(runs, ("base", "setting", "layout", "tower", "loss"))
    bars = []
    for base in args.bases:
        for setting, (_, _, layout) in SETTINGS.items():
            for lay in ("random", layout):
                for tower in args.towers:
                    k = (base, setting, lay, tower)
                    for loss in args.losses[1:]:
                        c = compare(per_query, k + (args.losses[0],), k + (loss,))
                        if c:
                            bars.append((f"{base} {setting} {lay} {tower.upper()} {loss}", c))
    picture = (
        plot_deltas(bars, os.path.join(args.out, "repeated-delta.png"), f"MRR@10 against {args.losses[0]}")
        if bars
        else None
    )
    with open(os.path.join(args.out, "repeated.json"), "w") as f:
        json.dump(
            dict(
                command=command,
                data=info,
                zero_shot=zero_shot,
                runs=runs,
                batches={" ".join(k): v for k, v in stats.items()},
            ),
            f,
            indent=1,
        )
    write_repeated_report(
        args.report,
        command,
        info,
        summary,
        per_query,
        zero_shot,
        stats,
        args.bases,
        args.towers,
        args.losses,
        picture,
        time.time() - started,
    )


# --------------------------------------------------------------------------------------------------
# Fine-tuning MiniLM through SamToNeRankingLoss -> FINETUNE.md
# --------------------------------------------------------------------------------------------------
def run_finetune(args, command, started, train, test, test_queries, info) -> None:
    queries, codes, doc_of, doc, file = repeated_settings(train, test_queries, args, info)["shared-docs"]
    test_q, test_d = [p.query for p in test], [p.code for p in test]
    if args.kind == "anchors":
        # The roles swapped: the code is the anchor, repeated once per docstring sentence, and each
        # sentence a positive of its own: one anchor with several positives, which by-document batches
        # keep together (pair k is (code of doc_of[k], sentence k)). Retrieval at test time: code -> docstring.
        queries, codes, doc_of = [codes[j] for j in doc_of], queries, np.arange(len(queries))
        test_q, test_d = test_d, test_q
    emb, cached = minilm_embeddings(test_q + test_d, args.device, args.max_length)
    info["minilm_cache"] = "reloaded" if cached else "computed and saved"
    zero_shot = retrieval_metrics(emb[: len(test)], emb[len(test) :])[0]
    log("zero-shot: " + ", ".join(f"{k} {v:.4f}" for k, v in zero_shot.items()))
    runs, per_query, minutes = [], {}, []
    for loss in args.losses:
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            batches = []
            while len(batches) < args.steps:  # epochs of by-document batches, as many as the steps need
                batches += batch_layout("by-document", doc, args.batch_size, rng)
            batches = batches[: args.steps]
            if loss == args.losses[0] and seed == 0:
                info["unique_doc_fraction"] = layout_stats(batches, doc, file)["unique_doc_fraction"]
            t0 = time.time()
            log(f"fine-tuning with {loss}, seed {seed}: {len(batches)} steps")
            encode = finetune_minilm(
                loss,
                queries,
                codes,
                batches,
                lr=args.finetune_lr,
                seed=seed,
                device=args.device,
                max_length=args.max_length,
                doc_of=doc_of,
                log_every=max(1, args.steps // 5),
            )
            minutes.append((time.time() - t0) / 60)
            metrics, _, rr = retrieval_metrics(encode(test_q), encode(test_d))
            runs.append(dict(loss=loss, seed=seed, **metrics))
            per_query[(loss,)] = per_query.get((loss,), 0) + rr / args.seeds
            log(f"{loss} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            with open(os.path.join(args.out, "finetune.json"), "w") as f:  # after every run: a partial record
                json.dump(dict(command=command, data=info, zero_shot=zero_shot, runs=runs), f, indent=1)
    info.update(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.finetune_lr,
        max_length=args.max_length,
        seeds=args.seeds,
        train_minutes=float(np.mean(minutes)),
    )
    bars = [(loss, c) for loss in args.losses[1:] if (c := compare(per_query, (args.losses[0],), (loss,)))]
    picture = (
        plot_deltas(
            bars, os.path.join(args.out, "finetune-delta.png"), f"Fine-tuned MiniLM: MRR@10 against {args.losses[0]}"
        )
        if bars
        else None
    )
    with open(os.path.join(args.out, "finetune.json"), "w") as f:
        json.dump(dict(command=command, data=info, zero_shot=zero_shot, runs=runs), f, indent=1)
    write_finetune_report(
        args.report,
        command,
        info,
        summarise(runs, ("loss",)),
        per_query,
        zero_shot,
        args.losses,
        picture,
        time.time() - started,
    )
