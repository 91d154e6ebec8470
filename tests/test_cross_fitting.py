"""Cross-fitted calibration (``policy.calibration: crossfit``): one head per fold of the
inputs, each input answered by the head that never trained on it, and a training round
that calibrates on every recorded label (real encoder, real store, no mocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from typer.testing import CliRunner

from gateway.cli import app as cli
from gateway.config import load_settings
from gateway.datasets import import_file
from gateway.interfaces import Example, Prediction, Trainer, input_bucket, input_fold
from gateway.training import Workspace, is_held_out
from plugins.classify import ClassifyOptions, ClassifyTask
from plugins.trainers.embedding_classifier import (
    HEAD_FILE,
    META_FILE,
    EmbeddingClassifierOptions,
    EmbeddingClassifierTrainer,
)
from plugins.trainers.heads import FoldedHead, KnnIndex, knn_probs
from tests.test_embedding_classifier import TRAIN_CSV, banking_slice

FOLDS = 5

pytestmark = pytest.mark.skipif(not TRAIN_CSV.is_file(), reason=f"{TRAIN_CSV} is missing")


@pytest.fixture(scope="module")
def task() -> ClassifyTask:
    return ClassifyTask("intents", ClassifyOptions())


@pytest.fixture(scope="module")
def cross_fitted(tmp_path_factory: pytest.TempPathFactory, task: ClassifyTask
                 ) -> tuple[Path, dict[str, Any], list[Prediction], list[Example], list[Example]]:
    train, held_out, _ = banking_slice()
    out = tmp_path_factory.mktemp("crossfit")
    trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions())
    figures, out_of_fold = trainer.train_cross_fitted(train, task, out, FOLDS)
    return out, figures, out_of_fold, train, held_out


def test_folds_come_from_a_hash_of_the_input() -> None:
    texts = [f"where is my card {i}" for i in range(2000)]
    folds = [input_fold(t, FOLDS) for t in texts]
    assert folds == [input_fold(t, FOLDS) for t in texts]  # the same every time
    counts = np.bincount(folds, minlength=FOLDS)
    assert counts.min() > 300, counts  # ~400 each
    # The first fold is the default hold-out (fraction 0.2): the same inputs.
    assert all((f == 0) == is_held_out(t, 0.2) for t, f in zip(texts, folds, strict=True))
    assert all(0.0 <= input_bucket(t) < 1.0 for t in texts)


def test_every_input_is_answered_by_the_head_that_never_saw_it(
        cross_fitted: tuple[Path, dict[str, Any], list[Prediction], list[Example],
                            list[Example]],
        task: ClassifyTask) -> None:
    out, figures, out_of_fold, train, _ = cross_fitted
    assert figures["folds"] == FOLDS and figures["examples"] == len(train)
    assert len(out_of_fold) == len(train)
    student = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(out, task)
    served = student.predict([e.input for e in train])
    # Serving a training input gives its out-of-fold answer: the model that calibrated on
    # it is the one that answers it. (The int8 encoder quantises activations per batch,
    # so a few near ties go the other way in other batches; float32 is exact, below.)
    differ = sum(a.target != b.target for a, b in zip(served, out_of_fold, strict=True))
    assert differ <= 0.03 * len(train), differ
    gaps = np.abs(np.array([p.confidence for p in served])
                  - np.array([p.confidence for p in out_of_fold]))
    assert np.median(gaps) < 0.01
    # Out of fold, not memorised: a head trained on its own inputs would get them all right.
    accuracy = np.mean([p.target == e.target for p, e in zip(out_of_fold, train, strict=True)])
    assert 0.75 < accuracy < 0.995, accuracy
    # One memory for all folds, each row tagged with its fold (stored in fold order).
    assert isinstance(student.head, FoldedHead) and student.head.folds == FOLDS
    folds = np.array([input_fold(e.input, FOLDS) for e in train])
    assert student.head.bank_folds.tolist() == sorted(folds.tolist())


def test_float32_serving_gives_exactly_the_out_of_fold_answers(
        tmp_path: Path, task: ClassifyTask) -> None:
    train = banking_slice()[0][:200]
    trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions(quantize="none"))
    _, out_of_fold = trainer.train_cross_fitted(train, task, tmp_path, FOLDS)
    served = trainer.load(tmp_path, task).predict([e.input for e in train])
    assert [p.target for p in served] == [p.target for p in out_of_fold]
    np.testing.assert_allclose([p.confidence for p in served],
                               [p.confidence for p in out_of_fold], atol=1e-5)


def test_a_fold_without_examples_keeps_the_partition(tmp_path: Path,
                                                     task: ClassifyTask) -> None:
    """Few examples can leave a fold empty: the student still routes by all five folds
    (the partition its out-of-fold answers were made with), and that fold's head, trained
    on everything, answers its inputs."""
    train = [e for e in banking_slice()[0] if input_fold(e.input, FOLDS) != FOLDS - 1][:60]
    trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions(quantize="none"))
    _, out_of_fold = trainer.train_cross_fitted(train, task, tmp_path, FOLDS)
    student = trainer.load(tmp_path, task)
    assert isinstance(student.head, FoldedHead) and student.head.folds == FOLDS
    served = student.predict([e.input for e in train])
    assert [p.target for p in served] == [p.target for p in out_of_fold]
    lone = next(f"my card is lost {i}" for i in range(100)
                if input_fold(f"my card is lost {i}", FOLDS) == FOLDS - 1)
    assert student.predict([lone])[0].target in {e.target for e in train}


def test_cross_fitted_artifact_stores_the_memory_once(
        cross_fitted: tuple[Path, dict[str, Any], list[Prediction], list[Example],
                            list[Example]]) -> None:
    out, _, _, train, _ = cross_fitted
    tensors = load_file(str(out / HEAD_FILE))
    assert tensors["knn_embeddings"].shape == (len(train), 384)
    assert sorted(set(tensors["knn_folds"].tolist())) == list(range(FOLDS))
    assert tensors["lr_weight"].shape[0] == FOLDS == tensors["label_counts"].shape[0]
    meta = json.loads((out / META_FILE).read_text())
    assert meta["folds"] == FOLDS and len(meta["fold_calibration"]) == FOLDS


def test_new_inputs_and_batch_parts_route_by_fold(
        cross_fitted: tuple[Path, dict[str, Any], list[Prediction], list[Example],
                            list[Example]],
        task: ClassifyTask) -> None:
    out, _, _, _, held_out = cross_fitted
    student = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(out, task)
    texts = [e.input for e in held_out]
    whole = student.predict(texts)
    accuracy = np.mean([p.target == e.target for p, e in zip(whole, held_out, strict=True)])
    assert accuracy > 0.75, accuracy
    # Each new input is answered by its own fold's head (the heads differ).
    opts = student.options
    head = student.head
    assert isinstance(head, FoldedHead)
    others_differ = False
    for text in texts[:20]:
        alone = student.predict([text])[0]
        emb, feats = student.encoder.encode([text], opts.layers, opts.max_tokens,
                                            opts.predict_batch_size)
        answers = [head.predict(emb, feats, opts, np.array([k])) for k in range(FOLDS)]
        pred, conf = answers[input_fold(text, FOLDS)]
        assert student.labels[int(pred[0])] == alone.target
        assert float(conf[0]) == pytest.approx(alone.confidence, abs=1e-6)
        others_differ |= any(abs(float(c[0]) - float(conf[0])) > 1e-3 for _, c in answers)
    assert others_differ
    parts: dict[int, Prediction] = {}

    def deliver(rows: list[int], predictions: list[Prediction]) -> None:
        parts.update(zip(rows, predictions, strict=True))

    student.predict_parts(texts[:40], deliver)
    assert [parts[i].target for i in range(40)] == [p.target for p in whole[:40]]


# The exact search (rows in any order), and the int8 index (rows stored in fold order).
@pytest.mark.parametrize(("rows", "by_fold"), [(600, False), (3000, True)])
def test_a_query_never_sees_its_own_folds_memory(rows: int, by_fold: bool) -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(rows, 64)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_folds = rng.integers(0, FOLDS, rows)
    if by_fold:
        bank_folds = np.sort(bank_folds)
    labels = bank_folds.copy()  # each row votes for its own fold
    queries = bank[:50] + 0.01 * rng.normal(size=(50, 64)).astype(np.float32)
    query_folds = bank_folds[:50]
    index = KnnIndex(bank, folds=bank_folds) if rows >= KnnIndex.MIN_ROWS else None
    votes = knn_probs(bank, labels, queries, FOLDS, 10, 0.05, index=index,
                      query_folds=query_folds, bank_folds=bank_folds)
    # No vote for the query's own fold, though its nearest row (itself) is in it.
    assert votes[np.arange(50), query_folds].max() == 0.0
    plain = knn_probs(bank, labels, queries, FOLDS, 10, 0.05, index=index)
    assert (plain.argmax(axis=1) == query_folds).all()
    if index is not None:  # the same neighbours as the exact search over the other folds
        import torch

        sims, found = index.nearest(torch.from_numpy(queries), 10,
                                    torch.from_numpy(query_folds))
        assert (bank_folds[found.numpy()] != query_folds[:, None]).all()
        # A fold with no rows in the memory (few examples) hides nothing.
        empty = torch.full((50,), FOLDS, dtype=torch.long)
        _, anywhere = index.nearest(torch.from_numpy(queries), 10, empty)
        assert (anywhere[:, 0].numpy() == np.arange(50)).all()  # each query's own row
        exact = queries @ bank.T
        exact[bank_folds[None, :] == query_folds[:, None]] = -np.inf
        best = np.sort(exact, axis=1)[:, ::-1][:, :10]
        np.testing.assert_allclose(sims.numpy(), best, atol=1e-5)


def test_the_int8_index_needs_the_memory_in_fold_order() -> None:
    bank = np.eye(KnnIndex.MIN_ROWS, 64, dtype=np.float32)
    with pytest.raises(ValueError, match="fold order"):
        KnnIndex(bank, folds=np.arange(KnnIndex.MIN_ROWS) % FOLDS)
    KnnIndex(bank, folds=np.sort(np.arange(KnnIndex.MIN_ROWS) % FOLDS))


def test_only_a_frozen_encoder_cross_fits(tmp_path: Path, task: ClassifyTask) -> None:
    tuned = EmbeddingClassifierTrainer(EmbeddingClassifierOptions(finetune_epochs=1.0))
    assert not tuned.can_cross_fit()
    with pytest.raises(ValueError, match="frozen encoder"):
        tuned.train_cross_fitted([Example("a", "b")] * 20, task, tmp_path, FOLDS)
    assert EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).can_cross_fit()

    class Plain(Trainer):
        def train(self, examples: list[Example], task: Any, out_dir: Path) -> dict[str, Any]:
            return {}

        def load(self, artifact_dir: Path, task: Any) -> Any:
            return None

    plain = Plain(EmbeddingClassifierOptions())
    assert not plain.can_cross_fit()
    with pytest.raises(NotImplementedError):
        plain.train_cross_fitted([], task, tmp_path, FOLDS)


def _workspace(tmp_path: Path, calibration: str, trainer: str | None = None,
               data: bool = True) -> Workspace:
    """A workspace on ``tmp_path``'s store (with the 600 training rows imported if
    ``data``)."""
    train, _, labels = banking_slice()
    student = {"trainer": trainer} if trainer else {}
    settings = load_settings(None, **{
        "database": f"sqlite:///{tmp_path / 'distill.db'}",
        "artifacts": str(tmp_path / "artifacts"),
        "plugins": ["tests.word_vote_trainer"] if trainer == "word-vote" else [],
        "default_teacher": {"model": "openai/unused", "api_base": "http://127.0.0.1:9"},
        "tasks": {"intents": {"plugin": "classify", "options": {"labels": labels},
                              "student": student,
                              "policy": {"calibration": calibration, "min_examples": 100}}},
    })
    workspace = Workspace(settings)
    if not data:
        return workspace
    stream = tmp_path / "train.jsonl"
    stream.write_text("".join(json.dumps({"text": e.input, "teacher": e.target}) + "\n"
                              for e in train))
    assert import_file(workspace, "intents", stream)["valid"] == len(train)
    return workspace


def test_a_cross_fitted_round_calibrates_on_every_label(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, "bound")
    first = workspace.train_round("intents")
    assert first.version is not None and first.evaluation is not None
    assert first.version.metrics["calibration_method"] == "bound"
    held = first.evaluation.calibration.n
    assert 0 < held < 200

    workspace = _workspace(tmp_path, "crossfit", data=False)  # the same store
    second = workspace.train_round("intents", promote="always")
    assert second.version is not None and second.evaluation is not None
    metrics = second.version.metrics
    assert metrics["calibration_method"] == "crossfit"
    assert metrics["calibration_folds"] == FOLDS
    curated = second.version.train_examples  # every curated example, in its four folds
    assert curated > 500
    assert second.evaluation.calibration.n == curated == second.version.holdout_examples
    # Against a hold-out version the two are compared on the labels neither trained on.
    assert second.active_evaluation is not None
    assert second.active_evaluation.calibration.n == held
    assert second.promoted
    assert workspace.registry.active("intents").version == second.version.version

    # A cross-fitted active version is compared on every label, all out of fold.
    third = workspace.train_round("intents", promote="never")
    assert third.active_evaluation is not None
    assert third.active_evaluation.calibration.n == curated
    # (served in other batches than it trained in: the int8 encoder's few near ties)
    assert third.active_evaluation.calibration.coverage == pytest.approx(
        second.evaluation.calibration.coverage, abs=0.03)

    # `eval` evaluates a cross-fitted version on every label too.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(workspace.settings.model_dump(mode="json",
                                                                   exclude_none=True)))
    evaluated = CliRunner().invoke(cli, ["eval", "intents", "--config", str(config)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "600 held-out teacher labels" in evaluated.output  # all recorded, uncurated


def test_a_trainer_that_cannot_cross_fit_holds_out(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, "crossfit", trainer="word-vote")
    result = workspace.train_round("intents")
    assert result.version is not None and result.evaluation is not None
    assert result.version.metrics["calibration_method"] == "bound"
    assert 0 < result.evaluation.calibration.n < 200
