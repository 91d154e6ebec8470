"""The ``deletion-tagger`` rewrite student: labels from the teacher's answers, the span
scorer on real MiniLM states (Disfl-QA), cross-fitting, and the gateway serving it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from safetensors.numpy import load_file

from gateway.app import create_app
from gateway.interfaces import Example
from gateway.testing.teacher_server import TeacherServer
from gateway.training import Workspace
from plugins.rewrite import RewriteOptions, RewriteTask
from plugins.trainers.deletion_tagger import (
    META_FILE,
    SPAN_WEIGHTS,
    DeletionTaggerTrainer,
    deleted_span,
    join_kept,
    keep_tags,
    pair_features,
    words,
)
from plugins.trainers.token_students import WEIGHTS_FILE
from tests.conftest import make_settings
from tests.servers import GatewayServer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "disfl_qa"
FOLDS = 5

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is missing")


def disfl_qa(limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` Disfl-QA train rows as (disfluent, original)."""
    rows = json.loads((DATA / "train.json").read_text())
    return [(r["disfluent"], r["original"].strip()) for r in rows.values()][:limit]


@pytest.fixture(scope="module")
def task() -> RewriteTask:
    return RewriteTask("fluent", RewriteOptions())


def test_labels_come_from_the_teachers_answers(task: RewriteTask) -> None:
    text = "What do petrologists no what do unstable isotope studies indicate?"
    keep = keep_tags(text, "What do unstable isotope studies indicate?", task)
    assert keep is not None
    # the later "what do" is kept: the correction comes after what it corrects
    assert keep.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert deleted_span(keep) == (1, 4)
    # compared as the task compares: case and trailing punctuation do not matter
    same = keep_tags(text, "what do unstable isotope studies indicate", task)
    assert same is not None and same.tolist() == keep.tolist()
    # nothing deleted
    assert deleted_span(keep_tags("Who won?", "Who won?", task)) == (0, 0)
    # reworded or reordered: not the input with words dropped
    assert keep_tags("When was it built no founded?", "When was it founded?", task) is not None
    assert keep_tags("Who are capable of flight?", "Who can fly?", task) is None
    assert keep_tags("flight of capable", "capable of flight", task) is None
    assert deleted_span(None) is None
    # a typo in the answer: no deletion agrees exactly, one agrees by similarity
    spoken = "What seldom er what is the kilogram-force sometimes referred to as?"
    typo = "What is the kilogram-force sometimes reffered to as?"
    assert keep_tags(spoken, typo, task) is None
    similar = keep_tags(spoken, typo, RewriteTask("similar", RewriteOptions(similarity=0.9)))
    assert similar is not None and similar.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    # two deleted runs: derivable, but not one span
    two = keep_tags("Who um won the uh cup?", "Who won the cup?", task)
    assert two is not None and deleted_span(two) is None


def test_kept_words_keep_their_spacing() -> None:
    text = "Line one uh\nline  two"
    spans = words(text)
    assert join_kept(text, spans, np.array([1, 1, 0, 1, 1])) == "Line one line  two"
    assert join_kept(text, spans, np.array([1, 1, 1, 1, 0])) == "Line one uh\nline"
    assert join_kept(text, spans, np.array([0, 0, 0, 0, 0])) == ""


def test_pair_features_mark_a_restart() -> None:
    text = "the second level no the basic unit"
    keys = [text[a:b] for a, b in words(text)]
    states = np.random.default_rng(0).normal(size=(len(keys), 8)).astype(np.float32)
    pairs = pair_features(states, keys, len(keys) + 2, 4)
    # deleting words 1..4 ("the second level no") leaves "the basic": word 1 == word 5
    assert pairs[1, 4, 0] == 1
    assert pairs[1, 3, 0] == 0  # "the" against "no"
    assert pairs[2, 4, 0] == 0
    # word 2 ("second") against word 6 ("basic"): different
    assert pairs[1, 4, 1] == 0
    top = states[:, :4] / np.linalg.norm(states[:, :4], axis=1, keepdims=True)
    assert pairs[1, 4, 2] == pytest.approx(float(top[0] @ top[4]), abs=1e-5)
    assert not pairs[:, 7:].any()  # nothing follows a deletion that ends at the last word


def test_answers_that_are_not_text_are_refused(tmp_path: Path, task: RewriteTask) -> None:
    with pytest.raises(ValueError, match="text"):
        DeletionTaggerTrainer().train([Example("a b", {"x": 1})], task, tmp_path)


@pytest.fixture(scope="module")
def cross_fitted(tmp_path_factory: pytest.TempPathFactory, task: RewriteTask
                 ) -> tuple[Path, dict[str, Any], list[Any], list[Example]]:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is missing")
    examples = [Example(t, y) for t, y in disfl_qa(800)]
    out = tmp_path_factory.mktemp("deletion")
    figures, out_of_fold = DeletionTaggerTrainer().train_cross_fitted(examples, task, out,
                                                                      FOLDS)
    return out, figures, out_of_fold, examples


def test_cross_fitted_student_answers_each_input_out_of_fold(
        cross_fitted: tuple[Path, dict[str, Any], list[Any], list[Example]],
        task: RewriteTask) -> None:
    out, figures, out_of_fold, examples = cross_fitted
    meta = json.loads((out / META_FILE).read_text())
    assert meta["folds"] == FOLDS
    weights = load_file(str(out / WEIGHTS_FILE))
    assert all(weights[name].shape[0] == FOLDS for name in SPAN_WEIGHTS)
    assert weights["word_mean"].shape[0] == FOLDS  # each fold scaled on its own rows
    assert 0.7 < figures["derivable_share"] < 0.9  # Disfl-QA: ~80% only drop words
    agree = [task.agree(p.target, e.target) for p, e in zip(out_of_fold, examples,
                                                             strict=True)]
    assert figures["cv_agreement"] == pytest.approx(np.mean(agree), abs=1e-4)
    assert figures["cv_agreement"] > 0.35
    # the confidence ranks: the most confident quarter agrees far more often than the
    # least (most of what is left at the top is the teacher's own typos and rewordings)
    order = np.argsort([-p.confidence for p in out_of_fold])
    quarter = len(order) // 4
    assert np.mean(np.array(agree)[order[:quarter]]) > np.mean(agree) + 0.2
    assert np.mean(np.array(agree)[order[-quarter:]]) < np.mean(agree) - 0.1
    # every answer is the input with words left out
    for p, e in zip(out_of_fold, examples, strict=True):
        kept = iter(e.input.split())
        assert all(word in kept for word in p.target.split())

    student = DeletionTaggerTrainer().load(out, task)
    served = student.predict([e.input for e in examples])
    # float32 encoder: serving an input gives exactly its out-of-fold answer
    assert [p.target for p in served] == [p.target for p in out_of_fold]
    assert np.allclose([p.confidence for p in served], [p.confidence for p in out_of_fold],
                       atol=1e-4)
    fresh = ["Who was the first no the second president of Kenya?", "Where is Warsaw?"]
    alone = [student.predict([text])[0] for text in fresh]
    assert [p.target for p in student.predict(fresh)] == [p.target for p in alone]
    # past the encoder's window the tail would go untagged: escalated
    long = " ".join(["What is the name of the river that flows through the city"] * 20)
    assert student.predict([long])[0].confidence == 0.0


def test_one_model_without_folds(tmp_path: Path, task: RewriteTask) -> None:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is missing")
    examples = [Example(t, y) for t, y in disfl_qa(300)]
    figures = DeletionTaggerTrainer().train(examples, task, tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["folds"] == 1
    assert figures["train_agreement"] > 0.5  # in sample
    student = DeletionTaggerTrainer().load(tmp_path, task)
    answers = student.predict([e.input for e in examples[:50]])
    assert np.mean([task.agree(p.target, e.target)
                    for p, e in zip(answers, examples, strict=False)]) > 0.5


@needs_data
def test_the_gateway_trains_it_on_its_traffic_and_serves_it(tmp_path: Path,
                                                            teacher: TeacherServer) -> None:
    """Teacher traffic through the real gateway (official SDK over loopback), a training
    round calibrated on every curated label out of fold, the running gateway picking the
    student up and answering confident requests with it."""
    rows = dict(disfl_qa(600))
    teacher.responder = lambda body: rows[body["messages"][-1]["content"]]
    settings = make_settings(tmp_path, teacher, server={"registry_poll_s": 0.1},
                             loop={"enabled": False},
                             tasks={"fluent": {"plugin": "rewrite",
                                               "student": {"trainer": "deletion-tagger"},
                                               "filters": ["valid", "length"],
                                               "policy": {"min_examples": 100,
                                                          "target_agreement": 0.85}}})
    app = create_app(settings)
    with GatewayServer(app) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)

        def ask(text: str) -> Any:
            return client.chat.completions.with_raw_response.create(
                model="fluent", messages=[{"role": "user", "content": text}])

        for text in rows:
            assert ask(text).headers["x-distill-served-by"] == "teacher"
        assert app.state.runtime.store.flush(10)
        result = Workspace(settings).train_round("fluent")
        assert result.promoted, result.reason
        assert result.version is not None and result.evaluation is not None
        assert result.version.trainer == "deletion-tagger"
        assert result.version.metrics["calibration_method"] == "crossfit"
        threshold = result.evaluation.calibration.threshold
        assert threshold is not None
        deadline = time.monotonic() + 10
        while (app.state.runtime.students.get("fluent") is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        served = 0
        for text in list(rows)[:150]:
            raw = ask(text)
            if raw.headers["x-distill-served-by"] != "student":
                continue
            served += 1
            assert float(raw.headers["x-distill-confidence"]) >= round(threshold, 4) - 1e-4
            answer = raw.parse().choices[0].message.content
            kept = iter(text.split())  # the question with words left out
            assert all(word in kept for word in answer.split())
        assert served > 0
