"""A small real trainer for tests: words that only ever came with one label vote for it.

Confidence is the share of such votes for the winning label (0 when no word is known),
so tests can predict exactly which requests the student serves.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Prediction, Student, Task, Trainer


class WordVoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(default=1.0, gt=0, le=1, description="multiplies every confidence")
    sleep_s: float = Field(default=0.0, ge=0, description="train this much longer (kill tests)")


def words(text: str) -> list[str]:
    return [w for w in text.lower().replace("?", " ").split() if w]


class WordVoteStudent(Student):
    def __init__(self, vocabulary: dict[str, Any], options: WordVoteOptions) -> None:
        self.vocabulary = vocabulary
        self.options = options

    def predict(self, inputs: list[str]) -> list[Prediction]:
        out = []
        for text in inputs:
            votes = Counter(
                json.dumps(self.vocabulary[w]) for w in words(text) if w in self.vocabulary
            )
            if not votes:
                out.append(Prediction(None, 0.0))
                continue
            best, count = votes.most_common(1)[0]
            out.append(
                Prediction(json.loads(best), self.options.scale * count / sum(votes.values()))
            )
        return out


class WordVoteTrainer(Trainer):
    Options = WordVoteOptions
    options: WordVoteOptions

    def train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        labels: dict[str, set[str]] = defaultdict(set)
        for example in examples:
            for word in words(example.input):
                labels[word].add(json.dumps(example.target))
        vocabulary = {w: json.loads(next(iter(t))) for w, t in labels.items() if len(t) == 1}
        (out_dir / "vocabulary.json").write_text(json.dumps(vocabulary))
        time.sleep(self.options.sleep_s)
        return {"examples": len(examples), "words": len(vocabulary)}

    def load(self, artifact_dir: Path, task: Task) -> Student:
        vocabulary = json.loads((artifact_dir / "vocabulary.json").read_text())
        return WordVoteStudent(vocabulary, self.options)


@hookimpl
def register_trainers(register: Any) -> None:
    register("word-vote", WordVoteTrainer)
