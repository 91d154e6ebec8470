"""What the token-level trainers (``structured-extractor``, ``deletion-tagger``) share:
one model per fold of the inputs, each answering its own fold, and the L-BFGS linear fit
they train their parts with."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from gateway.interfaces import Prediction, input_fold

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
