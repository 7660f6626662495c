"""The reports of ``--repeated`` (REPEATED.md) and ``--finetune`` (FINETUNE.md), over the summaries and
table helpers of ``report``."""

from __future__ import annotations

import os

import numpy as np

from .report import compare, comparison_cell, data_lines, header, metrics_table


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


def write_repeated_report(
    path: str,
    command: str,
    info: dict,
    summary: dict,
    per_query: dict,
    zero_shot: dict,
    stats: dict,
    bases: list[str],
    towers: list[str],
    losses: list[str],
    picture: str | None,
    seconds: float,
) -> None:
    """REPEATED.md: does the doc-doc term hurt when documents repeat in a batch, and does masking help?"""
    out = header(
        "Repeated documents: does the doc-doc term hurt, and does group masking rescue it?",
        command,
        seconds,
        info,
        "The SamToNe paper's ablation found the doc-doc term hurts when documents repeat in a batch "
        "(TriviaQA, 17% unique documents) and helps when they are unique (MS MARCO). This report builds "
        "both kinds of repetition from real text and measures InfoNCE, SamToNe (q2d + q2q), "
        "bidirectional SamToNe (q2d, q2q, d2q, d2d) and bidirectional SamToNe with `group_ids`, on "
        "frozen base encoders with trainable SDE / ADE towers (as in [QUALITY.md](QUALITY.md)).",
    )
    out += (
        ["## Data and batches", ""]
        + data_lines(info)
        + [
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
            "",
            "| setting | layout | batches | unique documents / pairs | negatives that are the same document "
            "| negatives from the same file (other documents) |",
            "|---|---|---|---|---|---|",
        ]
    )
    for key, s in stats.items():
        setting, layout = key
        out.append(
            f"| {setting} | {layout} | {s['batches']} | {s['unique_doc_fraction']:.1%} | "
            f"{s['negatives_same_doc']:.1%} | {s['negatives_same_file']:.1%} |"
        )
    out += [
        "",
        "`+groups` passes the setting's group ids (document ids in `shared-docs`, file ids in "
        "`same-file`) as `group_ids`: a pair of the same group is not a negative in any block.",
        "",
        "## Results (test split, MRR@10 and friends; mean ± std over seeds)",
        "",
    ]
    for base in bases:
        out += [f"### Base: {base}", ""]
        for setting, (title, _, layout) in SETTINGS.items():
            for lay in ("random", layout):
                rows = [
                    (f"{t.upper()} {loss}", summary[(base, setting, lay, t, loss)])
                    for t in towers
                    for loss in losses
                    if (base, setting, lay, t, loss) in summary
                ]
                if rows:
                    rows.insert(0, ("zero-shot", zero_shot[f"{base} {setting}"]))
                    out += [f"**{title}, `{lay}` batches**", ""] + metrics_table(rows, "tower loss") + [""]
    pairs = differences(losses)
    out += [
        "## Differences (MRR@10, per-query reciprocal ranks averaged over seeds, 95% paired-bootstrap "
        "interval over test queries)",
        "",
        "| base | setting | layout | tower | " + " | ".join(f"{_label(b)} - {_label(a)}" for a, b in pairs) + " |",
        "|---|---|---|---|" + "---|" * len(pairs),
    ]
    for base in bases:
        for setting, (_, _, layout) in SETTINGS.items():
            for lay in ("random", layout):
                for t in towers:
                    k = (base, setting, lay, t)
                    cells = [comparison_cell(compare(per_query, k + (a,), k + (b,))) for a, b in pairs]
                    out.append(f"| {base} | {setting} | {lay} | {t.upper()} | " + " | ".join(cells) + " |")
    if picture:
        out += ["", f"![{os.path.basename(picture)}]({os.path.relpath(picture, os.path.dirname(path))})"]
    out += ["", "## Reading", ""] + repeated_reading(per_query, bases, towers) + [""]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _label(loss: str) -> str:
    return loss.replace("infonce", "InfoNCE").replace("samtone", "SamToNe")


def differences(losses: list[str]) -> list[tuple[str, str]]:
    """The pairs a report compares: every loss against the first (InfoNCE), each ``+groups`` or
    ``+margin`` variant against its plain loss where both ran."""
    first = losses[0]
    pairs = [(first, loss) for loss in losses[1:]]
    for loss in losses:
        for suffix in ("+groups", "+margin"):
            if loss.endswith(suffix) and loss[: -len(suffix)] in losses and loss[: -len(suffix)] != first:
                pairs.append((loss[: -len(suffix)], loss))
    return pairs


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
                ctrl = compare(
                    per_query, (base, setting, "random", t, "samtone"), (base, setting, "random", t, "bi-samtone")
                )
                if not (hurt and rescue):
                    continue
                lines.append(
                    f"- {title}, {base}, {t.upper()}, `{layout}` batches: adding d2q + d2d to SamToNe changes "
                    f"MRR@10 by {hurt['delta']:+.4f} [{hurt['low']:+.4f}, {hurt['high']:+.4f}] ({hurt['verdict']})"
                    + (
                        f"; with random batches by {ctrl['delta']:+.4f} [{ctrl['low']:+.4f}, {ctrl['high']:+.4f}]"
                        f" ({ctrl['verdict']})"
                        if ctrl
                        else ""
                    )
                    + f". Masking {group} groups: {rescue['delta']:+.4f} [{rescue['low']:+.4f}, "
                    f"{rescue['high']:+.4f}] against unmasked bi-SamToNe ({rescue['verdict']})."
                )
    return lines


def write_finetune_report(
    path: str,
    command: str,
    info: dict,
    summary: dict,
    per_query: dict,
    zero_shot: dict,
    losses: list[str],
    picture: str | None,
    seconds: float,
) -> None:
    """FINETUNE.md: the encoder itself fine-tuned through SamToNeRankingLoss."""
    out = header(
        "Fine-tuning the encoder: InfoNCE, SamToNe, bidirectional SamToNe with masking",
        command,
        seconds,
        info,
        "The towers of [QUALITY.md](QUALITY.md) sit on a frozen encoder. Here all-MiniLM-L6-v2 itself "
        "(22M parameters, one encoder for queries and documents: SDE) is fine-tuned through the "
        "library's sentence-transformers loss, `SamToNeRankingLoss`, on the several-queries-per-document "
        "pairs of [REPEATED.md](REPEATED.md), in `by-document` batches (documents repeat inside a "
        "batch). `+groups` is `mask_duplicate_positives=True`: identical documents of a batch share a "
        "group.",
    )
    out += (
        ["## Data and training", ""]
        + data_lines(info)
        + [
            f"- Training: {info['steps']} steps of {info['batch_size']} pairs ({info['steps'] * info['batch_size']} "
            f"pairs seen, of {info['shared-docs_pairs']}; unique documents per batch "
            f"{info['unique_doc_fraction']:.1%}), AdamW lr {info['lr']}, temperature 0.05, "
            f"{info['max_length']} tokens per text, {info['seeds']} seed(s) (a seed sets the batches and the "
            "dropout).",
            "",
            "## Results (test split; mean ± std over seeds)",
            "",
        ]
    )
    rows = [("zero-shot", zero_shot)] + [(loss, summary[(loss,)]) for loss in losses if (loss,) in summary]
    out += metrics_table(rows, "loss") + [
        "",
        "## Differences (MRR@10, 95% paired-bootstrap interval over test "
        "queries, per-query reciprocal ranks averaged over seeds)",
        "",
    ]
    pairs = [("infonce", loss) for loss in losses if loss != "infonce"]
    if "bi-samtone" in losses and "bi-samtone+groups" in losses:
        pairs.append(("bi-samtone", "bi-samtone+groups"))
    for a, b in pairs:
        c = compare(per_query, (a,), (b,))
        if c:
            out.append(
                f"- {b} against {a}: {b} {c['other']:.4f}, {a} {c['base']:.4f}, difference "
                f"{c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]: {c['verdict']}."
            )
    if picture:
        out += ["", f"![{os.path.basename(picture)}]({os.path.relpath(picture, os.path.dirname(path))})"]
    out += [
        "",
        f"Training took {info['train_minutes']:.1f} min per run on average (2 CPU threads; the machine "
        "ran other work beside it, so the time is an upper bound).",
    ]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
