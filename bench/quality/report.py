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
        out[key] = {
            m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows])))
            for m in rows[0]
            if isinstance(rows[0][m], float)
        }
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
    return [
        f"# {title}",
        "",
        intro,
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min, {platform.machine()} x{os.cpu_count()}, "
        f"torch {torch.__version__}, device {info.get('device', '?')}; MiniLM embeddings "
        f"{info.get('minilm_cache', 'not used')}; commit {info.get('commit', '?')}; written "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC).",
        "",
    ]


def data_lines(info: dict) -> list[str]:
    return [
        f"- Training functions: {info['train_functions']} documented functions of "
        + ", ".join(f"{k} {v}" for k, v in sorted(info["packages"].items()))
        + ".",
        f"- Test: {info['test_pairs']} pairs from {info['test_functions']} documented functions of the "
        f"Python {info['python']} standard library (tests, demos, tkinter, idlelib and generated modules "
        "excluded); the query is the docstring's first sentence, the document the function's code "
        "without its docstring. No test document or query is seen in training (deduplicated exactly, "
        "test split first).",
    ]


# --------------------------------------------------------------------------------------------------
# The main experiment: frozen encoders, random batches
# --------------------------------------------------------------------------------------------------
def plot_probes(
    panels: dict, distances: dict, out_dir: str, stem: str, seed: int, tsne_iterations: int = 1000
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    paths = []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, (q, d)) in zip(axes[0], panels.items()):
        xy = TSNE(
            n_components=2,
            init="pca",
            random_state=seed,
            perplexity=min(30, max(5, len(q) // 4)),
            max_iter=tsne_iterations,
        ).fit_transform(np.concatenate([q, d]))
        ax.scatter(*xy[: len(q)].T, s=5, alpha=0.6, label="query tower")
        ax.scatter(*xy[len(q) :].T, s=5, alpha=0.6, label="document tower")
        ax.set(title=title, xticks=[], yticks=[])
    axes[0][0].legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}-tsne.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, values in distances.items():
        ax.hist(values, bins=40, histtype="step", density=True, label=label)
    ax.set(
        xlabel="cosine distance to the top-1 retrieved document",
        ylabel="density",
        title="Top-1 retrieved distance (test queries)",
    )
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
                lines.append(
                    f"- {base}, {tower.upper()}: SamToNe {c['other']:.4f} vs InfoNCE {c['base']:.4f} "
                    f"({c['delta']:+.4f}, 95% interval [{c['low']:+.4f}, {c['high']:+.4f}]): "
                    f"{c['verdict']}."
                )
    return lines


def probe_reading(probes: dict, base: str) -> list[str]:
    a, b = probes.get(f"{base} ADE infonce"), probes.get(f"{base} ADE samtone")
    if not a or not b:
        return []
    return [
        f"- Alignment of the ADE towers ({base}): {b['alignment']:.4f} with SamToNe against {a['alignment']:.4f} "
        f"with InfoNCE (zero-shot {probes[f'{base} zero-shot']['alignment']:.4f}); lower means a query lies "
        "closer to its own document. Uniformity, query / document tower: SamToNe "
        f"{b['uniformity_query']:.3f} / {b['uniformity_doc']:.3f}, InfoNCE {a['uniformity_query']:.3f} / "
        f"{a['uniformity_doc']:.3f}. Median top-1 retrieved distance: SamToNe {b['top1_median']:.4f}, InfoNCE "
        f"{a['top1_median']:.4f}, zero-shot {probes[f'{base} zero-shot']['top1_median']:.4f} (the SamToNe paper "
        "reads a distribution kept closer to the untrained one as regularisation)."
    ]


def write_report(
    path: str,
    command: str,
    info: dict,
    summary: dict,
    per_query: dict,
    zero_shot: dict,
    probes: dict,
    pictures: list[str],
    bases: list[str],
    seconds: float,
) -> None:
    out = header(
        "Retrieval quality: does SamToNe help?",
        command,
        seconds,
        info,
        "A small proxy experiment, **not** a BEIR or MS MARCO reproduction: CodeSearchNet-style pairs "
        "built from the docstrings and code of installed packages, frozen base encoders with small "
        "trainable towers. The base encoder all-MiniLM-L6-v2 saw CodeSearchNet in its own training, so "
        "its zero-shot numbers are flattered and the headroom for the towers is small. Two companion "
        "reports: [REPEATED.md](REPEATED.md) (batches in which documents repeat, and group masking) and "
        "[FINETUNE.md](FINETUNE.md) (the encoder itself fine-tuned).",
    )
    out += (
        ["## Data", "", f"- Training: {info['train_pairs']} pairs, random batches."]
        + data_lines(info)
        + [
            "- Trivial docstrings and stubs are dropped. Group ids for masking (samtone+groups): near-duplicate "
            f"queries, whose first {GROUP_WORDS} words agree once lowercased ({info.get('train_groups_multi', 0)} "
            f"training groups hold {info.get('train_grouped_pairs', 0)} pairs).",
            "",
            "## Results (test split; mean ± std over seeds)",
            "",
        ]
    )
    for base in bases:
        rows = [("- zero-shot", zero_shot[base])]
        rows += [
            (f"{tower.upper()} {loss}", summary[(base, tower, loss)])
            for tower in TOWERS
            for loss in LOSSES
            if (base, tower, loss) in summary
        ]
        out += [f"### Base: {base}", ""] + metrics_table(rows, "tower loss") + [""]
    out += [
        "## Probes",
        "",
        "Alignment (lower: positives closer), uniformity per tower (lower: more "
        "uniform) and the median cosine distance from a test query to its top-1 retrieved document; first "
        "seed:",
        "",
        "| model | alignment | uniformity (query tower) | uniformity (doc tower) | median top-1 distance |",
        "|---|---|---|---|---|",
    ]
    for name, p in probes.items():
        out.append(
            f"| {name} | {p['alignment']:.4f} | {p['uniformity_query']:.4f} | {p['uniformity_doc']:.4f} "
            f"| {p['top1_median']:.4f} |"
        )
    out.append("")
    for picture in pictures:
        out.append(f"![{os.path.basename(picture)}]({os.path.relpath(picture, os.path.dirname(path))})")
    out += (
        [
            "",
            "## Reading",
            "",
            "SamToNe against InfoNCE, MRR@10 on the test split. The seeds change only the order of the "
            "batches, so their spread is small; the interval is a paired bootstrap over test queries, and a "
            "difference counts only when it excludes 0:",
            "",
        ]
        + reading(per_query, bases)
        + [""]
    )
    out += probe_reading(probes, bases[0])
    out += [
        "- The t-SNE panels need care: every tower starts at the identity over one frozen encoder, so the "
        "two towers' points begin mixed, and a few epochs of linear training move them little; the "
        "separation the SamToNe paper shows for InfoNCE arose in towers trained apart at full scale."
    ]
    out += [
        "",
        "This is one small proxy task: frozen encoders, linear towers, code search. It can show "
        "whether the losses behave as the papers describe at this scale, not how they rank on BEIR or "
        "MS MARCO with full fine-tuning.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# --------------------------------------------------------------------------------------------------
# Repeated documents and fine-tuning
# --------------------------------------------------------------------------------------------------
