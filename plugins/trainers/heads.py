"""The embedding classifier's heads on the encoder's features: a multinomial logistic
regression and a kNN vote, their ensemble, the calibrator that makes its confidence a
probability of agreeing with the teacher, and the cross-fitted heads (one per fold of the
inputs over one shared memory) that ``calibration: crossfit`` serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads lazily: a gateway without students skips it
    import torch

    from plugins.trainers.embedding_classifier import EmbeddingClassifierOptions


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
              index: KnnIndex | None = None, query_folds: np.ndarray | None = None,
              bank_folds: np.ndarray | None = None) -> np.ndarray:
    """Distance-weighted vote of the k most cosine-similar memory rows (rows normalised).
    ``index``: the same memory's int8 index, to find them with less to read per query.
    ``query_folds`` with ``bank_folds`` (or an index built with them): each query votes
    with the rows of other folds only."""
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
        exclude = (None if query_folds is None
                   else torch.from_numpy(query_folds[start:start + chunk].astype(np.int64)))
        if memory is None:
            assert index is not None
            values, indices = index.nearest(block, k, exclude)
        else:
            sims = block @ memory.T
            if exclude is not None and bank_folds is not None:
                own = torch.from_numpy(bank_folds).unsqueeze(0) == exclude.unsqueeze(1)
                sims.masked_fill_(own, float("-inf"))
            values, indices = torch.topk(sims, k, dim=1)
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
    was at most 0.0066 for Banking77's test texts against its 10,003 training rows (on an
    AVX2-only AMD EPYC; the exact 10 neighbours for all 3,080).

    Measured for Banking77's 10,003 rows of 384: the same votes as the exact search for
    all 3,080 test texts; in the gateway (2 cores, two servers in alternating slices) a
    single request p50 10.0 / 10.7 against 10.7 / 11.5 ms, 421 / 371 against 390 / 359
    req/s under 32 connections (the first run with a shortlist of 24 through
    quantize_dynamic, the second as here): a quarter of the memory read per query, and
    less of the encoder's weights evicted from the caches by it.
    """

    MIN_ROWS = 2048  # below this, reading the float32 memory is cheap enough

    def __init__(self, bank: np.ndarray, shortlist: int = 32,
                 folds: np.ndarray | None = None) -> None:
        import warnings

        import torch

        self.memory = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        self.shortlist = shortlist
        # Cross-fitted heads share one memory: a query never sees its own fold's rows,
        # which (stored in fold order, as cross_fit_heads does) are one slice to hide.
        self.folds = None if folds is None else torch.from_numpy(folds.astype(np.int64))
        self._fold_ranges: list[tuple[int, int]] = []
        if folds is not None and len(folds):
            if np.any(np.diff(folds) < 0):
                raise ValueError("the memory's rows must be stored in fold order")
            ids = np.arange(int(folds.max()) + 1)
            self._fold_ranges = list(zip(np.searchsorted(folds, ids, side="left").tolist(),
                                         np.searchsorted(folds, ids, side="right").tolist(),
                                         strict=True))
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

        # reduce_range: queries quantised to 7 bits. fbgemm's AVX2 kernels (no VNNI) sum
        # pairs of u8 x s8 products in int16, which saturates with 8-bit queries: errors up
        # to 0.23 on random unit vectors of 64, which pushed true neighbours out of the
        # shortlist, and 0.048 on Banking77's (0.0066 with 7 bits). torch's own dynamic
        # Linear passes it too.
        out: torch.Tensor = torch.ops.quantized.linear_dynamic(queries, self._packed,
                                                                 reduce_range=True)
        return out

    def nearest(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, row indices) of the k nearest rows per query, best first;
        ``exclude``: per query, the fold whose rows it must not see (memory built with
        ``folds``)."""
        import torch

        with torch.inference_mode():
            rough = self.int8(queries)
            if exclude is not None and self.folds is not None:
                for row, fold in enumerate(exclude.tolist()):
                    if fold < len(self._fold_ranges):  # else the fold has no rows
                        start, end = self._fold_ranges[fold]
                        rough[row, start:end] = float("-inf")
            shortlist = min(max(self.shortlist, k), rough.shape[1])
            candidates = torch.topk(rough, shortlist, dim=1, sorted=False).indices
            # index_select and a row-wise dot product: 50 µs for 16 queries x 32
            # candidates, where fancy indexing and bmm (matrix-vector products, one call
            # per query inside) took 240 µs.
            rows = self.memory.index_select(0, candidates.reshape(-1))
            exact = torch.linalg.vecdot(rows.view(len(queries), shortlist, -1),
                                        queries.unsqueeze(1))
            if exclude is not None and self.folds is not None:
                # Own-fold rows left in a shortlist longer than the other folds' rows.
                own = self.folds[candidates] == exclude.unsqueeze(1)
                exact.masked_fill_(own, float("-inf"))
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
    # label_counts per row (rows x classes) when each row's heads saw other data
    seen = label_counts[rows, pred] if label_counts.ndim == 2 else label_counts[pred]
    top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.hstack([np.zeros_like(p), p])
    stats = np.stack([
        _logit(p[rows, pred]),
        _logit(p_lr[rows, pred]),
        _logit(p_knn[rows, pred]),
        (p_lr.argmax(axis=1) == p_knn.argmax(axis=1)).astype(np.float64),
        top2[:, 1] - top2[:, 0],
        np.log1p(seen),
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

    def predict(self, emb: np.ndarray, feats: np.ndarray, options: EmbeddingClassifierOptions
                ) -> tuple[np.ndarray, np.ndarray]:
        """Label index and calibrated confidence per row."""
        out = self.raw(emb, feats, options)
        return out.pred, np.clip(self.calibrator(out), 0.0, 1.0)


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


@dataclass
class FoldedHead:
    """Cross-fitted heads: one logistic regression and calibrator per fold of the inputs,
    one kNN memory for all (each query votes with the other folds' rows). An input is
    answered by its own fold's head, which never trained on it."""

    labels: list[str]
    lr_weight: np.ndarray  # folds x classes x dim
    lr_bias: np.ndarray  # folds x classes
    bank: np.ndarray
    bank_labels: np.ndarray
    bank_folds: np.ndarray
    label_counts: np.ndarray  # folds x classes: what each fold's heads saw
    calibrators: list[Calibrator]
    _index: KnnIndex | None = field(default=None, init=False, repr=False)

    @property
    def folds(self) -> int:
        return len(self.calibrators)

    @property
    def index(self) -> KnnIndex | None:
        if self._index is None and len(self.bank) >= KnnIndex.MIN_ROWS:
            self._index = KnnIndex(self.bank, folds=self.bank_folds)
        return self._index

    def raw(self, emb: np.ndarray, feats: np.ndarray, options: EmbeddingClassifierOptions,
            folds: np.ndarray) -> HeadOutput:
        n = len(self.labels)
        p_lr = np.empty((len(folds), n))
        for k in np.unique(folds):
            rows = folds == k
            p_lr[rows] = softmax(feats[rows] @ self.lr_weight[k].T + self.lr_bias[k])
        p_knn = knn_probs(self.bank, self.bank_labels, emb, n, options.knn_k,
                          options.knn_temperature, index=self.index, query_folds=folds,
                          bank_folds=self.bank_folds)
        return combine(p_lr, p_knn, options.head, options.knn_weight,
                       self.label_counts[folds])

    def predict(self, emb: np.ndarray, feats: np.ndarray, options: EmbeddingClassifierOptions,
                folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label index and calibrated confidence per row, each by its fold's head."""
        out = self.raw(emb, feats, options, folds)
        conf = np.empty(len(folds))
        for k in np.unique(folds):
            rows = folds == k
            conf[rows] = self.calibrators[k](HeadOutput(out.pred[rows], out.score[rows],
                                                        out.stats[rows]))
        return out.pred, np.clip(conf, 0.0, 1.0)


def cross_fit_heads(emb: np.ndarray, feats: np.ndarray, y: np.ndarray, labels: list[str],
                    fold_of: np.ndarray, folds: int, options: EmbeddingClassifierOptions
                    ) -> FoldedHead:
    """Fit one head per fold (``fold_of``: each row's, of ``folds``, some possibly empty)
    on the other folds' rows, all over the same label set.

    The folds' own out-of-fold outputs fit the calibrators, so there is no inner
    cross-fitting (as many logistic fits as ``fit_head``): fold k's calibrator is fitted
    on the other folds' rows alone, never on the rows whose labels calibrate fold k's
    threshold.
    """
    k_classes = len(labels)
    weights, biases, counts = [], [], []
    for k in range(folds):
        train = fold_of != k
        counts.append(np.bincount(y[train], minlength=k_classes).astype(np.float64))
        # Cold starts: a fold started from another fold's solution (fitted on this fold's
        # rows) could keep some of it within the solver's tolerance.
        w, b = fit_logistic(feats[train], y[train], k_classes, options.C, options.max_iter)
        weights.append(w.astype(np.float32))
        biases.append(b.astype(np.float32))
    none = Calibrator("none", [], [], [], [], 0.0)
    by_fold = np.argsort(fold_of, kind="stable")  # the index hides a fold as one slice
    head = FoldedHead(labels=labels, lr_weight=np.stack(weights), lr_bias=np.stack(biases),
                      bank=np.ascontiguousarray(emb[by_fold], dtype=np.float32),
                      bank_labels=y[by_fold].astype(np.int64),
                      bank_folds=fold_of[by_fold].astype(np.int64),
                      label_counts=np.stack(counts), calibrators=[none] * folds)
    out = head.raw(emb, feats, options, fold_of)
    if options.calibration != "none":
        correct = out.pred == y
        head.calibrators = [
            Calibrator.fit(options.calibration,
                           HeadOutput(out.pred[rows], out.score[rows], out.stats[rows]),
                           correct[rows])
            for rows in (fold_of != k for k in range(folds))]
    return head


def calibrator_dict(calibrator: Calibrator) -> dict[str, Any]:
    return {"method": calibrator.method, "features": calibrator.features,
            "mean": calibrator.mean, "std": calibrator.std, "weight": calibrator.weight,
            "bias": calibrator.bias}


def calibrator_from(cal: dict[str, Any]) -> Calibrator:
    return Calibrator(cal["method"], list(cal["features"]), list(cal["mean"]),
                      list(cal["std"]), list(cal["weight"]), float(cal["bias"]))
