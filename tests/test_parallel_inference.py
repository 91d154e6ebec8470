"""Concurrent batches for thread-safe students: the batcher's split over workers, the
thread settings, and the real MiniLM encoder called from several threads at once."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.interfaces import Prediction, Student
from gateway.students import MicroBatcher, StudentPool, all_threads, sized_threads

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


class Recorder:
    """A predict that sleeps like an encoder (the GIL released) and records its batches."""

    def __init__(self, seconds: float = 0.01, fail_on: str | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_at_once = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[Prediction]:
        with self._lock:
            self.batches.append(list(texts))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.seconds)
            if self.fail_on is not None and self.fail_on in texts:
                raise RuntimeError("the student broke")
            return [Prediction(target=t, confidence=1.0) for t in texts]
        finally:
            with self._lock:
                self.running -= 1


def closed_loop(batcher: MicroBatcher, clients: int, rounds: int) -> None:
    async def client(name: str, rng: random.Random) -> None:
        for i in range(rounds):
            await asyncio.sleep(rng.uniform(0, 0.001))  # the network, both ways
            assert (await batcher.predict(f"{name}-{i}")).target == f"{name}-{i}"

    async def main() -> None:
        await asyncio.gather(*(client(str(c), random.Random(c)) for c in range(clients)))

    asyncio.run(main())


def test_two_workers_run_batches_at_once_in_equal_shares() -> None:
    """Eight closed-loop clients, two workers: two batches run at the same time on two
    threads, and once the load settles each holds about half the clients."""
    predict = Recorder(0.02)
    with ThreadPoolExecutor(2) as pool:
        closed_loop(MicroBatcher(predict, pool, workers=2), clients=8, rounds=12)
    sizes = [len(b) for b in predict.batches]
    assert sum(sizes) == 96
    assert predict.most_at_once == 2 and len(predict.threads) == 2
    settled = sizes[len(sizes) // 2:]
    assert max(settled) <= 5 and sum(settled) / len(settled) >= 3, sizes


def test_one_worker_never_runs_two_batches_at_once() -> None:
    predict = Recorder(0.005)
    with ThreadPoolExecutor(2) as pool:
        closed_loop(MicroBatcher(predict, pool, workers=1), clients=8, rounds=5)
    assert predict.most_at_once == 1
    assert sum(len(b) for b in predict.batches) == 40


def test_idle_workers_split_pending_requests_short_texts_with_short() -> None:
    """Requests pending together go to the idle workers in halves by length, so each
    batch pads little; every request gets its own answer."""
    predict = Recorder(0.01)
    texts = ["x" * n for n in (30, 2, 25, 4, 28, 1, 27, 3)]

    async def main() -> list[Prediction]:
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(predict, pool, workers=2)
            return await asyncio.gather(*(batcher.predict(t) for t in texts))

    answers = asyncio.run(main())
    assert [a.target for a in answers] == texts
    assert sorted(map(sorted, predict.batches)) == [
        sorted(t for t in texts if len(t) < 10), sorted(t for t in texts if len(t) > 10)]


def test_a_single_request_is_predicted_at_once_with_two_workers() -> None:
    predict = Recorder(0.0)

    async def main() -> float:
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(predict, pool, workers=2)
            started = time.perf_counter()
            for i in range(20):
                assert (await batcher.predict(f"q{i}")).target == f"q{i}"
            return (time.perf_counter() - started) / 20

    per_request = asyncio.run(main())
    assert [len(b) for b in predict.batches] == [1] * 20
    assert per_request < 0.005  # no gathering delay for one client at a time


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    predict = Recorder(0.01, fail_on="bad")

    async def main() -> list[Any]:
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(predict, pool, workers=2)
            first = await asyncio.gather(*(batcher.predict(t) for t in ["bad", "ok-1"]),
                                         return_exceptions=True)
            later = await batcher.predict("ok-2")
            return [*first, later]

    bad, ok, later = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "broke" in str(bad)
    assert isinstance(ok, Prediction) and ok.target == "ok-1"  # the other worker's batch
    assert later.target == "ok-2"  # the batcher still serves


def test_parallel_inference_threads_use_one_intra_op_thread_each() -> None:
    import torch

    seen: list[int] = []

    def predict(texts: list[str]) -> list[Prediction]:
        seen.append(torch.get_num_threads())
        return [Prediction(target="x", confidence=1.0) for _ in texts]

    run = sized_threads(predict, parallel=True)
    with ThreadPoolExecutor(2) as pool:
        for size in (1, 64, 3):
            assert len(pool.submit(run, ["t"] * size).result()) == size
    assert seen == [1, 1, 1]


class _Safe(Student):
    thread_safe = True

    def predict(self, inputs: list[str]) -> list[Prediction]:
        return [Prediction(target=t, confidence=1.0) for t in inputs]


class _Unsafe(_Safe):
    thread_safe = False


def test_student_pool_gives_thread_safe_students_a_worker_per_core() -> None:
    """A thread-safe student gets a worker per core on the parallel threads; any other
    keeps the single inference thread, one batch at a time, as before."""
    import os

    pool = StudentPool(None, None, {})  # type: ignore[arg-type]  # only the batchers here
    try:
        cores = all_threads()
        assert cores == int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        safe, unsafe = pool._batcher(_Safe()), pool._batcher(_Unsafe())
        assert safe._workers == cores
        assert (safe._executor is pool.parallel_executor) == (cores > 1)
        assert unsafe._workers == 1 and unsafe._executor is pool.executor

        async def ask() -> list[Prediction]:
            return await asyncio.gather(*(b.predict(f"q{i}") for i, b in
                                          enumerate([safe, unsafe, safe])))

        assert [p.target for p in asyncio.run(ask())] == ["q0", "q1", "q2"]
    finally:
        pool.close()


@pytest.mark.skipif(not (DATA / "test_llm_labels.jsonl").is_file(), reason="no Banking77")
def test_minilm_encoder_gives_the_same_features_from_two_threads_at_once() -> None:
    """The bundled int8 encoder is shared by every student of a process; two threads
    encoding at once (tokenizer under its lock, forward passes free) get exactly what
    each batch gets alone."""
    import torch

    from plugins.trainers.embedding_classifier import EmbeddingClassifierOptions
    from plugins.trainers.minilm_encoder import get_encoder

    options = EmbeddingClassifierOptions()
    encoder = get_encoder(options.encoder, options.quantize)
    rows = (DATA / "test_llm_labels.jsonl").read_text().splitlines()[:192]
    texts = [json.loads(row)["text"] for row in rows]
    batches = [texts[i:i + 16] for i in range(0, len(texts), 16)]

    def encode(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
        torch.set_num_threads(1)
        return encoder.encode(batch, options.layers, options.max_tokens,
                              options.predict_batch_size)

    alone = [encode(batch) for batch in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(encode, batches))
    for (emb_a, feats_a), (emb_b, feats_b) in zip(alone, together, strict=True):
        assert np.array_equal(emb_a, emb_b) and np.array_equal(feats_a, feats_b)


@pytest.mark.skipif(not (DATA / "test_llm_labels.jsonl").is_file(), reason="no Banking77")
def test_a_large_encode_runs_its_passes_on_concurrent_threads_with_the_same_result() -> None:
    """A caller allowed two intra-op threads (training, evaluation) gets its passes on two
    threads of one each; the features are those of the same passes run one by one."""
    import torch

    from plugins.trainers.embedding_classifier import EmbeddingClassifierOptions
    from plugins.trainers.minilm_encoder import get_encoder

    options = EmbeddingClassifierOptions()
    encoder = get_encoder(options.encoder, options.quantize)
    rows = (DATA / "test_llm_labels.jsonl").read_text().splitlines()[:100]
    texts = [json.loads(row)["text"] for row in rows]
    threads_seen: set[str] = set()
    original = encoder._encode_chunk

    def spy(*args: Any) -> Any:
        threads_seen.add(threading.current_thread().name)
        return original(*args)

    def encode(threads: int) -> tuple[np.ndarray, np.ndarray]:
        torch.set_num_threads(threads)
        return encoder.encode(texts, options.layers, options.max_tokens, 8)

    with ThreadPoolExecutor(1) as caller:
        one = caller.submit(encode, 1).result()
        encoder._encode_chunk = spy  # type: ignore[method-assign]
        try:
            two = caller.submit(encode, 2).result()
        finally:
            del encoder._encode_chunk
        assert caller.submit(torch.get_num_threads).result() == 2  # the caller's own
    assert len(threads_seen) == 2 and all(n.startswith("distill-encode") for n in threads_seen)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
