"""The ``structured-extractor`` trainer: the answer layout learnt from the teacher's
objects, spans cut from the input at the tagged tokens, cross-fitted artifacts, and the
gateway training it on its own traffic and serving it (real bundled encoder, NLU++ rows,
the official SDK over loopback)."""

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
from gateway.interfaces import Example, input_fold
from gateway.testing.teacher_server import TeacherServer
from gateway.training import Workspace
from plugins.extract import ExtractOptions, ExtractTask
from plugins.trainers.minilm_encoder import get_encoder
from plugins.trainers.structured_extractor import (
    ABSENT,
    META_FILE,
    StructuredExtractorOptions,
    StructuredExtractorTrainer,
    _cut_spans,
    assemble,
    learn_layout,
    token_tags,
)
from plugins.trainers.token_students import WEIGHTS_FILE
from tests.conftest import make_settings
from tests.servers import GatewayServer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nlupp" / "banking"
FOLDS = 5

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is missing")


def nlupp(limit: int) -> list[tuple[str, dict[str, Any]]]:
    """The first ``limit`` NLU++ banking rows as (text, {"intents", "slots"})."""
    rows = []
    for fold in sorted(DATA.glob("fold*.json"), key=lambda p: int(p.stem[4:])):
        for row in json.loads(fold.read_text()):
            rows.append((row["text"], {"intents": sorted(set(row.get("intents", []))),
                                       "slots": {k: v["text"] for k, v in
                                                 row.get("slots", {}).items()}}))
    return rows[:limit]


@pytest.fixture(scope="module")
def task() -> ExtractTask:
    return ExtractTask("nlupp", ExtractOptions())


def test_layout_is_learnt_from_the_answers() -> None:
    texts = ["pay 5 dollars to Ann", "send Bob money now", "hello", "pay Ann"]
    targets: list[dict[str, Any]] = [
        {"intents": ["pay"], "who": {"name": "Ann"}, "urgent": False, "lang": "en"},
        {"intents": ["send", "money"], "who": {"name": "Bob"}, "urgent": True, "lang": "en"},
        {"intents": [], "who": {}, "urgent": False},
        {"intents": ["pay"], "who": {"name": "Ann"}, "urgent": False, "lang": "fr"},
    ]
    layout = learn_layout(texts, targets, span_share=0.9)
    by_path = {".".join(f.path): f for f in layout.fields}
    assert set(by_path) == {"intents", "who.name", "urgent", "lang"}
    assert by_path["intents"].kind == "labels"
    # in the teacher's order: "money" came after "send" (mean places 0, 0, 0.5)
    assert by_path["intents"].values == ["pay", "send", "money"]
    # a teacher that sorts its lists gets them sorted, whatever places they take
    in_order = learn_layout(["x"] * 3, [{"l": ["a", "b", "c", "d"]}, {"l": ["c"]}, {"l": ["b"]}],
                            span_share=0.9)
    assert in_order.fields[0].values == ["a", "b", "c", "d"]
    assert by_path["who.name"].kind == "span" and not by_path["who.name"].always
    assert by_path["urgent"].kind == "choice" and by_path["urgent"].always
    assert by_path["urgent"].values == ["false", "true"]
    # "en" is not in the input: a choice, with "absent" since one answer leaves it out
    assert by_path["lang"].kind == "choice" and by_path["lang"].values[-1] == ABSENT
    assert layout.objects == [["who"]]

    # Each answer is its parts put back together.
    for target in targets:
        # the student emits a field's labels in column order: the teacher's order back
        chosen = [label for _, label in layout.label_columns if label in target["intents"]]
        labels = {0: chosen} if chosen else {}
        fields = [".".join(f.path) for f in layout.fields]
        choices = {fields.index("urgent"): json.dumps(target["urgent"]),
                   fields.index("lang"): json.dumps(target["lang"]) if "lang" in target
                   else ABSENT}
        spans = ({fields.index("who.name"): target["who"]["name"]}
                 if target["who"] else {})
        assert assemble(layout, labels, choices, spans) == target


def test_answers_that_are_not_objects_are_refused() -> None:
    with pytest.raises(ValueError, match="JSON objects"):
        learn_layout(["a"], ["a label"], span_share=0.9)


@needs_data
def test_spans_tagged_and_cut_at_token_offsets_give_the_values_back() -> None:
    rows = [r for r in nlupp(2071) if r[1]["slots"]][:300]
    layout = learn_layout([t for t, _ in rows], [a for _, a in rows], span_share=0.9)
    states = get_encoder(StructuredExtractorOptions().encoder).token_states(
        [t for t, _ in rows], [6], 128, 32)
    same = 0
    for (text, answer), (_, offsets) in zip(rows, states, strict=True):
        tags = token_tags(layout, text, answer, offsets)
        real = [j for j, (a, b) in enumerate(offsets.tolist()) if b > a]
        cut = _cut_spans(layout, text, tags, offsets, real)
        got = {layout.fields[i].path[-1]: value for i, value in cut.items()}
        same += got == answer["slots"]
    # (a value that ends inside a word piece comes back as the whole piece)
    assert same >= 0.95 * len(rows)


@pytest.fixture(scope="module")
def cross_fitted(tmp_path_factory: pytest.TempPathFactory, task: ExtractTask
                 ) -> tuple[Path, dict[str, Any], list[Any], list[Example]]:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is missing")
    examples = [Example(t, task.parse_target(json.dumps(a))) for t, a in nlupp(600)]
    out = tmp_path_factory.mktemp("structured")
    figures, out_of_fold = StructuredExtractorTrainer().train_cross_fitted(
        examples, task, out, FOLDS)
    return out, figures, out_of_fold, examples


def test_cross_fitted_student_answers_each_input_out_of_fold(
        cross_fitted: tuple[Path, dict[str, Any], list[Any], list[Example]],
        task: ExtractTask) -> None:
    out, figures, out_of_fold, examples = cross_fitted
    assert (out / META_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["folds"] == FOLDS
    weights = load_file(str(out / WEIGHTS_FILE))
    assert weights["labels_w"].shape[0] == weights["mlp_w1"].shape[0] == FOLDS
    assert weights["sent_mean"].shape[0] == FOLDS  # each fold scaled on its own rows
    assert figures["fields"]["intents"] == "labels"
    assert figures["fields"]["slots.date"] == "span"
    agree = [task.agree(p.target, e.target) for p, e in zip(out_of_fold, examples,
                                                             strict=True)]
    assert figures["cv_agreement"] == pytest.approx(np.mean(agree), abs=1e-4)
    # 600 rows, answers mostly unseen whole: a class per answer could not get here
    assert figures["cv_agreement"] > 0.3
    confident = [a for p, a in zip(out_of_fold, agree, strict=True) if p.confidence > 0.9]
    assert len(confident) >= 30 and np.mean(confident) > np.mean(agree) + 0.2

    student = StructuredExtractorTrainer().load(out, task)
    served = student.predict([e.input for e in examples])
    # float32 encoder: serving an input gives exactly its out-of-fold answer
    assert [p.target for p in served] == [p.target for p in out_of_fold]
    assert np.allclose([p.confidence for p in served], [p.confidence for p in out_of_fold],
                       atol=1e-4)
    # an unseen input goes to its own fold's model, alone or in a batch
    fresh = ["I want to transfer 40 euros to Maria tomorrow", "close my account"]
    alone = [student.predict([text])[0] for text in fresh]
    assert [p.target for p in student.predict(fresh)] == [p.target for p in alone]
    assert {input_fold(t, FOLDS) for t in fresh} <= set(range(FOLDS))
    assert all(set(p.target) == {"intents", "slots"} for p in alone)


def test_one_model_without_folds(tmp_path: Path, task: ExtractTask) -> None:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is missing")
    examples = [Example(t, task.parse_target(json.dumps(a))) for t, a in nlupp(300)]
    trainer = StructuredExtractorTrainer(StructuredExtractorOptions(labels_mlp_hidden=0))
    figures = trainer.train(examples, task, tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["folds"] == 1
    assert "mlp_w1" not in load_file(str(tmp_path / WEIGHTS_FILE))  # the regressions alone
    assert figures["train_agreement"] > 0.6  # in sample
    student = StructuredExtractorTrainer().load(tmp_path, task)
    answers = student.predict([e.input for e in examples[:50]])
    assert np.mean([task.agree(p.target, e.target)
                    for p, e in zip(answers, examples, strict=False)]) > 0.6


@needs_data
def test_the_gateway_trains_it_on_its_traffic_and_serves_it(tmp_path: Path,
                                                            teacher: TeacherServer) -> None:
    """Teacher traffic through the real gateway (official SDK over loopback), a training
    round calibrated on every curated label out of fold, the running gateway picking the
    student up and answering confident requests with it."""
    rows = dict(nlupp(500))
    teacher.responder = lambda body: json.dumps(rows[body["messages"][-1]["content"]])
    settings = make_settings(tmp_path, teacher, server={"registry_poll_s": 0.1},
                             loop={"enabled": False},
                             tasks={"nlupp": {"plugin": "extract",
                                              "student": {"trainer": "structured-extractor"},
                                              "filters": ["valid", "length"],
                                              "policy": {"min_examples": 100,
                                                         "target_agreement": 0.9}}})
    app = create_app(settings)
    with GatewayServer(app) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)

        def ask(text: str) -> Any:
            return client.chat.completions.with_raw_response.create(
                model="nlupp", messages=[{"role": "user", "content": text}])

        for text in rows:
            assert ask(text).headers["x-distill-served-by"] == "teacher"
        assert app.state.runtime.store.flush(10)
        result = Workspace(settings).train_round("nlupp")
        assert result.promoted, result.reason
        assert result.version is not None and result.evaluation is not None
        assert result.version.trainer == "structured-extractor"
        assert result.version.metrics["calibration_method"] == "crossfit"
        assert result.evaluation.calibration.n == result.version.train_examples == len(rows)
        threshold = result.evaluation.calibration.threshold
        assert threshold is not None
        deadline = time.monotonic() + 10
        while (app.state.runtime.students.get("nlupp") is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        served = 0
        for text in list(rows)[:100]:
            raw = ask(text)
            if raw.headers["x-distill-served-by"] != "student":
                continue
            served += 1
            # (the header carries four decimals)
            assert float(raw.headers["x-distill-confidence"]) >= round(threshold, 4) - 1e-4
            answer = json.loads(raw.parse().choices[0].message.content)
            assert set(answer) == {"intents", "slots"}  # an object of the teacher's shape
        assert served > 0
