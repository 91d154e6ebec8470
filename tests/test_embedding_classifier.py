"""The ``embedding-classifier`` trainer on a slice of Banking77 (real encoder, no mocks)."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import load_file

from gateway.interfaces import Example, Prediction
from gateway.plugins import load_plugins
from plugins.classify import ClassifyOptions, ClassifyTask
from plugins.trainers import embedding_classifier as ec
from plugins.trainers.embedding_classifier import (
    HEAD_FILE,
    META_FILE,
    EmbeddingClassifierOptions,
    EmbeddingClassifierStudent,
    EmbeddingClassifierTrainer,
)

# CI clones the repo into another folder with shared/ beside it: always parent-of-repo.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_CSV = DATA / "banking77" / "train.csv"
N_LABELS = 10
N_TRAIN = 600

pytestmark = pytest.mark.skipif(not TRAIN_CSV.is_file(), reason=f"{TRAIN_CSV} is missing")


def banking_slice() -> tuple[list[Example], list[Example], list[str]]:
    """600 training and ~200 held-out rows over 10 Banking77 card intents.

    Card intents (arrival vs delivery estimate, payment not recognised vs fee charged...)
    are close neighbours, so the student makes enough mistakes for the confidence ranking
    to be tested, which the easiest ten intents would not give.
    """
    with TRAIN_CSV.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({r["category"] for r in rows if "card" in r["category"]})[:N_LABELS]
    by_label: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["category"] in labels:
            by_label[r["category"]].append(r["text"])
    examples = [Example(text, label) for label in labels for text in by_label[label][:80]]
    random.Random(0).shuffle(examples)
    return examples[:N_TRAIN], examples[N_TRAIN:], labels


@pytest.fixture(scope="module")
def task() -> ClassifyTask:
    return ClassifyTask("intents", ClassifyOptions())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, task: ClassifyTask
            ) -> tuple[Path, dict[str, Any], list[Example], list[str]]:
    train, held_out, labels = banking_slice()
    out = tmp_path_factory.mktemp("artifact")
    figures = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).train(train, task, out)
    return out, figures, held_out, labels


@pytest.fixture(scope="module")
def predictions(trained: tuple[Path, dict[str, Any], list[Example], list[str]],
                task: ClassifyTask) -> tuple[list[Prediction], list[Example]]:
    out, _, held_out, _ = trained
    # A fresh trainer, as the gateway does when it loads a promoted version.
    student = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(out, task)
    return student.predict([e.input for e in held_out]), held_out


def test_figures(trained: tuple[Path, dict[str, Any], list[Example], list[str]]) -> None:
    _, figures, _, labels = trained
    assert figures["examples"] == N_TRAIN
    assert figures["labels"] == len(labels)
    assert figures["train_seconds"] > 0
    assert 0.5 < figures["cv_agreement"] <= 1.0


def test_held_out_accuracy_well_above_chance(
        predictions: tuple[list[Prediction], list[Example]]) -> None:
    preds, held_out = predictions
    assert len(preds) == len(held_out) > 100
    accuracy = np.mean([p.target == e.target for p, e in zip(preds, held_out, strict=True)])
    assert accuracy > 0.75, accuracy  # chance is 0.1; measured 0.97


def test_confidence_is_a_probability_and_ranks(
        predictions: tuple[list[Prediction], list[Example]]) -> None:
    preds, held_out = predictions
    conf = np.array([p.confidence for p in preds])
    assert all(isinstance(p.confidence, float) for p in preds)
    assert ((conf >= 0) & (conf <= 1)).all()
    correct = np.array([p.target == e.target for p, e in zip(preds, held_out, strict=True)])
    order = np.argsort(-conf, kind="stable")
    high, low = order[: len(order) // 2], order[len(order) // 2:]
    assert correct[high].mean() > correct[low].mean()
    # Calibrated: the mean confidence is close to the accuracy it claims.
    assert abs(conf.mean() - correct.mean()) < 0.1


def test_artifact_is_safetensors_and_json(
        trained: tuple[Path, dict[str, Any], list[Example], list[str]]) -> None:
    out, _, _, labels = trained
    assert sorted(p.name for p in out.iterdir()) == sorted([HEAD_FILE, META_FILE])
    tensors = load_file(str(out / HEAD_FILE))
    assert tensors["lr_weight"].shape[0] == len(labels)
    assert tensors["knn_embeddings"].shape == (N_TRAIN, 384)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["labels"] == labels
    assert meta["options"] == EmbeddingClassifierOptions().model_dump(mode="json")
    assert meta["calibration"]["method"] == "features"
    assert meta["encoder"]["finetuned"] is None


def test_load_is_cheap_and_deterministic(
        trained: tuple[Path, dict[str, Any], list[Example], list[str]],
        task: ClassifyTask) -> None:
    out, _, held_out, _ = trained
    started = time.perf_counter()
    a = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(out, task)
    b = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(out, task)
    assert time.perf_counter() - started < 2.0  # the frozen encoder is cached per process
    assert isinstance(a, EmbeddingClassifierStudent)
    assert a.encoder is b.encoder
    texts = [e.input for e in held_out[:16]]
    assert a.predict(texts) == b.predict(texts)
    # One input alone gets the same answer as inside a batch (padding must not leak).
    alone = a.predict(texts[:1])[0]
    assert alone.target == a.predict(texts)[0].target
    # int8 activations are scaled per encoder pass, so companions move the confidence a
    # little (measured 6e-4); float32 is exact to rounding.
    assert alone.confidence == pytest.approx(a.predict(texts)[0].confidence, abs=5e-3)
    assert a.predict([]) == []


def test_parts_of_a_batch_are_delivered_per_encoder_thread(
        trained: tuple[Path, dict[str, Any], list[Example], list[str]],
        task: ClassifyTask) -> None:
    """predict_parts hands each encoder thread's rows out as soon as that thread is done,
    from that thread: every position once, the same answers as predict."""
    import threading

    import torch

    out, _, held_out, _ = trained
    student = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(out, task)
    texts = [e.input for e in held_out[:32]]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the inference thread's setting for a batch
        expected = student.predict(texts)
        parts: list[tuple[list[int], list[Prediction], int]] = []
        student.predict_parts(texts, lambda rows, preds: parts.append(
            (rows, preds, threading.get_ident())))
    finally:
        torch.set_num_threads(previous)
    assert sorted(i for rows, _, _ in parts for i in rows) == list(range(32))
    got: dict[int, Prediction] = {}
    for rows, preds, _ in parts:
        assert len(rows) == len(preds)
        got.update(zip(rows, preds, strict=True))
    # The heads on 16 rows instead of 32 round differently in the last bits.
    assert [got[i].target for i in range(32)] == [p.target for p in expected]
    assert [got[i].confidence for i in range(32)] == pytest.approx(
        [p.confidence for p in expected], abs=1e-6)
    from gateway.students import all_threads

    if all_threads() > 1:  # one part per pass thread, delivered on it
        # (2 unless one thread took all four passes before the other started)
        assert len(parts) in (1, 2) and len({thread for _, _, thread in parts}) == len(parts)
        assert threading.get_ident() not in {thread for _, _, thread in parts}
    else:
        assert len(parts) == 1
    delivered = len(parts)
    student.predict_parts([], lambda rows, preds: parts.append((rows, preds, 0)))
    assert len(parts) == delivered  # nothing to deliver for no inputs


def test_int8_encoder_by_default_and_old_artifacts_stay_float32(
        trained: tuple[Path, dict[str, Any], list[Example], list[str]],
        task: ClassifyTask, tmp_path: Path) -> None:
    import torch

    out, _, held_out, _ = trained

    def linear_kinds(student: EmbeddingClassifierStudent) -> set[str]:
        return {type(m).__module__ for m in student.encoder.model.modules()
                if "Linear" in type(m).__name__}

    int8 = EmbeddingClassifierTrainer().load(out, task)
    assert all("quantized" in kind for kind in linear_kinds(int8)), linear_kinds(int8)
    # An artifact written before the option existed was trained on float32 features: it
    # must load a float32 encoder, whatever the current default.
    old = tmp_path / "old"
    old.mkdir()
    (old / HEAD_FILE).write_bytes((out / HEAD_FILE).read_bytes())
    meta = json.loads((out / META_FILE).read_text())
    del meta["options"]["quantize"]
    (old / META_FILE).write_text(json.dumps(meta))
    fp32 = EmbeddingClassifierTrainer().load(old, task)
    assert fp32.options.quantize == "none"
    assert isinstance(next(fp32.encoder.model.parameters()), torch.nn.Parameter)
    assert not any("quantized" in kind for kind in linear_kinds(fp32))
    # The same heads on both encoders mostly agree: int8 moves features only slightly.
    texts = [e.input for e in held_out]
    same = np.mean([a.target == b.target for a, b in
                    zip(int8.predict(texts), fp32.predict(texts), strict=True)])
    assert same > 0.9, same


def test_knn_index_finds_the_exact_neighbours() -> None:
    """The int8 index re-scores its candidates in float32: on a memory of clusters where
    int8 similarities alone pick a different top 10 for most queries, the votes equal the
    exact search's; a large enough memory gets the index in the head, on first use."""
    import torch

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 384))
    bank = np.repeat(centres, 100, axis=0) + 0.2 * rng.standard_normal((4000, 384))
    bank = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, 12, len(bank))
    queries = centres[rng.integers(0, 40, 300)] + 0.2 * rng.standard_normal((300, 384))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    index = ec.KnnIndex(bank)
    int8 = index.int8(torch.from_numpy(queries)).numpy()
    rough = np.sort(np.argsort(-int8, axis=1)[:, :10], axis=1)
    true = np.sort(np.argsort(-(queries @ bank.T), axis=1)[:, :10], axis=1)
    assert (rough != true).any(axis=1).mean() > 0.5  # int8 alone picks other neighbours
    exact = ec.knn_probs(bank, labels, queries, 12, 10, 0.05)
    indexed = ec.knn_probs(bank, labels, queries, 12, 10, 0.05, index=index)
    # Where the 10th and 11th neighbours tie to float32 rounding (7e-8 apart was seen),
    # the two searches' summation orders may pick either: those queries are not compared.
    ranked = np.sort(queries.astype(np.float64) @ bank.T.astype(np.float64), axis=1)
    tie = ranked[:, -10] - ranked[:, -11] < 1e-6
    assert tie.sum() <= 3
    assert np.allclose(indexed[~tie], exact[~tie], atol=1e-6)
    head = ec.Head(labels=[str(i) for i in range(12)], lr_weight=np.zeros((12, 384)),
                   lr_bias=np.zeros(12), bank=bank, bank_labels=labels,
                   label_counts=np.bincount(labels, minlength=12).astype(float),
                   calibrator=ec.Calibrator("none", [], [], [], [], 0.0))
    assert head._index is None  # built on first use: a trainer that only saves never pays
    assert head.index is not None
    small = dataclasses.replace(head, bank=bank[:100], bank_labels=labels[:100])
    assert small.index is None  # reading a small float32 memory is cheap


def test_encoder_runs_the_direct_path_from_python_when_tracing_fails(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """TorchScript is optional: if tracing fails (an unusual model, a torch without the
    tracer), the direct path still serves, called from Python, with the same features."""
    from plugins.trainers import minilm_encoder
    from plugins.trainers.minilm_encoder import BUNDLED_ENCODER, Encoder

    texts = ["where is my card?", "I was charged twice for the same coffee, please refund me"]
    traced = Encoder.from_sentence_transformer(BUNDLED_ENCODER)
    expected, _ = traced.encode(texts, [-1], 256, 16)

    def no_tracer(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tracing is not available")

    monkeypatch.setattr(minilm_encoder, "_trace", no_tracer)
    encoder = Encoder.from_sentence_transformer(BUNDLED_ENCODER)
    with caplog.at_level("WARNING", logger="distill_gateway.embedding_classifier"):
        emb, _ = encoder.encode(texts, [-1], 256, 16)
    assert encoder._direct is True and encoder._graph is not None
    assert not hasattr(encoder._graph, "graph")  # the Python module, not a trace
    assert "could not trace" in caplog.text
    assert float(np.abs(emb - expected).max()) < 1e-5


def test_passes_even_out_the_work_and_encode_the_same() -> None:
    """A batch is cut into passes of about equal padded work (long texts in small passes),
    every text in exactly one; the features do not depend on how the batch was cut."""
    import torch

    from plugins.trainers.minilm_encoder import (
        BUNDLED_ENCODER,
        balanced_passes,
        get_encoder,
        pass_count,
    )

    rng = random.Random(0)
    lengths = sorted([rng.randint(10, 60) for _ in range(28)] + [180, 200, 220, 240])
    order = list(range(len(lengths)))

    def work(run: list[int]) -> int:
        return len(run) * max(lengths[i] for i in run)

    runs = balanced_passes(lengths, order, 4, 16)
    assert sorted(i for run in runs for i in run) == order
    assert len(runs) <= 4 and all(1 <= len(run) <= 16 for run in runs)
    assert runs[0][0] == order[-1]  # the longest texts first: they start first
    equal = [order[start:start + 8] for start in range(0, len(order), 8)]
    assert max(map(work, runs)) < 0.6 * max(map(work, equal)), (runs, equal)
    assert balanced_passes([], [], 4, 16) == []
    # A whole number of passes per thread when threads share them.
    assert [pass_count(n, 8, 2) for n in (1, 8, 9, 20, 32, 33)] == [1, 1, 2, 4, 4, 6]
    assert [pass_count(n, 8, 1) for n in (20, 33)] == [3, 5]
    assert pass_count(3, 1, 2) == 3  # never more passes than texts
    assert balanced_passes([5, 5, 5], [2, 0, 1], 1, 2) == [[1, 0], [2]]  # `most` wins

    texts = [("please " * (n // 7)).strip() or "hi" for n in lengths]
    encoder = get_encoder(BUNDLED_ENCODER, "none")  # float32: int8 scales per pass
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # passes on this thread, one after another
        one_by_one = np.vstack([encoder.encode([t], [4, 6], 256, 1)[1] for t in texts])
        torch.set_num_threads(2)  # concurrent passes where the machine has the cores
        batched = encoder.encode(texts, [4, 6], 256, 8)[1]
    finally:
        torch.set_num_threads(previous)
    assert float(np.abs(batched - one_by_one).max()) < 1e-4


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_direct_bert_path_matches_transformers(quantize: str) -> None:
    """The encoder calls MiniLM's layers itself (no transformers machinery per call); its
    hidden states are transformers' own: exactly for one text, and on the real tokens of a
    padded batch in float32 (int8 scales activations per pass, see the path's docstring).
    The path serves as a traced TorchScript graph that gives the same states."""
    import torch

    from plugins.trainers.minilm_encoder import BUNDLED_ENCODER, Encoder

    encoder = Encoder.from_sentence_transformer(BUNDLED_ENCODER)
    if quantize == "int8":
        encoder = encoder.quantized()
    texts = ["where is my card?", "I was charged twice for the same coffee, please refund me"]
    with torch.inference_mode():
        for text in texts:
            enc = encoder._tokenize([text], 256)
            expected = encoder.model(**enc, output_hidden_states=True).hidden_states
            got = encoder._bert_states(enc)
            assert len(got) == len(expected) == 7
            for a, b in zip(got, expected, strict=True):
                assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
        enc = encoder._tokenize(texts, 256)
        assert not bool(enc["attention_mask"].all())  # a padded batch
        expected = encoder.model(**enc, output_hidden_states=True).hidden_states
        got = encoder._bert_states(enc)
        real = enc["attention_mask"].bool()
        if quantize == "none":
            for a, b in zip(got, expected, strict=True):
                assert torch.allclose(a[real], b[real], atol=1e-4)
        assert float(got[-1][~real].abs().max()) == 0.0  # padding is zeroed
    emb, _ = encoder.encode(texts, [-1], 256, 16)
    assert encoder._direct is True  # the check at first use passed: this path serves
    assert isinstance(encoder._graph, torch.jit.ScriptModule)  # ... traced
    with torch.inference_mode():
        for batch in (texts[:1], texts, [*texts, "a third, much longer text " * 5]):
            enc = encoder._tokenize(batch, 256)  # shapes other than the traced example's
            traced = encoder._hidden_states(enc)
            for a, b in zip(traced, encoder._bert_states(enc), strict=True):
                assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    alone, _ = encoder.encode(texts[:1], [-1], 256, 16)
    if quantize == "none":
        assert float(np.abs(emb[0] - alone[0]).max()) < 1e-5
    else:  # int8 noise: measured cosine 0.98 to float32, alone or batched, either path
        assert float(emb[0] @ alone[0]) > 0.95


def test_registers_through_the_hook() -> None:
    seen: dict[str, Any] = {}
    ec.register_trainers(lambda name, cls: seen.__setitem__(name, cls))
    assert seen == {"embedding-classifier": EmbeddingClassifierTrainer}
    # And through the plugin manager, as a config's `plugins:` entry would load it.
    plugins = load_plugins(["plugins.trainers.embedding_classifier"])
    assert plugins.trainers.get("embedding-classifier") is EmbeddingClassifierTrainer


def test_options_are_strict_and_documented() -> None:
    with pytest.raises(ValidationError):
        EmbeddingClassifierOptions.model_validate({"no_such_option": 1})
    with pytest.raises(ValidationError):
        EmbeddingClassifierOptions(layers=[0])
    for name, field in EmbeddingClassifierOptions.model_fields.items():
        assert field.description, name


def test_rare_and_single_labels(tmp_path: Path, task: ClassifyTask) -> None:
    """Labels seen once, and a dataset with one label, still train and predict."""
    examples = [Example(f"where is my card number {i}", "card_arrival") for i in range(12)]
    examples.append(Example("what is the exchange rate today", "exchange_rate"))
    for name in ("two", "one", "bad", "empty"):  # the core hands train() an existing folder
        (tmp_path / name).mkdir()
    trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions())
    trainer.train(examples, task, tmp_path / "two")
    student = trainer.load(tmp_path / "two", task)
    preds = student.predict(["my card has not arrived", "exchange rate for euros"])
    assert {p.target for p in preds} <= {"card_arrival", "exchange_rate"}
    assert all(0.0 <= p.confidence <= 1.0 for p in preds)

    trainer.train(examples[:5], task, tmp_path / "one")
    only = trainer.load(tmp_path / "one", task).predict(["anything at all"])
    assert only[0].target == "card_arrival"
    assert 0.0 <= only[0].confidence <= 1.0

    with pytest.raises(ValueError):
        trainer.train([], task, tmp_path / "empty")


def test_structured_targets_are_classes(tmp_path: Path) -> None:
    """An extract task's objects: each distinct answer is a class, predicted back as the
    object (not its text), so the cascade renders and compares it like a teacher answer."""
    from plugins.extract import ExtractOptions, ExtractTask

    extract = ExtractTask("slots", ExtractOptions())
    block = {"intents": ["block", "card"], "slots": {}}
    balance = {"intents": ["balance"], "slots": {}}
    examples = [Example(f"please block my card now {i}", block) for i in range(10)]
    examples += [Example(f"how much money is in my account {i}", balance) for i in range(10)]
    examples.append(Example("send 50 euros to Anna", {"intents": ["transfer"],
                                                         "slots": {"amount": "50 euros"}}))
    trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions())
    trainer.train(examples, extract, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["rendered_targets"] is True
    assert extract.render(block) in meta["labels"]
    preds = trainer.load(tmp_path, extract).predict(["block my card please",
                                                     "what is my account balance"])
    assert [p.target for p in preds] == [block, balance]
    assert extract.agree(preds[0].target, {"slots": {}, "intents": ["block", "card"]})


def test_encoder_tuning_option(tmp_path: Path, task: ClassifyTask) -> None:
    """The opt-in contrastive tuning saves its encoder (safetensors) and loads it back."""
    train, held_out, _ = banking_slice()
    options = EmbeddingClassifierOptions(finetune_epochs=0.2, finetune_batch_size=8)
    figures = EmbeddingClassifierTrainer(options).train(train[:150], task, tmp_path)
    assert figures["finetune_steps"] >= 1
    assert figures["calibration_examples"] == 30
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
    student = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(tmp_path, task)
    assert student.encoder is not ec.get_encoder(options.encoder)  # private to the artifact
    preds = student.predict([e.input for e in held_out[:40]])
    accuracy = np.mean([p.target == e.target for p, e in zip(preds, held_out[:40], strict=True)])
    assert accuracy > 0.5
