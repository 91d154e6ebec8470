"""The feature cache on disk: what a training round reuses from earlier rounds."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gateway.feature_cache import CACHE_ENV, FeatureCache, cache_root
from gateway.interfaces import Example
from plugins.classify import ClassifyOptions, ClassifyTask
from plugins.filters.dedup import DedupFilter, DedupOptions
from plugins.trainers.embedding_classifier import (
    EmbeddingClassifierOptions,
    EmbeddingClassifierTrainer,
    frozen_features,
    get_encoder,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def banking_texts(n: int) -> list[tuple[str, str]]:
    with (DATA / "train.csv").open(newline="") as handle:
        return [(r["text"], r["category"]) for r in csv.DictReader(handle)][:n]


class Producer:
    """A deterministic producer of two arrays per text that counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        self.asked.append(list(texts))
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "big") for t in texts]
        vectors = np.array([np.random.default_rng(s).normal(size=3) for s in seeds],
                           dtype=np.float32).reshape(len(texts), 3)
        return {"vector": vectors, "length": np.array([len(t) for t in texts], np.int64)}


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def test_only_missing_texts_are_computed_and_rows_follow_the_texts(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"producer": "test"})
    produce = Producer()
    first = cache.get(["a", "bb", "a", "ccc"], produce)
    assert produce.asked == [["a", "bb", "ccc"]]  # a repeated text is computed once
    assert first["length"].tolist() == [1, 2, 1, 3]
    again = FeatureCache(tmp_path, {"producer": "test"})  # another round, another process
    second = again.get(["ccc", "dddd", "a"], produce)
    assert produce.asked[1:] == [["dddd"]]
    assert second["length"].tolist() == [3, 4, 1]
    expected = Producer()(["ccc", "dddd", "a"])
    np.testing.assert_array_equal(second["vector"], expected["vector"])
    assert len(shards(cache.directory)) == 2
    assert (cache.directory / "key.json").is_file()
    # Everything cached: nothing computed, nothing written.
    assert again.get(["a", "dddd"], produce)["length"].tolist() == [1, 4]
    assert len(produce.asked) == 2 and len(shards(cache.directory)) == 2


def test_a_different_key_is_a_different_cache(tmp_path: Path) -> None:
    produce = Producer()
    FeatureCache(tmp_path, {"producer": "test", "layers": [1]}).get(["a"], produce)
    FeatureCache(tmp_path, {"producer": "test", "layers": [2]}).get(["a"], produce)
    assert produce.asked == [["a"], ["a"]]


def test_past_max_shards_the_rows_of_the_call_replace_every_shard(tmp_path: Path) -> None:
    produce = Producer()
    for texts in (["a"], ["b"], ["c"]):
        FeatureCache(tmp_path, {"k": 1}, max_shards=3).get(texts, produce)
    cache = FeatureCache(tmp_path, {"k": 1}, max_shards=3)
    out = cache.get(["b", "c", "d", "c"], produce)
    assert produce.asked[-1] == ["d"]
    [only] = shards(cache.directory)
    stored = load_file(only)
    assert sorted(stored["length"].tolist()) == [1, 1, 1]  # b, c, d once each; a forgotten
    assert len(stored["digest"]) == 3 and stored["digest"].shape[1] == 16
    np.testing.assert_array_equal(out["vector"], Producer()(["b", "c", "d", "c"])["vector"])
    cache.get(["a"], produce)
    assert produce.asked[-1] == ["a"]


def test_compaction_removes_what_dead_writers_left(tmp_path: Path) -> None:
    import os
    import time

    cache = FeatureCache(tmp_path, {"k": 1}, max_shards=1)
    cache.get(["a"], Producer())
    dead, live = cache.directory / ".dead.tmp", cache.directory / ".live.tmp"
    for path in (dead, live):
        path.write_bytes(b"partial")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    cache.get(["b"], Producer())  # compacts
    assert not dead.exists() and live.exists()


def test_a_torn_shard_is_skipped_and_removed(tmp_path: Path) -> None:
    produce = Producer()
    cache = FeatureCache(tmp_path, {"k": 1})
    cache.get(["a", "b"], produce)
    [shard] = shards(cache.directory)
    shard.write_bytes(shard.read_bytes()[:40])
    assert cache.get(["a", "b"], produce)["length"].tolist() == [1, 1]
    assert produce.asked[-1] == ["a", "b"]
    assert not shard.exists() and len(shards(cache.directory)) == 1


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    produce = Producer()
    out = FeatureCache(blocked, {"k": 1}).get(["a", "bb"], produce)
    assert out["length"].tolist() == [1, 2]


def test_auto_follows_the_environment_and_a_path_is_taken_as_given(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root("auto") == tmp_path
    assert cache_root("./elsewhere") == Path("./elsewhere") and cache_root(None) is None
    monkeypatch.setenv(CACHE_ENV, "")
    assert cache_root("auto") is None and cache_root("./elsewhere") == Path("./elsewhere")
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root("auto") == Path("./artifacts/features")


def test_a_round_keeps_features_beside_its_artifacts(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    from gateway.config import load_settings
    from gateway.training import Workspace

    monkeypatch.delenv(CACHE_ENV)
    settings = load_settings(None, database=f"sqlite:///{tmp_path / 'db.sqlite'}",
                             artifacts=str(tmp_path / "artifacts"))
    workspace = Workspace(settings)
    workspace.engine.dispose()
    assert cache_root("auto") == tmp_path / "artifacts" / "features"
    # A setting of the user's own stands.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    Workspace(settings).engine.dispose()
    assert cache_root("auto") == tmp_path / "mine"


def test_a_second_round_encodes_only_the_new_inputs(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV)
    rows = banking_texts(160)
    task = ClassifyTask("intents", ClassifyOptions())
    cached = EmbeddingClassifierOptions(feature_cache=str(tmp_path / "features"))
    first = [Example(t, c) for t, c in rows[:120]]
    trainer = EmbeddingClassifierTrainer(cached)
    for version in ("v1", "v2", "plain"):
        (tmp_path / version).mkdir()
    trainer.train(first, task, tmp_path / "v1")
    [directory] = (tmp_path / "features").iterdir()
    [shard] = shards(directory)
    assert len(load_file(shard)["digest"]) == len({e.input for e in first})
    # The first round encoded everything in one call, exactly as without a cache.
    plain = EmbeddingClassifierOptions(feature_cache=None)
    EmbeddingClassifierTrainer(plain).train(first, task, tmp_path / "plain")
    a, b = (load_file(tmp_path / v / "head.safetensors") for v in ("v1", "plain"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])

    second = [Example(t, c) for t, c in rows]
    trainer.train(second, task, tmp_path / "v2")
    assert [len(load_file(s)["digest"]) for s in shards(directory)] == [120, 40]
    # What the cache gives is what encoding afresh gives: exactly in float32; in int8 up to
    # the activations' per-pass scales, which move a text's embedding as much between any
    # two passes (cosine ~0.97 on average here).
    texts = [e.input for e in second]
    for quantize in ("none", "int8"):
        on = cached.model_copy(update={"quantize": quantize})
        off = plain.model_copy(update={"quantize": quantize})
        encoder = get_encoder(on.encoder, quantize)
        frozen_features(encoder, texts[:120], on, task.name)  # int8: cached by the rounds
        emb, feats = frozen_features(encoder, texts[100:], on, task.name)  # cached and fresh
        fresh_emb, fresh_feats = frozen_features(encoder, texts[100:], off, task.name)
        if quantize == "none":
            np.testing.assert_allclose(emb, fresh_emb, atol=1e-5)
            np.testing.assert_allclose(feats, fresh_feats, atol=1e-5)
        else:
            assert np.mean(np.sum(emb * fresh_emb, axis=1)) > 0.95


def test_the_dedup_filter_keeps_embeddings_between_rounds(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV)
    task = ClassifyTask("intents", ClassifyOptions())
    texts = [t for t, _ in banking_texts(200)]
    examples = [Example(t, "x") for t in texts] + [Example(texts[0] + "!!", "x")]
    cached = DedupFilter(DedupOptions(feature_cache=str(tmp_path), cache_size=0))
    plain = DedupFilter(DedupOptions(feature_cache=None, cache_size=0))
    kept = cached.filter(examples[:150], task)
    assert kept == plain.filter(examples[:150], task)
    kept = cached.filter(examples, task)
    assert kept == plain.filter(examples, task)
    [directory] = tmp_path.iterdir()
    sizes = [len(load_file(s)["digest"]) for s in shards(directory)]
    # Another task's rounds keep a cache of their own: compacting one never drops the
    # other's inputs.
    cached.filter(examples[:10], ClassifyTask("other", ClassifyOptions()))
    assert len(list(tmp_path.iterdir())) == 2
    assert sizes[0] == 150 and sum(sizes) <= len(set(texts)) + 1


def test_a_round_evaluates_a_version_from_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV)
    rows = banking_texts(200)
    task = ClassifyTask("intents", ClassifyOptions())
    options = EmbeddingClassifierOptions(feature_cache=str(tmp_path / "features"),
                                         quantize="none")
    trainer = EmbeddingClassifierTrainer(options)
    (tmp_path / "v1").mkdir()
    trainer.train([Example(t, c) for t, c in rows[:150]], task, tmp_path / "v1")
    student = trainer.load(tmp_path / "v1", task)
    inputs = [t for t, _ in rows]
    offline = student.predict_offline(inputs)
    [directory] = (tmp_path / "features").iterdir()
    assert [len(load_file(s)["digest"]) for s in shards(directory)] == [150, 50]
    served = student.predict(inputs)
    assert [p.target for p in offline] == [p.target for p in served]
    np.testing.assert_allclose([p.confidence for p in offline],
                               [p.confidence for p in served], atol=1e-4)
    assert student.predict_offline([]) == []


def test_concurrent_rounds_read_write_and_compact_safely(tmp_path: Path) -> None:
    """Rounds of different tasks may share a cache directory: while some add shards,
    others compact and delete the shards they read."""
    from concurrent.futures import ThreadPoolExecutor

    vocabulary = [f"text {i}" for i in range(60)]

    def rounds(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(12):
            texts = [vocabulary[i] for i in rng.choice(len(vocabulary), 20)]
            out = FeatureCache(tmp_path, {"k": 1}, max_shards=2).get(texts, Producer())
            np.testing.assert_array_equal(out["vector"], Producer()(texts)["vector"])
            assert out["length"].tolist() == [len(t) for t in texts]

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(rounds, seed) for seed in range(4)]:
            future.result()
    [directory] = tmp_path.iterdir()
    assert not list(directory.glob(".*.tmp"))
    assert 1 <= len(shards(directory)) <= 2 + 4  # compacted, give or take concurrent adds
