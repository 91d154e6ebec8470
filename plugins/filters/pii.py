"""Built-in filter ``pii``: personal data becomes typed placeholders, or drops the example.

Detectors, each with its placeholder:

- ``email`` ``[EMAIL]``: ``local@domain.tld``;
- ``iban`` ``[IBAN]``: country code, check digits and BBAN, of the country's IBAN length
  (when the country is known), passing the ISO 13616 mod-97 check;
- ``card`` ``[CARD]``: 13 to 19 digits, unbroken or grouped like a card (4-4-4-4[-1..4],
  Amex 4-6-5, Diners 4-6-4) with spaces or dashes, passing the Luhn check;
- ``ssn`` ``[SSN]``: US social security numbers ``123-45-6789`` (dashes required; the
  never-issued area numbers 000, 666 and 9xx are skipped);
- ``ip`` ``[IP]``: IPv4 dotted quads and IPv6 addresses (validated by ``ipaddress``); a
  four-part version number such as ``1.2.3.4`` cannot be told apart and goes too;
- ``sort_code`` ``[SORT_CODE]``: UK sort codes, only right after the words "sort code",
  because ``12-34-56`` alone is indistinguishable from a date;
- ``phone`` ``[PHONE]``: international numbers (``+44 20 7946 0958``, ``0044 ...``),
  national numbers with a trunk 0 (``020 7946 0958``, ``07911123456``,
  ``06 12 34 56 78``), North American numbers with separators (``(415) 555-2671``), and
  any 7 to 15 digit number right after words like "phone", "mobile" or "call me on".

Detectors run in that order over the text as redacted so far: the placeholders contain
no digits and no ``@``, so a later detector never re-matches a part of an earlier one,
and the specific, checksummed patterns (an IBAN contains card-like digit groups, a card
number looks like a long phone number) claim their text before the loose phone patterns.

Precision choices (false positives would mangle the training data): plain numbers,
amounts (``£20.00``, ``1,500``), dates (``2024-01-15``, ``01.02.2023``, ``15/01/2023``),
times and short order or reference numbers match none of the detectors; a digit run
that fails Luhn is not a card and a code that fails mod-97 is not an IBAN.

``redact`` and ``redact_value`` are plain functions so that the core can use them on raw
traffic records, exports and logs; the filter object's ``redact_value`` method is what
``gateway.redaction`` looks for on a task's chain.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Filter, Task

PiiKind = Literal["email", "iban", "card", "ssn", "ip", "sort_code", "phone"]
#: Every detector, in the order they run.
ALL_KINDS: tuple[PiiKind, ...] = get_args(PiiKind)
PLACEHOLDERS: dict[str, str] = {kind: f"[{kind.upper()}]" for kind in ALL_KINDS}

Counts = dict[str, int]
_Detector = Callable[[str, Counts], str]

# --- e-mail ----------------------------------------------------------------------------

# The lookbehind anchors the local part at a token start, so a long run of word
# characters without an "@" is scanned once, not once per position.
# Domain labels and the top-level domain may be non-ASCII (internationalised domains).
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}(?![\w-])"
)


def _email(text: str, counts: Counts) -> str:
    if "@" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        counts["email"] = counts.get("email", 0) + 1
        return PLACEHOLDERS["email"]

    return _EMAIL.sub(replace, text)


# --- IBAN ------------------------------------------------------------------------------

# ISO 13616 registry lengths. A known country must have exactly its length, which stops
# a greedy match from running into the words after the IBAN.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27,
    "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

# Country code, check digits, then alphanumerics with single optional space/dash
# separators (IBANs are printed in groups of four). Lower case is accepted: people type it.
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}")
_ALNUM = re.compile(r"[A-Za-z0-9]")
_LETTER_VALUES = str.maketrans({chr(65 + i): str(10 + i) for i in range(26)})


def iban_valid(code: str) -> bool:
    """Whether a compact IBAN (no separators) has a valid length and mod-97 checksum."""
    code = code.upper()
    if not 15 <= len(code) <= 34 or not code.isalnum() or not code.isascii():
        return False
    expected = IBAN_LENGTHS.get(code[:2])
    if expected is not None and len(code) != expected:
        return False
    if not code[2:4].isdigit() or code[2:4] in ("00", "01", "99"):
        return False
    # ISO 7064 mod 97-10: check characters moved to the end, letters as 10..35.
    return int((code[4:] + code[:4]).translate(_LETTER_VALUES)) % 97 == 1


def _iban_end(text: str, match: re.Match[str]) -> int | None:
    """End offset of a valid IBAN starting at ``match``, or None."""
    candidate = match.group(0)
    compact = candidate.replace(" ", "").replace("-", "").upper()
    length = IBAN_LENGTHS.get(compact[:2], len(compact))
    if len(compact) < length or not iban_valid(compact[:length]):
        return None
    if length == len(compact):
        end = match.end()
    else:  # the match ran on into the following words: end at the length-th character
        end = match.start() + list(_ALNUM.finditer(candidate))[length - 1].end()
    # An IBAN glued to more letters or digits is part of something else.
    if end < len(text) and text[end].isalnum():
        return None
    return end


def _iban(text: str, counts: Counts) -> str:
    pieces: list[str] = []
    position = 0
    search_from = 0
    while True:
        match = _IBAN.search(text, search_from)
        if match is None:
            break
        end = _iban_end(text, match)
        if end is None:
            # Skip this country code; the next candidate can start inside the match.
            search_from = match.start() + 1
            continue
        pieces.append(text[position : match.start()])
        pieces.append(PLACEHOLDERS["iban"])
        counts["iban"] = counts.get("iban", 0) + 1
        position = search_from = end
    if not pieces:
        return text
    pieces.append(text[position:])
    return "".join(pieces)


# --- payment cards ---------------------------------------------------------------------

# A maximal run of digits with single space/dash separators, with an optional leading
# "+" so that international phone numbers are recognised (and left to the phone
# detector) as a whole instead of from their second group on. Not after a word
# character, "." or "," (decimals, amounts, codes such as ``ref-...``).
_DIGIT_RUN = re.compile(r"(?<![\w.,+-])\+?\d(?:[ -]?\d)*")
_GROUP = re.compile(r"\d+")
_DECIMAL_AFTER = re.compile(r"[.,]\d")


# Every second digit from the right is doubled, and the digits of the product summed.
_LUHN_DOUBLED = str.maketrans("0123456789", "0246813579")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of digits."""
    doubled = digits[-2::-2].translate(_LUHN_DOUBLED)
    return (sum(map(int, digits[-1::-2])) + sum(map(int, doubled))) % 10 == 0


def _card_layout(groups: list[int]) -> bool:
    """Whether digit groups are laid out like a card number (dates and phone numbers
    grouped 4-2-2 or 5-6 are not, which keeps their Luhn coincidences out)."""
    if len(groups) == 1:
        return True
    if groups in ([4, 6, 5], [4, 6, 4]):  # Amex, Diners
        return True
    return all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4


def _card_span(digits: str) -> bool:
    # All one digit (0000 0000 0000 0000) passes Luhn but is filler, not a card.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _cards_in_run(run: str) -> list[tuple[int, int]]:
    """Card spans (offsets into ``run``), leftmost-longest over whole digit groups: a
    card followed by an expiry date or another number is still found."""
    groups = run.replace("-", " ").split(" ")  # the run has single separators only
    sizes = [len(g) for g in groups]
    # The usual case first: the whole run is one card.
    if 13 <= len(run) - len(groups) + 1 <= 19 and _card_layout(sizes):
        if _card_span("".join(groups)):
            return [(0, len(run))]
        if len(groups) == 1:
            return []
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size + 1)
    found: list[tuple[int, int]] = []
    first = 0
    while first < len(groups):
        if sizes[first] != 4 and not 13 <= sizes[first] <= 19:
            first += 1  # every card layout starts with a group of 4, or is one group
            continue
        best = None
        total = 0
        for last in range(first, len(groups)):
            total += sizes[last]
            if total > 19:
                break
            if (
                total >= 13
                and _card_layout(sizes[first : last + 1])
                and _card_span("".join(groups[first : last + 1]))
            ):
                best = last
        if best is None:
            first += 1
            continue
        found.append((starts[first], starts[best] + sizes[best]))
        first = best + 1
    return found


def _card(text: str, counts: Counts) -> str:
    pieces: list[str] = []
    position = 0
    for match in _DIGIT_RUN.finditer(text):
        run = match.group(0)
        if run[0] == "+" or len(run) < 13:
            continue
        if _DECIMAL_AFTER.match(text, match.end()):
            continue  # 1234 5678 9012 3456.78 is an amount, not a card
        for start, end in _cards_in_run(run):
            pieces.append(text[position : match.start() + start])
            pieces.append(PLACEHOLDERS["card"])
            counts["card"] = counts.get("card", 0) + 1
            position = match.start() + end
    if not pieces:
        return text
    pieces.append(text[position:])
    return "".join(pieces)


# --- US social security numbers --------------------------------------------------------

_SSN = re.compile(r"(?<![\w.,/-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-]|[.,/]\d)")


def _ssn(text: str, counts: Counts) -> str:
    if text.count("-") < 2:
        return text

    def replace(match: re.Match[str]) -> str:
        counts["ssn"] = counts.get("ssn", 0) + 1
        return PLACEHOLDERS["ssn"]

    return _SSN.sub(replace, text)


# --- IP addresses ----------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _ip(text: str, counts: Counts) -> str:
    if text.count(".") < 3 and text.count(":") < 2:
        return text

    def replace_v4(match: re.Match[str]) -> str:
        counts["ip"] = counts.get("ip", 0) + 1
        return PLACEHOLDERS["ip"]

    text = _IPV4.sub(replace_v4, text)
    if "::" not in text and text.count(":") < 7:
        return text  # an IPv6 address has "::" or all seven colons

    def replace_v6(match: re.Match[str]) -> str:
        candidate = match.group(0)
        groups = [g for g in candidate.split(":") if g]
        # Times (10:30:00) are not valid IPv6; "add::f" in code is, so also ask for two
        # groups and a decimal digit.
        if len(groups) < 2 or not any(c.isdigit() for c in candidate):
            return candidate
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            return candidate
        counts["ip"] = counts.get("ip", 0) + 1
        return PLACEHOLDERS["ip"]

    return _IPV6.sub(replace_v6, text)


# --- UK sort codes ---------------------------------------------------------------------

_SORT_CODE = re.compile(
    r"(?i:\bsort[ -]?code\b)(?:\s*(?:is|was|:|=|-))*\s*"
    r"(\d{2}([- ]?)\d{2}\2\d{2})(?![\w]|[.,/-]\d)"
)


def _sort_code(text: str, counts: Counts) -> str:
    if "sort" not in text.lower():
        return text

    def replace(match: re.Match[str]) -> str:
        counts["sort_code"] = counts.get("sort_code", 0) + 1
        keep = match.start(1) - match.start(0)  # the words before the number stay
        return match.group(0)[:keep] + PLACEHOLDERS["sort_code"]

    return _SORT_CODE.sub(replace, text)


# --- phone numbers ---------------------------------------------------------------------

_PHONE = re.compile(
    r"""
    (?<![\w+.,/:-])
    (?:
        # +CC, then digits with optional single separators and parenthesised parts such
        # as (0) or (415); one digit per step, so there is one way to match, no
        # backtracking blow-up on long digit strings.
        (?P<intl>\+[1-9](?:[ .-]?(?:\(\d{1,5}\)|\d)){7,20})
        # 00CC with separated groups
      | (?P<idd>00[1-9]\d{0,2}(?:[ .-]\d{1,6}){1,6})
        # North American, separators required: (415) 555-2671, 1-800-555-0199
      | (?P<nanp>(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4})
        # trunk 0 in parentheses: (020) 7946 0958
      | (?P<paren>\(0\d{1,4}\)[ .-]?\d{2,8}(?:[ .-]\d{2,6}){0,3})
        # trunk 0, one consistent separator: 020 7946 0958, 06 12 34 56 78
      | (?P<trunk>0[1-9]\d{0,4}(?P<sep>[ .-])\d{2,6}(?:(?P=sep)\d{2,6}){0,3})
        # trunk 0, unbroken: 07911123456
      | (?P<plain>0[1-9]\d{8,9})
    )
    (?!\w|[.,/:-]\d)
    """,
    re.VERBOSE,
)
_PHONE_FORMS = ("intl", "idd", "nanp", "paren", "trunk", "plain")

# Digit counts per form: E.164 allows 15 digits; national trunk numbers with 9 to 11
# digits leave out dates such as 01.02.2023 (8 digits).
_PHONE_DIGITS = {
    "intl": (8, 15),
    "idd": (10, 17),
    "nanp": (10, 11),
    "paren": (9, 11),
    "trunk": (9, 11),
    "plain": (10, 11),
}

# Any 7-15 digit number right after words that announce a phone number.
_PHONE_CONTEXT = re.compile(
    r"(?i:\b(?:phone|telephone|tel|mobile|cell|whatsapp|fax|sms"
    r"|(?:call|text|ring|reach|contact)\s+me)\b)"
    r"(?:\s*(?:number|no\.?|num|\#))?(?:\s*(?:is|was|:|at|on|=|-))*\s*"
    r"(\+?\(?\d(?:[ .()-]{0,2}\d){6,14})(?!\w|[.,/:-]\d)"
)


# Cheap substring checks before the context regex, which is slow to scan.
_PHONE_WORDS = ("phone", "tel", "mobile", "cell", "whatsapp", "fax", "sms", " me")


def _digit_count(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _phone(text: str, counts: Counts) -> str:
    def replace(match: re.Match[str]) -> str:
        form = next(name for name in _PHONE_FORMS if match.group(name) is not None)
        number = match.group(0)
        rest = ""
        # A trunk "(0)" after the country code is not dialled: do not count it.
        digits = _digit_count(number.replace("(0)", ""))
        if form == "intl" and digits > 15:
            # Numbers written right after the phone number: cut whole groups off the
            # end until the number fits E.164.
            for group in reversed(list(_GROUP.finditer(number))):
                digits -= len(group.group(0))
                number = number[: group.start()].rstrip(" .-")
                if digits <= 15:
                    break
            rest = match.group(0)[len(number) :]
        low, high = _PHONE_DIGITS[form]
        if not low <= digits <= high:
            return match.group(0)
        counts["phone"] = counts.get("phone", 0) + 1
        return PLACEHOLDERS["phone"] + rest

    text = _PHONE.sub(replace, text)
    lowered = text.lower()
    if not any(word in lowered for word in _PHONE_WORDS):
        return text

    def replace_context(match: re.Match[str]) -> str:
        counts["phone"] = counts.get("phone", 0) + 1
        keep = match.start(1) - match.start(0)  # the announcing words stay
        return match.group(0)[:keep] + PLACEHOLDERS["phone"]

    return _PHONE_CONTEXT.sub(replace_context, text)


# --- the public functions ----------------------------------------------------------------


# Each detector with the fewest digits its matches contain: most texts that have digits
# have few of them (amounts, dates, counts), and a C-level digit count lets them skip the
# regex scans, which cost microseconds each in Python's engine.
_DETECTORS: dict[str, tuple[int, _Detector]] = {
    "email": (0, _email),
    "iban": (4, _iban),
    "card": (13, _card),
    "ssn": (9, _ssn),
    "ip": (1, _ip),
    "sort_code": (6, _sort_code),
    "phone": (7, _phone),
}
_ALL = frozenset(ALL_KINDS)
# Every detector needs a digit except e-mail, which needs an "@".
_MAYBE_PII = re.compile(r"[0-9@]")


@lru_cache(maxsize=64)
def _detectors(kinds: frozenset[str]) -> tuple[tuple[int, _Detector], ...]:
    unknown = kinds - _ALL
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(ALL_KINDS)}")
    # Always in ALL_KINDS order, whatever order the caller listed them in.
    return tuple(_DETECTORS[kind] for kind in ALL_KINDS if kind in kinds)


def redact(text: str, kinds: Iterable[str] = _ALL) -> tuple[str, dict[str, int]]:
    """``text`` with personal data replaced by typed placeholders, and the number of
    replacements by kind (kinds with none are left out)."""
    counts: Counts = {}
    if _MAYBE_PII.search(text) is None:  # one scan in C: most strings have neither
        return text, counts
    key = kinds if isinstance(kinds, frozenset) else frozenset(kinds)
    return _redact_text(text, key, counts), counts


def _redact_text(text: str, kinds: frozenset[str], counts: Counts) -> str:
    """``redact`` past its first check, adding to ``counts``."""
    # Placeholders have no digits, so the count of the original text stays an upper
    # bound as detectors replace things.
    digits = sum(map(text.count, "0123456789"))
    for min_digits, detector in _detectors(kinds):
        if digits >= min_digits:
            text = detector(text, counts)
    return text


def redact_value(
    value: Any, kinds: Iterable[str] = _ALL, counts: dict[str, int] | None = None
) -> Any:
    """A JSON-like value with every string in it redacted (dict values and list items,
    recursively; keys are kept, as they name fields). Adds to ``counts`` when given. A
    value with nothing to redact is returned as it is, not copied: the store redacts
    every record, and most have nothing to redact."""
    key = kinds if isinstance(kinds, frozenset) else frozenset(kinds)
    return _redact_value(value, key, counts if counts is not None else {})


def _redact_value(value: Any, kinds: frozenset[str], counts: Counts) -> Any:
    if isinstance(value, str):
        if _MAYBE_PII.search(value) is None:
            return value
        found = sum(counts.values())
        text = _redact_text(value, kinds, counts)
        return text if sum(counts.values()) > found else value
    if isinstance(value, dict):
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            new = _redact_value(item, kinds, counts)
            if new is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        return value if changed is None else changed
    if isinstance(value, list | tuple):
        items = [_redact_value(item, kinds, counts) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return items if isinstance(value, list) else tuple(items)
    return value


# --- the filter ----------------------------------------------------------------------------


class PiiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["redact", "drop"] = Field(
        default="redact",
        description="redact: replace what is found by typed placeholders and keep the "
        "example; drop: leave out every example with personal data (raw records are "
        "still redacted)",
    )
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(ALL_KINDS),
        description="which detectors run: " + ", ".join(ALL_KINDS),
    )

    @field_validator("kinds")
    @classmethod
    def _some(cls, value: list[PiiKind]) -> list[PiiKind]:
        if not value:
            raise ValueError("give at least one kind, or leave the pii filter out")
        return value


class PiiFilter(Filter):
    """Redacts the input, the target's strings and the recorded conversation
    (``meta["messages"]``, which exports use); counts go to ``meta["pii"]``."""

    Options = PiiOptions
    options: PiiOptions

    def __init__(self, options: BaseModel) -> None:
        super().__init__(options)
        self._kinds = frozenset(self.options.kinds)

    def redact_value(self, value: Any) -> Any:
        """What ``gateway.redaction`` applies to raw records of this task."""
        return redact_value(value, self._kinds)

    def apply(self, example: Example, task: Task) -> Example | None:
        counts: Counts = {}
        text = redact_value(example.input, self._kinds, counts)
        target = redact_value(example.target, self._kinds, counts)
        meta = example.meta
        if "messages" in meta:
            messages = redact_value(meta["messages"], self._kinds, counts)
            if counts:
                meta = {**meta, "messages": messages}
        if not counts:
            return example  # unchanged, so the chain counts it as kept
        if self.options.action == "drop":
            return None
        return dataclasses.replace(example, input=text, target=target, meta={**meta, "pii": counts})


@hookimpl
def register_filters(register: Any) -> None:
    register("pii", PiiFilter)
