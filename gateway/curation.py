"""The curation chain: which recorded teacher answers become training examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gateway.config import ConfigError, FilterSpec, format_validation_error
from gateway.interfaces import Example, Filter, Task
from gateway.plugins import Plugins


@dataclass
class FilterCounts:
    kept: int = 0
    changed: int = 0
    dropped: int = 0


@dataclass
class Curated:
    examples: list[Example]
    counts: dict[str, FilterCounts] = field(default_factory=dict)

    def counts_dict(self) -> dict[str, dict[str, int]]:
        return {name: vars(c).copy() for name, c in self.counts.items()}


def build_chain(
    task_name: str, specs: list[FilterSpec], plugins: Plugins
) -> list[tuple[str, Filter]]:
    """Filter objects in chain order; errors name ``tasks.<task>.filters[i]``."""
    chain = []
    for index, spec in enumerate(specs):
        where = f"tasks.{task_name}.filters[{index}]"
        options: dict[str, Any]
        if isinstance(spec, str):
            name, options = spec, {}
        elif len(spec) == 1:
            name, options = next(iter(spec.items()))
        else:
            raise ConfigError(
                f"invalid configuration:\n  {where}: give one filter name per "
                "entry, or a mapping {name: {options}}"
            )
        try:
            filter_class = plugins.filters.get(name)
        except KeyError as exc:
            raise ConfigError(f"invalid configuration:\n  {where}: {exc.args[0]}") from None
        try:
            parsed = filter_class.Options.model_validate(options or {})
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(
                    exc, filter_class.Options, ("tasks", task_name, f"filters[{index}]", name)
                )
            ) from None
        chain.append((name, filter_class(parsed)))
    return chain


def curate(examples: list[Example], chain: list[tuple[str, Filter]], task: Task) -> Curated:
    counts: dict[str, FilterCounts] = {}
    current = list(examples)
    for name, step in chain:
        results = step.filter(current, task)
        if len(results) != len(current):
            raise RuntimeError(
                f"filter {name!r} returned {len(results)} results for {len(current)} examples"
            )
        tally = counts.setdefault(name, FilterCounts())
        kept: list[Example] = []
        for before, after in zip(current, results, strict=True):
            if after is None:
                tally.dropped += 1
                continue
            if after != before:
                tally.changed += 1
            else:
                tally.kept += 1
            kept.append(after)
        current = kept
    return Curated(current, counts)


def summary(curated: Curated, recorded: int) -> dict[str, Any]:
    return {
        "recorded": recorded,
        "examples": len(curated.examples),
        "filters": curated.counts_dict(),
    }
