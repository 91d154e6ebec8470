"""What the gateway needs to know about teacher models, answered without importing litellm
where the answer is simple.

Importing litellm costs ~190 MB of memory and ~3 s in every serving process, yet the
common teacher (OpenAI or any OpenAI-compatible endpoint) is called directly over HTTP
(see gateway.transports). The provider of a model string and its price come from the
price map litellm ships as a JSON file; only what that cannot answer (another provider's
request translation, an unusual model string) loads litellm itself, once, on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any, NamedTuple

import orjson

# Providers whose endpoint takes the OpenAI chat-completions body as is.
OPENAI_COMPATIBLE = frozenset(
    {"openai", "hosted_vllm", "openai_like", "custom_openai", "litellm_proxy"}
)
PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"


@functools.cache
def litellm() -> Any:  # the module; Any because its attributes are set as well as read
    """The litellm module, imported on first use and configured for a server (gateway's
    ``__init__`` has already told it never to fetch its price map)."""
    import litellm as module

    module.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    return module


class MapEntry(NamedTuple):
    provider: str
    mode: str
    input_per_token: float | None
    output_per_token: float | None


@functools.cache
def price_map() -> dict[str, MapEntry]:
    """litellm's bundled price map, read from its JSON file (litellm is not imported), kept
    to the four fields used here; empty when litellm is not installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / PRICE_MAP_FILE
    if not path.is_file():
        return {}
    entries: dict[str, MapEntry] = {}
    for name, info in orjson.loads(path.read_bytes()).items():
        if not isinstance(info, dict):
            continue  # the file's "sample_spec" documentation entry and the like
        entries[name] = MapEntry(
            str(info.get("litellm_provider") or ""),
            str(info.get("mode") or ""),
            _number(info.get("input_cost_per_token")),
            _number(info.get("output_cost_per_token")),
        )
    return entries


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _entry(model: str) -> MapEntry | None:
    """The map's entry for a model string, with or without its provider prefix."""
    entries = price_map()
    if model in entries:
        return entries[model]
    prefix, _, rest = model.partition("/")
    entry = entries.get(rest) if rest else None
    if entry is not None and entry.provider == prefix:
        return entry
    return None


def split_model(model: str) -> tuple[str, str] | None:
    """(provider, the provider's model name) for an OpenAI-compatible model string, without
    litellm: an explicit OpenAI-compatible prefix (``hosted_vllm/llama-3``), or a bare
    name the price map files under OpenAI chat models (``gpt-4o``). None where only
    litellm can tell."""
    prefix, _, rest = model.partition("/")
    if rest and prefix in OPENAI_COMPATIBLE:
        return prefix, rest
    if not rest:
        entry = price_map().get(model)
        if entry is not None and entry.provider == "openai" and entry.mode == "chat":
            return "openai", model
    return None


def price_per_token(model: str) -> tuple[float, float] | None:
    """USD per prompt and per completion token from the price map, or None when the map
    has no flat chat price for the model (the caller then asks litellm)."""
    entry = _entry(model)
    if entry is None or entry.input_per_token is None or entry.output_per_token is None:
        return None
    return entry.input_per_token, entry.output_per_token
