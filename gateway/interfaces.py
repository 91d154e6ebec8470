"""The objects plugins register: tasks, filters and trainers.

The core owns the names (plugins hand objects to a ``register`` callback) and calls only
the methods below, so a third-party plugin needs nothing but these base classes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from gateway.schemas import ChatCompletionRequest


class NoOptions(BaseModel):
    """Options model for plugins that take none: any key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def input_bucket(text: str) -> float:
    """Where a task input falls in [0, 1), fixed by a hash of the input: the same in every
    round and every process, so an input is held out, or in a fold, for every version."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def input_fold(text: str, folds: int) -> int:
    """The cross-fitting fold (``0 .. folds - 1``) of a task input (see ``input_bucket``)."""
    return min(int(input_bucket(text) * folds), folds - 1)


class InvalidTarget(ValueError):
    """The teacher's answer cannot be turned into a target for this task."""


class Task(ABC):
    """A narrow task: what the student learns and how teacher answers are judged.

    Subclasses set ``Options`` to a pydantic model of their ``options:`` config block;
    the core validates the block and passes the parsed model to ``__init__``.
    """

    Options: ClassVar[type[BaseModel]] = NoOptions
    #: The trainer used when the config names none (``tasks.<name>.student.trainer``).
    default_trainer: ClassVar[str | None] = None

    def __init__(self, name: str, options: BaseModel) -> None:
        self.name = name
        self.options = options

    @abstractmethod
    def task_input(self, request: ChatCompletionRequest) -> str:
        """The text the student sees for this chat request."""

    @abstractmethod
    def parse_target(self, answer: str) -> Any:
        """Normalise a teacher answer into a JSON-serialisable target; raise InvalidTarget."""

    @abstractmethod
    def render(self, target: Any) -> str:
        """The assistant message content for a target (what the teacher would have said)."""

    def agree(self, a: Any, b: Any) -> bool:
        """Whether two targets count as the same answer."""
        return bool(a == b)


@dataclass(frozen=True)
class Example:
    """One curated training example: the task input and the teacher's target."""

    input: str
    target: Any
    source_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Filter:
    """Decides whether (and in what form) a logged example enters the training set.

    Filters run in a configured chain over a whole candidate dataset, oldest example
    first. Override ``apply`` for a per-example decision, or ``filter`` when the decision
    depends on the other examples (duplicates) or is cheaper in batches (embeddings).
    """

    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel) -> None:
        self.options = options

    def apply(self, example: Example, task: Task) -> Example | None:
        """Return the example (possibly changed) to keep it, or None to drop it."""
        raise NotImplementedError(f"{type(self).__name__} implements neither apply nor filter")

    def filter(self, examples: list[Example], task: Task) -> list[Example | None]:
        """One result per example, in order: kept (possibly changed) or None (dropped)."""
        return [self.apply(example, task) for example in examples]


@dataclass(frozen=True)
class Prediction:
    target: Any
    confidence: float


#: ``Student.predict_parts``'s callback: (positions in the batch, their predictions).
Deliver = Callable[[list[int], list[Prediction]], None]


class Student(ABC):
    """A trained artifact that predicts a target with a confidence for a batch of inputs."""

    @abstractmethod
    def predict(self, inputs: list[str]) -> list[Prediction]: ...

    def predict_parts(self, inputs: list[str], deliver: Deliver) -> None:
        """Predict ``inputs``, handing parts of the batch to ``deliver(positions,
        predictions)`` as soon as each is ready, possibly from other threads; every
        position is delivered once before this returns. The gateway answers a part's
        requests at once, while the rest of the batch is still computed. The default
        delivers the whole batch from ``predict``."""
        deliver(list(range(len(inputs))), self.predict(inputs))

    def predict_offline(self, inputs: list[str]) -> list[Prediction]:
        """Predict a whole data set, off the serving path: a training round's evaluations
        (a candidate on held-out labels, the active version against it) call this. The
        default is ``predict`` in batches of 64; a student may reuse work kept between
        rounds (the embedding classifier reads its inputs' features from the feature
        cache)."""
        out: list[Prediction] = []
        for start in range(0, len(inputs), 64):
            out.extend(self.predict(inputs[start : start + 64]))
        return out


class Trainer(ABC):
    """Trains a student from examples into an artifact directory, and loads it back."""

    Options: ClassVar[type[BaseModel]] = NoOptions
    #: Options that say how a process serves a version rather than what the version is
    #: (where it runs, in which precision, on which server). A version is loaded with the
    #: options it was trained with, except these, which come from the loading process's
    #: own config for the task's student (defaults included) when that names the same
    #: trainer: see ``options_to_load``.
    serving_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: BaseModel) -> None:
        self.options = options

    @abstractmethod
    def train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        """Write the artifact into ``out_dir``; return training figures for the registry."""

    @abstractmethod
    def load(self, artifact_dir: Path, task: Task) -> Student:
        """Load an artifact written by ``train`` (or ``train_cross_fitted``)."""

    def can_cross_fit(self) -> bool:
        """Whether ``train_cross_fitted`` is available with these options."""
        return False

    def train_cross_fitted(
        self, examples: list[Example], task: Task, out_dir: Path, folds: int
    ) -> tuple[dict[str, Any], list[Prediction]]:
        """Optional: train one model per fold of the inputs (``input_fold``), each on the
        other folds' examples, into one artifact whose loaded student answers every input
        with the model of that input's fold. Return the training figures and, for each
        example in order, the prediction of the model that never trained on it: the
        gateway calibrates on all of them, and they are what serving that input gives."""
        raise NotImplementedError(f"{type(self).__name__} does not cross-fit")


def options_to_load(trainer_class: type[Trainer], trained_with: dict[str, Any],
                    configured: dict[str, Any] | None) -> BaseModel:
    """The options to load a stored version with: those it was ``trained_with``, with the
    trainer's ``serving_options`` taken from this process's ``configured`` options (None:
    its config names another trainer for the task, so the stored ones stand)."""
    options = dict(trained_with)
    if configured is not None and trainer_class.serving_options:
        mine = trainer_class.Options.model_validate(configured).model_dump()
        options.update({key: mine[key] for key in trainer_class.serving_options if key in mine})
    return trainer_class.Options.model_validate(options)
