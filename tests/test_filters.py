"""The built-in curation filters (valid, dedup, pii, length) on real task objects."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from gateway.curation import curate
from gateway.interfaces import Example, Filter
from plugins.classify import ClassifyTask
from plugins.extract import ExtractTask
from plugins.filters import dedup, length, pii, valid
from plugins.filters.dedup import DedupFilter, keep_newest, normalise
from plugins.filters.length import LengthFilter
from plugins.filters.pii import PiiFilter, iban_valid, luhn_valid, redact, redact_value
from plugins.filters.valid import ValidFilter
from plugins.rewrite import RewriteTask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = ["card_arrival", "card_linking", "card_delivery_estimate", "exchange_rate"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "intents": {"type": "array", "items": {"type": "string"}},
        "slots": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["intents"],
    "additionalProperties": False,
}


def classify_task() -> ClassifyTask:
    return ClassifyTask("t", ClassifyTask.Options.model_validate({"labels": LABELS}))


def extract_task(schema: dict[str, Any] | None = None) -> ExtractTask:
    return ExtractTask("t", ExtractTask.Options.model_validate({"json_schema": schema}))


def rewrite_task() -> RewriteTask:
    return RewriteTask("t", RewriteTask.Options.model_validate({}))


def make(cls: type[Filter], **options: Any) -> Any:
    return cls(cls.Options.model_validate(options))


def ex(text: str, target: Any, source: str | None = None, **meta: Any) -> Example:
    return Example(text, target, source_id=source, meta=dict(meta))


# --- registration and options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "name", "cls"),
    [
        (valid, "valid", ValidFilter),
        (dedup, "dedup", DedupFilter),
        (pii, "pii", PiiFilter),
        (length, "length", LengthFilter),
    ],
)
def test_each_module_registers_its_filter(module: Any, name: str, cls: type[Filter]) -> None:
    registered: list[tuple[str, type]] = []
    module.register_filters(register=lambda n, c: registered.append((n, c)))
    assert registered == [(name, cls)]
    assert issubclass(cls, Filter)
    # Every option is documented and unknown keys are errors (config typos fail loudly).
    options: type[BaseModel] = cls.Options
    assert all(field.description for field in options.model_fields.values())
    with pytest.raises(ValidationError):
        options.model_validate({"no_such_option": 1})


# --- valid ---------------------------------------------------------------------------------------


def test_valid_keeps_accepted_targets_and_drops_the_rest() -> None:
    task = classify_task()
    examples = [
        ex("where is my card?", "card_arrival"),
        ex("rate?", "not_a_label"),  # outside the label set
        ex("hello", None),  # no target at all
        ex("link my card", "card_linking"),
    ]
    results = make(ValidFilter).filter(examples, task)
    assert results == [examples[0], None, None, examples[3]]
    assert results[0] is examples[0]  # unchanged examples are passed through as they are


def test_valid_json_targets_against_the_schema() -> None:
    task = extract_task(SCHEMA)
    good = ex("block my card", {"intents": ["block"], "slots": {"card": "visa"}})
    off_schema = ex("block my card", {"intent": "block"})  # required "intents" missing
    unrenderable = ex("block my card", {"intents": {"a set", "is not JSON"}})
    assert make(ValidFilter).filter([good, off_schema, unrenderable], task) == [good, None, None]


def test_valid_normalises_targets_that_render_differently() -> None:
    task = extract_task()
    example = ex("how many?", {"count": 2.0, "unit": "  cards "})
    kept = make(ValidFilter).apply(example, task)
    assert kept is not None and kept.target == {"count": 2, "unit": "cards"}
    assert task.render(kept.target) == '{"count": 2, "unit": "cards"}'
    assert make(ValidFilter, normalise=False).apply(example, task) is example

    rewrite = rewrite_task()
    assert make(ValidFilter).apply(ex("uh what is it", "   "), rewrite) is None  # empty
    trimmed = make(ValidFilter).apply(ex("uh what is it", " What is it? "), rewrite)
    assert trimmed is not None and trimmed.target == "What is it?"


# --- length --------------------------------------------------------------------------------------


def test_length_bounds_on_input_and_rendered_target() -> None:
    task = extract_task()
    chain = make(
        LengthFilter, min_input_chars=5, max_input_chars=20, min_target_chars=1, max_target_chars=30
    )
    examples = [
        ex("hi", {"a": 1}),  # input too short
        ex("x" * 21, {"a": 1}),  # input too long
        ex("   short   ", {"a": 1}),  # 5 characters once trimmed: kept
        ex("a fine input", {"a": "y" * 30}),  # renders to 39 characters: too long
        ex("a fine input", {"a": "y"}),
        ex("a fine input", None),  # an empty target is below min_target_chars
    ]
    assert chain.filter(examples, task) == [None, None, examples[2], None, examples[4], None]


def test_length_defaults_are_permissive_and_max_can_be_unbounded() -> None:
    task = rewrite_task()
    example = ex("y" * 3999, "z" * 3999)
    assert make(LengthFilter).apply(example, task) is example
    assert make(LengthFilter).apply(ex("", "z"), task) is None  # default min 1
    assert make(LengthFilter).apply(ex("y" * 5000, "z"), task) is None  # default max 4000
    unbounded = make(LengthFilter, max_input_chars=None, max_target_chars=None)
    assert unbounded.apply(ex("y" * 50_000, "z" * 50_000), task) is not None
    with pytest.raises(ValidationError, match="min_input_chars"):
        LengthFilter.Options.model_validate({"min_input_chars": 10, "max_input_chars": 5})


# --- dedup ---------------------------------------------------------------------------------------


def test_normalise() -> None:
    assert normalise("  Where IS   my\tcard?! ") == "where is my card"
    assert normalise("«Hello», world…") == "hello», world"
    assert normalise("£20") == "£20"  # currency signs are not punctuation


def test_exact_duplicates_keep_the_newest_answer() -> None:
    task = classify_task()
    examples = [
        ex("Where is my card?", "card_linking", "1"),  # oldest: the teacher's old answer
        ex("What is the exchange rate?", "exchange_rate", "2"),
        ex("  where is my   CARD ", "card_arrival", "3"),
        ex("WHERE IS MY CARD!!", "card_arrival", "4"),  # newest of the group
    ]
    results = make(DedupFilter, near_duplicate_threshold=None).filter(examples, task)
    assert results == [None, examples[1], None, examples[3]]


def _banking77() -> dict[str, str]:
    with (DATA / "banking77" / "train.csv").open(newline="") as f:
        return {row["text"]: row["category"] for row in csv.DictReader(f)}


def test_near_duplicates_on_real_banking77_paraphrases() -> None:
    rows = _banking77()
    texts = [
        "When will my new card arrive?",  # paraphrase of the newer one below
        "How do I make my card show up in the app?",
        "Why have I not gotten my new card?",  # paraphrase of the newer one below
        "What foreign exchange rate will I get on weekdays and on the weekends?",
        "When will my new card be delivered?",
        "Why haven't I gotten my new card?",
    ]
    assert all(t in rows for t in texts), "the pairs come from banking77/train.csv"
    examples = [ex(t, rows[t], str(i)) for i, t in enumerate(texts)]
    task = classify_task()

    results = make(DedupFilter).filter(examples, task)
    assert results == [None, examples[1], None, examples[3], examples[4], examples[5]]

    # Clearly different questions are all kept, whatever their order.
    different = [examples[i] for i in (1, 3, 4)]
    assert make(DedupFilter).filter(different, task) == different
    # Disabled: only exact duplicates go.
    assert make(DedupFilter, near_duplicate_threshold=None).filter(examples, task) == examples


def test_near_duplicates_with_different_targets_stay_when_asked() -> None:
    rows = _banking77()
    older, newer = "When will my new card be delivered?", "When will my card be delivered?"
    examples = [ex(older, rows[older]), ex(newer, rows[newer])]
    assert rows[older] != rows[newer]  # card_arrival vs card_delivery_estimate
    task = classify_task()
    assert make(DedupFilter).filter(examples, task) == [None, examples[1]]
    assert make(DedupFilter, same_target_only=True).filter(examples, task) == examples
    agreeing = [ex(older, "card_arrival"), ex(newer, "card_arrival")]
    assert make(DedupFilter, same_target_only=True).filter(agreeing, task) == [None, agreeing[1]]


def _greedy(emb: np.ndarray, threshold: float, same: Callable[[int, int], bool] | None) -> list:
    keep = [False] * len(emb)
    for i in range(len(emb) - 1, -1, -1):
        keep[i] = not any(
            keep[j] and emb[i] @ emb[j] >= threshold and (same is None or same(i, j))
            for j in range(i + 1, len(emb))
        )
    return keep


def test_keep_newest_does_not_collapse_chains() -> None:
    # A~B and B~C but A is not similar to C: C (newest) stays, B goes, A stays.
    angles = np.radians([0.0, 20.0, 40.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    threshold = float(np.cos(np.radians(25.0)))
    assert keep_newest(emb, threshold).tolist() == [True, False, True]


@pytest.mark.parametrize("with_same", [False, True])
def test_keep_newest_blockwise_matches_the_pairwise_definition(with_same: bool) -> None:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(12, 16))
    emb = centres[rng.integers(0, 12, size=300)] + 0.15 * rng.normal(size=(300, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    parity = rng.integers(0, 2, size=300)
    same = (lambda a, b: bool(parity[a] == parity[b])) if with_same else None
    expected = _greedy(emb, 0.97, same)
    for block in (7, 64, None):  # several blocks, uneven last block, one block
        assert keep_newest(emb, 0.97, same, block=block).tolist() == expected
    assert 0 < sum(expected) < 300


# --- pii -----------------------------------------------------------------------------------------

POSITIVES = [
    ("write to jane.doe+bank@example.co.uk today", "email"),
    ("my email is J_Smith@mail.example.com.", "email"),
    ("e-mail: ana.maría@correo.es", "email"),
    ("card 4111 1111 1111 1111 please", "card"),
    ("card number 4111-1111-1111-1111", "card"),
    ("use 5555555555554444 for it", "card"),
    ("amex 3782 822463 10005 was declined", "card"),
    ("iban GB82 WEST 1234 5698 7654 32 thanks", "iban"),
    ("send it to DE89370400440532013000", "iban"),
    ("my iban is nl91 abna 0417 1643 00", "iban"),
    ("call +44 20 7946 0958 now", "phone"),
    ("call +44 (0)20 7946 0958 now", "phone"),
    ("ring +1 (415) 555-2671", "phone"),
    ("my mobile is 07911 123456", "phone"),
    ("or 07911123456", "phone"),
    ("office 020 7946 0958", "phone"),
    ("us office (415) 555-2671 or so", "phone"),
    ("toll free 1-800-555-0199", "phone"),
    ("appelez 06 12 34 56 78", "phone"),
    ("from abroad 0044 20 7946 0958", "phone"),
    ("my phone number is 4155552671", "phone"),
    ("server 192.168.1.10 is down", "ip"),
    ("from fe80::1ff:fe23:4567:890a today", "ip"),
    ("ssn 123-45-6789 on file", "ssn"),
    ("my sort code is 12-34-56", "sort_code"),
]


@pytest.mark.parametrize(("text", "kind"), POSITIVES)
def test_pii_true_positives(text: str, kind: str) -> None:
    redacted, counts = redact(text)
    assert counts == {kind: 1}, redacted
    assert f"[{kind.upper()}]" in redacted
    # The words around the number survive, and redacting again changes nothing.
    assert redacted.split()[0] == text.split()[0]
    assert redact(redacted) == (redacted, {})


NEGATIVES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "4111111111111112",
    "iban GB82 WEST 1234 5698 7654 33 has a wrong checksum",
    "DE89370400440532013001",
    "I paid £20.00 and then $1,500.00, 20.00 EUR, 1 500 000 in total",
    "on 2024-01-15, 01.02.2023, 15/01/2023, 12-03-21 at 10:30:00",
    "dates 2024-01-15 2024-02-15 and 05.11.2023 14:30",
    "order 123456789, order #4532, ref 98765432, order number 1234567890123",
    "I have 2 cards and waited 14 days; top up 100 three times",
    "version 3.11 of the app, 10 000 000 users, +10 points, +20.5%",
    "12-34-56 alone could be a date",
    "std::vector and a::b at 10:30:00",
    "0000 0000 0000 0000",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_pii_leaves_amounts_dates_and_order_numbers(text: str) -> None:
    assert redact(text) == (text, {})


def test_pii_checksums() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST12345698765433")
    assert not iban_valid("GB82WEST1234569876543")  # one character short for GB


def test_pii_detector_order_keeps_numbers_whole() -> None:
    text = (
        "IBAN DE89 3704 0044 0532 0130 00, card 4111 1111 1111 1111 12/25, "
        "phone +44 7911 123456, mail a.b@c.io, 1234 4111 1111 1111 1111 99"
    )
    redacted, counts = redact(text)
    assert redacted == (
        "IBAN [IBAN], card [CARD] 12/25, phone [PHONE], mail [EMAIL], 1234 [CARD] 99"
    )
    assert counts == {"iban": 1, "card": 2, "phone": 1, "email": 1}


def test_pii_kinds_select_detectors() -> None:
    text = "a@b.io or +44 20 7946 0958"
    assert redact(text, ["email"]) == ("[EMAIL] or +44 20 7946 0958", {"email": 1})
    assert redact(text, ["phone"]) == ("a@b.io or [PHONE]", {"phone": 1})
    with pytest.raises(ValueError, match="unknown PII kinds"):
        redact(text, ["postcode"])
    with pytest.raises(ValidationError):
        PiiFilter.Options.model_validate({"kinds": []})
    with pytest.raises(ValidationError):
        PiiFilter.Options.model_validate({"kinds": ["postcode"]})


def test_redact_value_walks_nested_json() -> None:
    value = {
        "messages": [{"role": "user", "content": "I am jo@x.org"}],
        "n": 4111111111111111,  # numbers are not strings: left alone
        "tags": ("ok", "call 020 7946 0958"),
        "flag": True,
    }
    counts: dict[str, int] = {}
    out = redact_value(value, counts=counts)
    assert out == {
        "messages": [{"role": "user", "content": "I am [EMAIL]"}],
        "n": 4111111111111111,
        "tags": ("ok", "call [PHONE]"),
        "flag": True,
    }
    assert counts == {"email": 1, "phone": 1}
    assert value["messages"][0]["content"] == "I am jo@x.org"  # the input is not modified


def test_redaction_copies_only_what_it_changes() -> None:
    """The store redacts every record and most have nothing to redact: those come back as
    they are, and a changed one is a copy (the original and its nested values untouched)."""
    from gateway.redaction import redact_record
    from gateway.store.records import ExchangeRecord

    clean = {"messages": [{"role": "user", "content": "Where is my card?"}], "n": 3,
             "tags": ("ok", "order 12 of 2024")}
    assert redact_value(clean) is clean
    dirty = {"messages": [{"role": "user", "content": "mail jo@x.org"}], "meta": clean}
    out = redact_value(dirty)
    assert out is not dirty and out["meta"] is clean  # the unchanged branch is shared
    assert out["messages"][0]["content"] == "mail [EMAIL]"
    assert dirty["messages"][0]["content"] == "mail jo@x.org"

    redactor = PiiFilter(PiiFilter.Options()).redact_value
    record = ExchangeRecord(model="m", task="t", request=clean, served_by="student",
                            status=200, task_input="Where is my card?", answer="card_arrival",
                            target="card_arrival")
    assert redact_record(record, redactor) is record
    leaky = ExchangeRecord(model="m", task="t", request=dirty, served_by="teacher",
                           status=200, task_input="mail jo@x.org", answer="ok")
    redacted = redact_record(leaky, redactor)
    assert redacted is not leaky and redacted.id == leaky.id
    assert (redacted.task_input, redacted.answer) == ("mail [EMAIL]", "ok")
    assert redacted.request["messages"][0]["content"] == "mail [EMAIL]"
    assert leaky.task_input == "mail jo@x.org"


def test_pii_filter_redacts_input_json_target_and_conversation() -> None:
    task = extract_task()
    example = ex(
        "I'm jo@x.org, card 4111 1111 1111 1111",
        {"intents": ["block_card"], "slots": {"email": "jo@x.org", "phone": "+44 20 7946 0958"}},
        "s1",
        messages=[{"role": "user", "content": "I'm jo@x.org, card 4111 1111 1111 1111"}],
        received="2024-01-15T10:30:00",
    )
    out = make(PiiFilter).apply(example, task)
    assert out is not None
    assert out.input == "I'm [EMAIL], card [CARD]"
    assert out.target == {
        "intents": ["block_card"],
        "slots": {"email": "[EMAIL]", "phone": "[PHONE]"},
    }
    assert out.meta["messages"] == [{"role": "user", "content": "I'm [EMAIL], card [CARD]"}]
    assert out.meta["received"] == "2024-01-15T10:30:00"
    assert out.meta["pii"] == {"email": 3, "card": 2, "phone": 1}
    assert out.source_id == "s1"
    assert task.parse_target(task.render(out.target)) == out.target  # still a valid target


def test_pii_filter_drop_action_and_clean_examples() -> None:
    task = classify_task()
    clean = ex("where is my card?", "card_arrival")
    dirty = ex("my card 4111 1111 1111 1111 has not arrived", "card_arrival")
    assert make(PiiFilter, action="drop").filter([clean, dirty], task) == [clean, None]
    redacted = make(PiiFilter).filter([clean, dirty], task)
    assert redacted[0] is clean  # nothing found: the very same object, counted as kept
    assert redacted[1] is not None and redacted[1].input == "my card [CARD] has not arrived"
    # The method the core uses on raw records honours the configured kinds.
    assert make(PiiFilter, kinds=["email"]).redact_value(["a@b.io 4111111111111111"]) == [
        "[EMAIL] 4111111111111111"
    ]


# --- the chain -----------------------------------------------------------------------------------


def test_the_default_chain_through_the_core() -> None:
    task = classify_task()
    examples = [
        ex("Where is my card?", "card_arrival"),
        ex("where is my card", "card_arrival"),  # exact duplicate of the first
        ex("What is the rate?", "bitcoin"),  # not a label
        ex("mail me at jo@x.org about my card", "card_arrival"),
        ex("?", "card_linking"),  # too short
    ]
    chain: list[tuple[str, Filter]] = [
        ("valid", make(ValidFilter)),
        ("dedup", make(DedupFilter, near_duplicate_threshold=None)),
        ("pii", make(PiiFilter)),
        ("length", make(LengthFilter, min_input_chars=2)),
    ]
    curated = curate(examples, chain, task)
    assert [e.input for e in curated.examples] == [
        "where is my card",
        "mail me at [EMAIL] about my card",
    ]
    assert curated.counts_dict() == {
        "valid": {"kept": 4, "changed": 0, "dropped": 1},
        "dedup": {"kept": 3, "changed": 0, "dropped": 1},
        "pii": {"kept": 2, "changed": 1, "dropped": 0},
        "length": {"kept": 2, "changed": 0, "dropped": 1},
    }


def test_dedup_embeddings_from_concurrent_workers_match_sentence_transformers() -> None:
    """Batches encoded on two threads at once give sentence-transformers' own embeddings,
    in the inputs' order, through either backend (the embedding classifier's encoder for
    the bundled mean-pooled model, sentence-transformers for others), in bfloat16 too, and
    leave the caller's torch thread count as it was."""
    import torch
    from sentence_transformers import SentenceTransformer

    from plugins.filters.dedup import (
        _load_direct,
        _load_sentence_transformer,
        default_model_path,
        mean_pooled,
    )

    rows = list(csv.DictReader((DATA / "banking77" / "train.csv").open()))[:300]
    texts = [row["text"] for row in rows]
    path = default_model_path()
    assert mean_pooled(path)
    expected = SentenceTransformer(path, device="cpu").encode(texts, batch_size=32,
                                                              convert_to_numpy=True)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    before = torch.get_num_threads()
    for load in (_load_direct, _load_sentence_transformer):
        encoder = load(path, "float32")
        for workers in (1, 2):
            got = encoder._encode(texts, 32, 1, workers)
            assert got.shape == expected.shape
            assert float(np.abs(got - expected).max()) < 1e-5, load
    half = _load_direct(path, "bfloat16")._encode(texts, 32, 1, 2)
    assert float(np.abs((half * expected).sum(axis=1) - 1).max()) < 1e-3
    assert torch.get_num_threads() == before


def test_dedup_runs_other_poolings_through_sentence_transformers(tmp_path: Path) -> None:
    """Only a transformer + mean pooling (+ normalisation) folder is computed directly;
    CLS pooling, extra modules or an unreadable folder go through sentence-transformers."""
    import shutil

    from plugins.filters.dedup import default_model_path, mean_pooled

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    assert mean_pooled(str(model))
    pooling = model / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**config, "pooling_mode_mean_tokens": False,
                                   "pooling_mode_cls_token": True}))
    assert not mean_pooled(str(model))
    # The filter's encoder for that folder gives sentence-transformers' CLS embeddings,
    # not the mean-pooled ones the direct path would compute.
    from sentence_transformers import SentenceTransformer

    from plugins.filters.dedup import _encoder

    texts = ["where is my card?", "I was charged twice for the same coffee"]
    cls = SentenceTransformer(str(model), device="cpu").encode(texts, convert_to_numpy=True)
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    got = _encoder(str(model), "float32").embed(texts, 8, 0, 1)
    mean = _encoder(None, "float32").embed(texts, 8, 0, 1)
    assert float(np.abs(got - cls).max()) < 1e-5
    assert float(np.abs(mean - cls).max()) > 1e-2
    pooling.write_text(json.dumps(config))
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps(
        [*modules, {"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"}]))
    assert not mean_pooled(str(model))
    (model / "modules.json").write_text("not json")
    assert not mean_pooled(str(model))
    assert not mean_pooled(str(tmp_path / "missing"))
