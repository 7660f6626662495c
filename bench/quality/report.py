"""Summaries, paired-bootstrap intervals, plots and the Markdown reports."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from .data import GROUP_WORDS
from .models import LOSSES, TOWERS

METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")


def summarise(runs: list[dict], keys: tuple[str, ...] = ("base", "tower", "loss")) -> dict:
    """(run[k] for k in keys) -> metric -> (mean, std over seeds), plus "seeds"."""
    table = {}
    for r in runs:
        table.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = {}
    for key, rows in table.items():
        out[key] = {m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows])))
                    for m in rows[0] if isinstance(rows[0][m], float)}
        out[key]["seeds"] = len(rows)
    return out


def paired_interval(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of mean(b - a) over test queries (both scored on the same queries)."""
    diff = b - a
    idx = np.random.default_rng(seed).integers(0, len(diff), (samples, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(per_query: dict, base_key: tuple, other_key: tuple) -> dict | None:
    """MRR@10 of ``other_key`` minus ``base_key`` (per-query reciprocal ranks averaged over seeds), its
    95% paired-bootstrap interval over test queries, and a verdict that counts a difference only when
    the interval excludes 0."""
    if base_key not in per_query or other_key not in per_query:
        return None
    a, b = per_query[base_key], per_query[other_key]
    low, high = paired_interval(a, b)
    delta = float(b.mean() - a.mean())
    verdict = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
    if verdict != "no clear difference" and min(abs(low), abs(high)) < 0.1 * abs(delta):
        verdict += " (only just: the interval nearly reaches 0)"
    return dict(base=float(a.mean()), other=float(b.mean()), delta=delta, low=low, high=high, verdict=verdict)


def comparison_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    return f"{c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"


def metrics_table(rows: list[tuple[str, dict]], label: str) -> list[str]:
    """A Markdown table: one row per (label, summary) with mean ± std per metric."""
    out = [f"| {label} | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, s in rows:
        cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" if isinstance(s[m], tuple) else f"{s[m]:.4f}" for m in METRICS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def header(title: str, command: str, seconds: float, info: dict, intro: str) -> list[str]:
    return [f"# {title}", "", intro, "",
            f"Command: `{command}` ({seconds / 60:.1f} min, {platform.machine()} x{os.cpu_count()}, "
            f"torch {torch.__version__}, device {info.get('device', '?')}; MiniLM embeddings "
            f"{info.get('minilm_cache', 'not used')}; commit {info.get('commit', '?')}; written "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC).", ""]


def data_lines(info: dict) -> list[str]:
    return [f"- Training functions: {info['train_functions']} documented functions of "
            + ", ".join(f"{k} {v}" for k, v in sorted(info["packages"].items())) + ".",
            f"- Test: {info['test_pairs']} pairs from {info['test_functions']} documented functions of the "
            f"Python {info['python']} standard library (tests, demos, tkinter, idlelib and generated modules "
            "excluded); the query is the docstring's first sentence, the document the function's code "
            "without its docstring. No test document or query is seen in training (deduplicated exactly, "
            "test split first)."]


# --------------------------------------------------------------------------------------------------
# The main experiment: frozen encoders, random batches
# --------------------------------------------------------------------------------------------------
def plot_probes(panels: dict, distances: dict, out_dir: str, stem: str, seed: int, tsne_iterations: int = 1000
                ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    paths = []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, (q, d)) in zip(axes[0], panels.items()):
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(5, len(q) // 4)),
                  max_iter=tsne_iterations).fit_transform(np.concatenate([q, d]))
        ax.scatter(*xy[: len(q)].T, s=5, alpha=0.6, label="query tower")
        ax.scatter(*xy[len(q):].T, s=5, alpha=0.6, label="document tower")
        ax.set(title=title, xticks=[], yticks=[])
    axes[0][0].legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}-tsne.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, values in distances.items():
        ax.hist(values, bins=40, histtype="step", density=True, label=label)
    ax.set(xlabel="cosine distance to the top-1 retrieved document", ylabel="density",
           title="Top-1 retrieved distance (test queries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}-top1.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def reading(per_query: dict, bases: list[str]) -> list[str]:
    """SamToNe against InfoNCE per base and tower (see ``compare``)."""
    lines = []
    for base in bases:
        for tower in TOWERS:
            c = compare(per_query, (base, tower, "infonce"), (base, tower, "samtone"))
            if c:
                lines.append(f"- {base}, {tower.upper()}: SamToNe {c['other']:.4f} vs InfoNCE {c['base']:.4f} "
                             f"({c['delta']:+.4f}, 95% interval [{c['low']:+.4f}, {c['high']:+.4f}]): "
                             f"{c['verdict']}.")
    return lines


def probe_reading(probes: dict, base: str) -> list[str]:
    a, b = probes.get(f"{base} ADE infonce"), probes.get(f"{base} ADE samtone")
    if not a or not b:
        return []
    return [f"- Alignment of the ADE towers ({base}): {b['alignment']:.4f} with SamToNe against {a['alignment']:.4f} "
            f"with InfoNCE (zero-shot {probes[f'{base} zero-shot']['alignment']:.4f}); lower means a query lies "
            "closer to its own document. Uniformity, query / document tower: SamToNe "
            f"{b['uniformity_query']:.3f} / {b['uniformity_doc']:.3f}, InfoNCE {a['uniformity_query']:.3f} / "
            f"{a['uniformity_doc']:.3f}. Median top-1 retrieved distance: SamToNe {b['top1_median']:.4f}, InfoNCE "
            f"{a['top1_median']:.4f}, zero-shot {probes[f'{base} zero-shot']['top1_median']:.4f} (the SamToNe paper "
            "reads a distribution kept closer to the untrained one as regularisation)."]


def write_report(path: str, command: str, info: dict, summary: dict, per_query: dict, zero_shot: dict,
                 probes: dict, pictures: list[str], bases: list[str], seconds: float) -> None:
    out = header("Retrieval quality: does SamToNe help?", command, seconds, info,
                 "A small proxy experiment, **not** a BEIR or MS MARCO reproduction: CodeSearchNet-style pairs "
                 "built from the docstrings and code of installed packages, frozen base encoders with small "
                 "trainable towers. The base encoder all-MiniLM-L6-v2 saw CodeSearchNet in its own training, so "
                 "its zero-shot numbers are flattered and the headroom for the towers is small. Two companion "
                 "reports: [REPEATED.md](REPEATED.md) (batches in which documents repeat, and group masking) and "
                 "[FINETUNE.md](FINETUNE.md) (the encoder itself fine-tuned).")
    out += ["## Data", "", f"- Training: {info['train_pairs']} pairs, random batches."] + data_lines(info) + [
        "- Trivial docstrings and stubs are dropped. Group ids for masking (samtone+groups): near-duplicate "
        f"queries, whose first {GROUP_WORDS} words agree once lowercased ({info.get('train_groups_multi', 0)} "
        f"training groups hold {info.get('train_grouped_pairs', 0)} pairs).", "",
        "## Results (test split; mean ± std over seeds)", ""]
    for base in bases:
        rows = [("- zero-shot", zero_shot[base])]
        rows += [(f"{tower.upper()} {loss}", summary[(base, tower, loss)]) for tower in TOWERS for loss in LOSSES
                 if (base, tower, loss) in summary]
        out += [f"### Base: {base}", ""] + metrics_table(rows, "tower loss") + [""]
    out += ["## Probes", "", "Alignment (lower: positives closer), uniformity per tower (lower: more "
            "uniform) and the median cosine distance from a test query to its top-1 retrieved document; first "
            "seed:", "",
            "| model | alignment | uniformity (query tower) | uniformity (doc tower) | median top-1 distance |",
            "|---|---|---|---|---|"]
    for name, p in probes.items():
        out.append(f"| {name} | {p['alignment']:.4f} | {p['uniformity_query']:.4f} | {p['uniformity_doc']:.4f} "
                   f"| {p['top1_median']:.4f} |")
    out.append("")
    for picture in pictures:
        out.append(f"![{os.path.basename(picture)}]({os.path.relpath(picture, os.path.dirname(path))})")
    out += ["", "## Reading", "",
            "SamToNe against InfoNCE, MRR@10 on the test split. The seeds change only the order of the "
            "batches, so their spread is small; the interval is a paired bootstrap over test queries, and a "
            "difference counts only when it excludes 0:", ""] + reading(per_query, bases) + [""]
    out += probe_reading(probes, bases[0])
    out += ["- The t-SNE panels need care: every tower starts at the identity over one frozen encoder, so the "
            "two towers' points begin mixed, and a few epochs of linear training move them little; the "
            "separation the SamToNe paper shows for InfoNCE arose in towers trained apart at full scale."]
    out += ["", "This is one small proxy task: frozen encoders, linear towers, code search. It can show "
            "whether the losses behave as the papers describe at this scale, not how they rank on BEIR or "
            "MS MARCO with full fine-tuning."]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# --------------------------------------------------------------------------------------------------
# Repeated documents and fine-tuning
# --------------------------------------------------------------------------------------------------
def plot_deltas(rows: list[tuple[str, dict]], path: str, title: str) -> str:
    """Horizontal bars: MRR@10 difference against a baseline with its 95% paired-bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    deltas = np.array([c["delta"] for _, c in rows])
    err = np.array([[c["delta"] - c["low"] for _, c in rows], [c["high"] - c["delta"] for _, c in rows]])
    colors = ["tab:green" if c["low"] > 0 else "tab:red" if c["high"] < 0 else "tab:gray" for _, c in rows]
    ax.barh(y, deltas, xerr=err, color=colors, capsize=2)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [name for name, _ in rows], fontsize=7)
    ax.set(xlabel="MRR@10 difference (95% paired-bootstrap interval)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SETTINGS = {
    "shared-docs": ("Several queries per document", "document", "by-document"),
    "same-file": ("Related documents (same source file)", "file", "by-file"),
}


def write_repeated_report(path: str, command: str, info: dict, summary: dict, per_query: dict, zero_shot: dict,
                          stats: dict, bases: list[str], towers: list[str], losses: list[str], picture: str | None,
                          seconds: float) -> None:
    """REPEATED.md: does the doc-doc term hurt when documents repeat in a batch, and does masking help?"""
    out = header("Repeated documents: does the doc-doc term hurt, and does group masking rescue it?", command,
                 seconds, info,
                 "The SamToNe paper's ablation found the doc-doc term hurts when documents repeat in a batch "
                 "(TriviaQA, 17% unique documents) and helps when they are unique (MS MARCO). This report builds "
                 "both kinds of repetition from real text and measures InfoNCE, SamToNe (q2d + q2q), "
                 "bidirectional SamToNe (q2d, q2q, d2q, d2d) and bidirectional SamToNe with `group_ids`, on "
                 "frozen base encoders with trainable SDE / ADE towers (as in [QUALITY.md](QUALITY.md)).")
    out += ["## Data and batches", ""] + data_lines(info) + [
        f"- **Several queries per document** (`shared-docs`): {info['shared-docs_docs']} training documents "
        f"with at least {info['min_queries']} distinct queries each (the docstring's first sentence and its "
        f"further prose sentences, up to {info['max_queries']}; no query repeats another document's or a test "
        f"query): {info['shared-docs_pairs']} pairs. Two queries of one document in one batch make its "
        "document a false negative of both (q2d, d2d), and their queries each other's (q2q): group = the "
        "document.",
        f"- **Related documents** (`same-file`): {info['same-file_pairs']} pairs (one query per document) "
        f"from {info['same-file_files']} whole source files. Functions of one file are distinct documents a "
        "retriever must still tell apart at test time: group = the file.",
        "- Each setting is trained with two batch layouts: `random` (a permutation; the control) and the "
        "repeated one (`by-document`: a document's queries come together; `by-file`: a file's functions "
        f"come together), batches of {info['batch_size']}. How much repeats per batch (first epoch, seed 0):",
        "", "| setting | layout | batches | unique documents / pairs | negatives that are the same document "
        "| negatives from the same file (other documents) |", "|---|---|---|---|---|---|"]
    for key, s in stats.items():
        setting, layout = key
        out.append(f"| {setting} | {layout} | {s['batches']} | {s['unique_doc_fraction']:.1%} | "
                   f"{s['negatives_same_doc']:.1%} | {s['negatives_same_file']:.1%} |")
    out += ["", "`+groups` passes the setting's group ids (document ids in `shared-docs`, file ids in "
            "`same-file`) as `group_ids`: a pair of the same group is not a negative in any block.", "",
            "## Results (test split, MRR@10 and friends; mean ± std over seeds)", ""]
    for base in bases:
        out += [f"### Base: {base}", ""]
        for setting, (title, _, layout) in SETTINGS.items():
            for lay in ("random", layout):
                rows = [(f"{t.upper()} {loss}", summary[(base, setting, lay, t, loss)]) for t in towers
                        for loss in losses if (base, setting, lay, t, loss) in summary]
                if rows:
                    rows.insert(0, ("zero-shot", zero_shot[f"{base} {setting}"]))
                    out += [f"**{title}, `{lay}` batches**", ""] + metrics_table(rows, "tower loss") + [""]
    out += ["## Differences (MRR@10, per-query reciprocal ranks averaged over seeds, 95% paired-bootstrap "
            "interval over test queries)", "",
            "| base | setting | layout | tower | SamToNe - InfoNCE | bi-SamToNe - InfoNCE | "
            "bi-SamToNe+groups - InfoNCE | bi-SamToNe+groups - bi-SamToNe |", "|---|---|---|---|---|---|---|---|"]
    for base in bases:
        for setting, (_, _, layout) in SETTINGS.items():
            for lay in ("random", layout):
                for t in towers:
                    k = (base, setting, lay, t)
                    cells = [comparison_cell(compare(per_query, k + (a,), k + (b,))) for a, b in
                             (("infonce", "samtone"), ("infonce", "bi-samtone"), ("infonce", "bi-samtone+groups"),
                              ("bi-samtone", "bi-samtone+groups"))]
                    out.append(f"| {base} | {setting} | {lay} | {t.upper()} | " + " | ".join(cells) + " |")
    if picture:
        out += ["", f"![{os.path.basename(picture)}]({os.path.relpath(picture, os.path.dirname(path))})"]
    out += ["", "## Reading", ""] + repeated_reading(per_query, bases, towers) + [""]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def repeated_reading(per_query: dict, bases: list[str], towers: list[str]) -> list[str]:
    """Plain sentences from the intervals: the doc-doc term's effect with repetition against the random
    control, and what masking recovers."""
    lines = []
    for setting, (title, group, layout) in SETTINGS.items():
        for base in bases:
            for t in towers:
                k = (base, setting, layout, t)
                hurt = compare(per_query, k + ("samtone",), k + ("bi-samtone",))
                rescue = compare(per_query, k + ("bi-samtone",), k + ("bi-samtone+groups",))
                ctrl = compare(per_query, (base, setting, "random", t, "samtone"),
                               (base, setting, "random", t, "bi-samtone"))
                if not (hurt and rescue):
                    continue
                lines.append(
                    f"- {title}, {base}, {t.upper()}, `{layout}` batches: adding d2q + d2d to SamToNe changes "
                    f"MRR@10 by {hurt['delta']:+.4f} [{hurt['low']:+.4f}, {hurt['high']:+.4f}] ({hurt['verdict']})"
                    + (f"; with random batches by {ctrl['delta']:+.4f} [{ctrl['low']:+.4f}, {ctrl['high']:+.4f}]"
                       f" ({ctrl['verdict']})" if ctrl else "")
                    + f". Masking {group} groups: {rescue['delta']:+.4f} [{rescue['low']:+.4f}, "
                    f"{rescue['high']:+.4f}] against unmasked bi-SamToNe ({rescue['verdict']}).")
    return lines


def write_finetune_report(path: str, command: str, info: dict, summary: dict, per_query: dict, zero_shot: dict,
                          losses: list[str], picture: str | None, seconds: float) -> None:
    """FINETUNE.md: the encoder itself fine-tuned through SamToNeLoss."""
    out = header("Fine-tuning the encoder: InfoNCE, SamToNe, bidirectional SamToNe with masking", command, seconds,
                 info,
                 "The towers of [QUALITY.md](QUALITY.md) sit on a frozen encoder. Here all-MiniLM-L6-v2 itself "
                 "(22M parameters, one encoder for queries and documents: SDE) is fine-tuned through the "
                 "library's sentence-transformers loss, `SamToNeLoss`, on the several-queries-per-document "
                 "pairs of [REPEATED.md](REPEATED.md), in `by-document` batches (documents repeat inside a "
                 "batch). `+groups` is `mask_duplicate_positives=True`: identical documents of a batch share a "
                 "group.")
    out += ["## Data and training", ""] + data_lines(info) + [
        f"- Training: {info['steps']} steps of {info['batch_size']} pairs ({info['steps'] * info['batch_size']} "
        f"pairs seen, of {info['shared-docs_pairs']}; unique documents per batch "
        f"{info['unique_doc_fraction']:.1%}), AdamW lr {info['lr']}, temperature 0.05, "
        f"{info['max_length']} tokens per text, {info['seeds']} seed(s) (a seed sets the batches and the "
        "dropout).", "", "## Results (test split; mean ± std over seeds)", ""]
    rows = [("zero-shot", zero_shot)] + [(loss, summary[(loss,)]) for loss in losses if (loss,) in summary]
    out += metrics_table(rows, "loss") + ["", "## Differences (MRR@10, 95% paired-bootstrap interval over test "
                                          "queries, per-query reciprocal ranks averaged over seeds)", ""]
    pairs = [("infonce", loss) for loss in losses if loss != "infonce"]
    if "bi-samtone" in losses and "bi-samtone+groups" in losses:
        pairs.append(("bi-samtone", "bi-samtone+groups"))
    for a, b in pairs:
        c = compare(per_query, (a,), (b,))
        if c:
            out.append(f"- {b} against {a}: {b} {c['other']:.4f}, {a} {c['base']:.4f}, difference "
                       f"{c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]: {c['verdict']}.")
    if picture:
        out += ["", f"![{os.path.basename(picture)}]({os.path.relpath(picture, os.path.dirname(path))})"]
    out += ["", f"Training took {info['train_minutes']:.1f} min per run on average (2 CPU threads; the machine "
            "ran other work beside it, so the time is an upper bound)."]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
