"""Per-text arrays kept on disk between training rounds, so a round encodes only new inputs.

Encoding every input again is most of a round's cost (Banking77's 10k texts on a 2-core
AVX2 machine: the trainer took 48.5 s, and the int8 encoder's measured 247 texts/s alone
account for ~40 s of it; the dedup filter encodes them once more in float32), yet between
two rounds only the traffic recorded since the last one is new. Rounds run in a fresh
subprocess by default, so an in-memory cache would be lost: this one lives in a directory.

Layout: ``<root>/<key>/`` per producer configuration, where ``key`` is a hash of what
determines the arrays (model, its weights' fingerprint, precision, layers, ...; written
beside the shards as ``key.json``), and in it shards ``<time>-<id>.safetensors`` of rows:
``digest`` (16 bytes of BLAKE2b of the text) and one array per name. A round reads every
shard, computes the missing texts and writes them as a new shard (temp file and rename,
so readers never see half of one); past ``max_shards`` it writes the rows it used as one
shard and deletes the shards it read, which also forgets texts no round asks for any more.
Concurrent rounds are safe: each only deletes shards it read, duplicate rows are harmless.

The cache only ever saves time: a shard that cannot be read is skipped (and removed), a
write that fails is logged, and either way the texts are computed as without a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Where plugins whose ``feature_cache`` option is ``auto`` keep features (empty: nowhere).
CACHE_ENV = "DISTILL_FEATURE_CACHE"
AUTO = "auto"
DEFAULT_DIR = "./artifacts/features"
SUFFIX = ".safetensors"
DIGEST = "digest"
STALE_TMP_S = 3600

Arrays = dict[str, np.ndarray]


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def files_fingerprint(path: str | Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the files directly in a model directory: a cache key part
    that changes when the weights are replaced under the same path."""
    root = Path(path)
    if not root.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.iterdir() if p.is_file())


def cache_root(configured: str | None) -> Path | None:
    """The cache directory a plugin's ``feature_cache`` option names: a path as given; null:
    off; ``auto`` (the default): ``$DISTILL_FEATURE_CACHE`` (empty: off), which the gateway
    sets to ``features/`` beside its local artifacts when it runs a round, else
    ``./artifacts/features``."""
    if configured is None:
        return None
    if configured == AUTO:
        value = os.environ.get(CACHE_ENV, DEFAULT_DIR)
        return Path(value).expanduser() if value else None
    return Path(configured).expanduser()


class FeatureCache:
    def __init__(self, root: Path, key: dict[str, Any], max_shards: int = 8) -> None:
        blob = json.dumps(key, sort_keys=True, default=str)
        self.key = key
        self.directory = root / hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.max_shards = max_shards

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], Arrays]) -> Arrays:
        """Arrays with one row per text of ``texts``, from the cache where it holds the
        text and from ``compute(missing texts)`` (same names, a row per text) elsewhere."""
        if not texts:
            return compute([])
        digests = [text_digest(t) for t in texts]
        shards, index = self._read()
        first_missing: dict[bytes, int] = {}
        for i, digest in enumerate(digests):
            if digest not in index:
                first_missing.setdefault(digest, i)
        missing = [texts[i] for i in first_missing.values()]
        fresh = compute(missing) if missing else {}
        if any(len(column) != len(missing) for column in fresh.values()):
            raise ValueError("compute returned a different number of rows than texts")
        fresh_row = {digest: row for row, digest in enumerate(first_missing)}
        sources = [(fresh, fresh_row[d]) if d in fresh_row
                   else (shards[index[d][0]][1], index[d][1]) for d in digests]
        names = [n for n in (fresh or sources[0][0]) if n != DIGEST]
        out: Arrays = {}
        for name in names:
            sample = sources[0][0][name]
            column = np.empty((len(texts), *sample.shape[1:]), dtype=sample.dtype)
            for i, (arrays, row) in enumerate(sources):
                column[i] = arrays[name][row]
            out[name] = column
        if missing:
            self._store(shards, digests, out, list(first_missing), fresh)
        log.info("feature cache %s: %d of %d texts cached, %d computed", self.directory.name,
                 len(texts) - len(missing), len(texts), len(missing))
        return out

    def _read(self) -> tuple[list[tuple[Path, Arrays]], dict[bytes, tuple[int, int]]]:
        from safetensors.numpy import load_file

        shards: list[tuple[Path, Arrays]] = []
        index: dict[bytes, tuple[int, int]] = {}
        if not self.directory.is_dir():
            return shards, index
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                arrays = load_file(path)
                rows = {len(a) for a in arrays.values()}
                if DIGEST not in arrays or len(rows) != 1:
                    raise ValueError("not a shard of this cache")
            except FileNotFoundError:
                continue  # compacted away by a concurrent round
            except Exception as exc:  # a torn or foreign file: never worth failing a round
                log.warning("feature cache: skipping and removing %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            number = len(shards)
            shards.append((path, arrays))
            for row, digest in enumerate(arrays[DIGEST]):
                index[digest.tobytes()] = (number, row)
        return shards, index

    def _store(self, shards: list[tuple[Path, Arrays]], digests: list[bytes], out: Arrays,
               fresh_digests: list[bytes], fresh: Arrays) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key_file = self.directory / "key.json"
            if not key_file.exists():
                key_file.write_text(json.dumps(self.key, sort_keys=True, indent=1, default=str))
            if len(shards) < self.max_shards:
                self._write(fresh_digests, fresh)
                return
            # Compact: the rows of this call, once each, replace every shard read.
            first = {digest: i for i, digest in reversed(list(enumerate(digests)))}
            rows = list(first.values())
            self._write(list(first), {name: column[rows] for name, column in out.items()})
            for path, _ in shards:
                path.unlink(missing_ok=True)
            # Temp files of writers that died (a live one renames its file within seconds).
            for path in self.directory.glob(".*.tmp"):
                if time.time() - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink(missing_ok=True)
        except Exception as exc:  # OSError, or safetensors' own error for the same causes
            log.warning("feature cache %s: not written (%s); the next round computes these "
                        "texts again", self.directory, exc)

    def _write(self, digests: list[bytes], arrays: Arrays) -> None:
        from safetensors.numpy import save_file

        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.directory / f".{name}.tmp"
        payload = {DIGEST: np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16),
                   **{k: np.ascontiguousarray(v) for k, v in arrays.items()}}
        save_file(payload, str(tmp))
        os.replace(tmp, self.directory / f"{name}{SUFFIX}")
