"""The MiniLM encoder from several threads at once: its own concurrent passes, and
callers on different threads, give the features of the same passes run one by one."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


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


def test_an_encoder_turns_the_tokenizer_thread_pool_off_unless_the_user_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder runs one pass per core; the fast tokenizer's own thread pool would fight
    those passes for the cores (measured: the gateway 12% slower), so a new encoder turns
    it off, but an explicit choice in the environment stands."""
    import os

    from plugins.trainers.embedding_classifier import EmbeddingClassifierOptions
    from plugins.trainers.minilm_encoder import Encoder, get_encoder

    options = EmbeddingClassifierOptions()
    shared = get_encoder(options.encoder, options.quantize)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    Encoder(shared.ref, shared.model, shared.tokenizer, shared.max_tokens)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    Encoder(shared.ref, shared.model, shared.tokenizer, shared.max_tokens)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
