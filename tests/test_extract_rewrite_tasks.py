from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.interfaces import InvalidTarget
from gateway.schemas import ChatCompletionRequest
from plugins.extract import ExtractTask, field_f1, find_json_object
from plugins.rewrite import RewriteTask, normalise, similarity

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "intents": {"type": "array", "items": {"type": "string"}},
        "slots": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["intents"],
    "additionalProperties": False,
}


def extract_task(**options: Any) -> ExtractTask:
    return ExtractTask("t", ExtractTask.Options.model_validate(options))


def rewrite_task(**options: Any) -> RewriteTask:
    return RewriteTask("t", RewriteTask.Options.model_validate(options))


def request(*messages: tuple[str, str]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "t", "messages": [{"role": r, "content": c} for r, c in messages]})


# --- extract: parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        '{"b": 1, "a": "x"}',
        '```json\n{"b": 1, "a": "x"}\n```',
        '```\n{"a": "x", "b": 1}\n```',
        'Sure! Here is the result:\n{"a": " x ", "b": 1.0}\nLet me know if you need more.',
        'The set {a, b} is not JSON, but this is: {"a": "x", "b": 1}.',
        'Explanation first.\n```json\n{"a": "x",\n "b": 1}\n```\nAnd {"other": true} later.',
    ],
)
def test_extract_parses_fences_and_prose(answer: str) -> None:
    task = extract_task()
    assert task.parse_target(answer) == {"a": "x", "b": 1}
    assert task.render(task.parse_target(answer)) == '{"a": "x", "b": 1}'


def test_extract_finds_outermost_object() -> None:
    assert find_json_object('x {"a": {"b": [1, {"c": 2}]}} y') == {"a": {"b": [1, {"c": 2}]}}


@pytest.mark.parametrize(
    "answer", ["", "no json here", "[1, 2, 3]", '{"a": NaN}', '{"a": 1', "```json\n```"]
)
def test_extract_rejects_non_objects(answer: str) -> None:
    with pytest.raises(InvalidTarget):
        extract_task().parse_target(answer)


def test_extract_canonicalises_recursively() -> None:
    task = extract_task()
    target = task.parse_target('{"z": {"b": " 2 ", "a": [{"y": 1, "x": 0}]}, "a": true}')
    assert list(target) == ["a", "z"]
    assert list(target["z"]) == ["a", "b"]
    assert list(target["z"]["a"][0]) == ["x", "y"]
    assert task.render(target) == '{"a": true, "z": {"a": [{"x": 0, "y": 1}], "b": "2"}}'
    assert task.render({"é": "ü"}) == '{"é": "ü"}'  # non-ASCII kept as is


# --- extract: schema ----------------------------------------------------------------------


def test_extract_schema_accepts_and_rejects() -> None:
    task = extract_task(json_schema=SCHEMA)
    assert task.parse_target('{"intents": ["a"], "slots": {"date": "today"}}') == {
        "intents": ["a"], "slots": {"date": "today"}}
    for bad in ('{"slots": {}}', '{"intents": "a"}', '{"intents": [], "extra": 1}',
                '{"intents": [], "slots": {"date": 3}}'):
        with pytest.raises(InvalidTarget, match="schema"):
            task.parse_target(bad)


def test_extract_invalid_schema_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="invalid JSON Schema"):
        ExtractTask.Options.model_validate({"json_schema": {"type": "no-such-type"}})
    with pytest.raises(ValidationError):
        ExtractTask.Options.model_validate({"schema": SCHEMA})  # unknown key
    with pytest.raises(ValidationError):
        ExtractTask.Options.model_validate({"input": "everything"})


def test_extract_task_input() -> None:
    req = request(("system", "s"), ("user", "first"), ("assistant", "a"), ("user", "second"))
    assert extract_task().task_input(req) == "second"
    assert extract_task(input="conversation").task_input(req) == (
        "user: first\nassistant: a\nuser: second")


# --- extract: agreement and F1 ------------------------------------------------------------


def test_extract_agree_is_canonical_equality() -> None:
    task = extract_task()
    a = task.parse_target('{"b": [1, 2], "a": "x"}')
    b = task.parse_target('```json\n{"a": "x ", "b": [1.0, 2]}\n```')
    assert task.agree(a, b)
    assert not task.agree(a, task.parse_target('{"a": "x", "b": [2, 1]}'))  # order matters
    assert not task.agree({"a": True}, {"a": 1})  # True == 1 in Python, not in JSON
    assert not task.agree(a, None)


def test_field_f1() -> None:
    gold = {"intents": ["a", "b"], "slots": {"date": "today", "time": "noon"}}
    assert field_f1(gold, gold) == 1.0
    assert field_f1({"slots": {"time": "noon", "date": "today"}, "intents": ["b", "a"]},
                    gold) == 1.0  # lists as sets, key order irrelevant
    assert field_f1({"intents": ["a"], "slots": {"date": "today"}}, gold) == pytest.approx(
        2 * 1.0 * 0.5 / 1.5)
    assert field_f1({"intents": ["c"]}, gold) == 0.0
    assert field_f1(None, gold) == 0.0
    assert field_f1({}, {}) == 1.0
    assert field_f1({"intents": ["a"], "slots": {}}, {"intents": ["a"], "slots": {}}) == 1.0
    # nested paths: a value under another key does not count
    assert field_f1({"x": {"a": 1}}, {"y": {"a": 1}}) == 0.0


# --- rewrite ------------------------------------------------------------------------------


def test_rewrite_parse_target() -> None:
    task = rewrite_task()
    assert task.parse_target("  What is it?\n") == "What is it?"
    assert task.render("What is it?") == "What is it?"
    with pytest.raises(InvalidTarget):
        task.parse_target(" \n\t")


def test_rewrite_normalised_exact_match() -> None:
    task = rewrite_task()
    assert normalise("  What  IS\tit?!  ") == "what is it"
    assert task.agree("What is the capital of France?", "what is the capital  of france")
    assert not task.agree("What is the capital of France?", "What is the capital of Spain?")
    assert not task.agree("What is it?", None)


def test_rewrite_similarity_mode() -> None:
    loose = rewrite_task(similarity=0.9)
    a = "When was the Eiffel Tower built?"
    b = "When was the Eiffel tower constructed?"
    c = "When was the Eiffel Tower finished?"
    assert similarity(a, a.upper()) == 1.0
    assert 0.9 <= similarity(a, "When was the Eifel Tower built") < 1.0
    assert loose.agree(a, "When was the Eifel Tower built")
    assert not loose.agree(a, b)
    assert not rewrite_task().agree(a, c)
    assert rewrite_task(similarity=0.5).agree(a, c)
    with pytest.raises(ValidationError):
        RewriteTask.Options.model_validate({"similarity": 1.5})
    with pytest.raises(ValidationError):
        RewriteTask.Options.model_validate({"similarity": 0})


def test_register_hooks() -> None:
    from plugins import extract, rewrite

    seen: dict[str, Any] = {}
    extract.register_tasks(lambda name, cls: seen.__setitem__(name, cls))
    rewrite.register_tasks(lambda name, cls: seen.__setitem__(name, cls))
    assert seen == {"extract": ExtractTask, "rewrite": RewriteTask}
