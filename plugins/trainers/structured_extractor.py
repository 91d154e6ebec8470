"""Built-in trainer ``structured-extractor``: an ``extract`` student that predicts each part
of the answer object on its own, on the frozen bundled MiniLM.

The embedding classifier answers an extract task with one class per distinct answer, so it
can only repeat an answer it has seen whole; on NLU++ most answers are one-offs (1,287
distinct answers in 2,071 rows). This student takes the answer apart instead:

* **The layout is learnt from the teacher's answers.** Every key path of the answer
  objects becomes a field: a list of strings is a *label set* (one yes/no classifier per
  label, e.g. NLU++ intents), a string that occurs in the input in at least
  ``span_share`` of its answers is a *span* (copied from the input, e.g. slot values), any
  other value is a *choice* among the values seen, with "absent" as a choice when the key
  is sometimes missing. Nested objects are walked into.
* **Label sets and choices** are logistic regressions on the concatenated mean-pooled
  states of a few encoder layers (``sentence_layers``), each label's averaged with a
  small network's (``labels_mlp_hidden``); **spans** are tagged token by token
  (begin / inside / outside per span field) by one softmax regression on each token's
  states and its neighbours' (``token_layers``), and cut from the input at the tagged
  tokens' character offsets, so a span is the input's own text.
* **Confidence** is the probability that every part is right at once: the product of
  each label's yes/no probability, each choice's probability and each token's tag
  probability. The gateway thresholds it with its calibration bound; an answer that does
  not validate against the task's schema is escalated.
* **Cross-fitted** (the gateway's default calibration): one model per fold of the inputs,
  each on the other folds' rows; an input is answered by its own fold's model.

Measured on NLU++ banking (2,071 rows, 5 folds, out of fold, the answer's canonical JSON
equal to the teacher's): 0.58 agreement, and the best single threshold serves 0.35 of the
rows at 0.97 end-to-end agreement (0.55 and 0.31 with the label regressions alone); the
embedding classifier, one class per answer, agrees on 0.26 and serves 0.14.

Artifact (``out_dir``): ``structured_extractor.json`` (format, encoder, options, the
field layout, figures) and ``weights.safetensors`` (per fold: the feature means and scales
of its training rows, the label regressions and network, the choice and tagger weights).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Prediction, Student, Task
from plugins.trainers.heads import softmax
from plugins.trainers.minilm_encoder import Encoder, get_encoder
from plugins.trainers.token_students import (
    FoldedTrainer,
    FrozenEncoderOptions,
    assign_folds,
    fit_folds,
    fit_linear,
    predict_by_fold,
    read_artifact,
    sigmoid,
    write_artifact,
)

log = logging.getLogger("distill_gateway.structured_extractor")

META_FILE = "structured_extractor.json"
FORMAT_VERSION = 1
ABSENT = "\x00absent"  # a choice meaning "the key is left out" (no JSON rendering equals it)
FieldKind = Literal["labels", "span", "choice"]


class StructuredExtractorOptions(FrozenEncoderOptions):
    sentence_layers: list[int] = Field(
        default_factory=lambda: [2, 4, 6], min_length=1,
        description="encoder layers (1 = first) whose mean-pooled states, concatenated, "
        "feed the label and choice classifiers (on NLU++, label regressions alone: 2, 4, "
        "6 served 0.31 at 0.97, 4, 5, 6 0.29, the last layer alone 0.21)")
    token_layers: list[int] = Field(
        default_factory=lambda: [6, 4], min_length=1,
        description="encoder layers whose states at a token (and at its two neighbours) "
        "feed the span tagger")
    labels_l2: float = Field(default=3e-5, ge=0, description="L2 penalty (on the summed "
                             "squared weights, beside the mean loss) of the label and "
                             "choice classifiers")
    tagger_l2: float = Field(default=1e-4, ge=0, description="L2 penalty of the span tagger")
    labels_mlp_hidden: int = Field(
        default=512, ge=0, description="units of a one-hidden-layer network averaged with "
        "the label sets' logistic regressions (0: the regressions alone; on NLU++ their "
        "average served 0.34-0.35 at 0.97, the regressions alone 0.31, a network alone "
        "0.29-0.32 for 256-1,024 units)")
    labels_mlp_epochs: int = Field(default=40, gt=0, description="passes over the rows, "
                                   "in batches of 64 (AdamW, learning rate 1e-3)")
    labels_mlp_dropout: float = Field(default=0.2, ge=0, lt=1, description="dropout on the "
                                      "network's input and hidden layer")
    seed: int = Field(default=0, description="seed of the network's initialisation, "
                      "batches and dropout")
    max_iter: int = Field(default=30, gt=0, description="L-BFGS iterations per fit (stopping "
                          "early regularises: on NLU++ 30 served 0.31 at 0.97, 60 0.31, 200 "
                          "0.30, in a quarter of 200's time)")
    span_share: float = Field(default=0.9, gt=0, le=1, description="a string field is "
                              "tagged as a span of the input when at least this share of "
                              "its values occur in the input; otherwise it is a choice")
    max_tokens: int = Field(default=128, gt=0, description="inputs are cut to this many "
                            "tokens (their start is kept)")
    batch_size: int = Field(default=32, gt=0, description="texts per encoder pass")


# --- the answer layout ---------------------------------------------------------------------


@dataclass
class AnswerField:
    """One key path of the answer object and how it is predicted."""

    path: list[str]
    kind: FieldKind
    # labels, in the order the teacher lists them (answers compare lists in order), or
    # rendered choices
    values: list[str] = field(default_factory=list)
    always: bool = True  # present in every answer: emitted even when empty


@dataclass
class Layout:
    fields: list[AnswerField]
    objects: list[list[str]]  # object paths present in every answer (emitted even if empty)

    @property
    def label_columns(self) -> list[tuple[int, str]]:
        return [(i, v) for i, f in enumerate(self.fields) if f.kind == "labels"
                for v in f.values]

    @property
    def spans(self) -> list[int]:
        return [i for i, f in enumerate(self.fields) if f.kind == "span"]

    @property
    def choices(self) -> list[int]:
        return [i for i, f in enumerate(self.fields) if f.kind == "choice"]


def _render(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _get(obj: Any, path: list[str]) -> tuple[bool, Any]:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


def learn_layout(texts: list[str], targets: list[Any], span_share: float) -> Layout:
    """The fields of the answers: every key path, by what its values are."""
    if not targets or not all(isinstance(t, dict) for t in targets):
        raise ValueError("structured-extractor needs answers that are JSON objects")
    fields: list[AnswerField] = []
    objects: list[list[str]] = []

    def walk(path: list[str], values: list[tuple[str, Any]]) -> None:
        always = len(values) == len(targets)
        if all(isinstance(v, dict) for _, v in values):
            if path and always:
                objects.append(path)
            keys = sorted({k for _, v in values for k in v})
            for key in keys:
                walk([*path, key], [(t, v[key]) for t, v in values if key in v])
        elif all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                 for _, v in values):
            # Sorted when the teacher sorts them; otherwise by each label's mean relative
            # place in the lists it appears in (a teacher that lists "send" before "money"
            # is answered that way).
            places: dict[str, list[float]] = {}
            for _, v in values:
                for j, x in enumerate(v):
                    places.setdefault(x, []).append(j / len(v))
            labels = sorted(places)
            if any(v != sorted(v) for _, v in values):
                labels.sort(key=lambda x: (float(np.mean(places[x])), x))
            fields.append(AnswerField(path, "labels", labels, always))
        elif (all(isinstance(v, str) for _, v in values)
              and sum(v.strip() != "" and v in t for t, v in values) >= span_share * len(values)):
            fields.append(AnswerField(path, "span", [], always))
        else:
            choices = sorted({_render(v) for _, v in values})
            fields.append(AnswerField(path, "choice", choices + ([] if always else [ABSENT]),
                                      always))

    walk([], list(zip(texts, targets, strict=True)))
    return Layout(fields, objects)


def assemble(layout: Layout, labels: dict[int, list[str]], choices: dict[int, str],
             spans: dict[int, str]) -> dict[str, Any]:
    """The answer object from each field's prediction (absent fields left out)."""
    answer: dict[str, Any] = {}

    def put(path: list[str], value: Any) -> None:
        node = answer
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for path in layout.objects:  # parents come before their children
        node = answer
        for key in path:
            node = node.setdefault(key, {})
    for i, f in enumerate(layout.fields):
        if f.kind == "labels":
            chosen = labels.get(i, [])
            if chosen or f.always:
                put(f.path, chosen)
        elif f.kind == "span":
            if i in spans:
                put(f.path, spans[i])
        elif choices.get(i, ABSENT) != ABSENT:
            put(f.path, json.loads(choices[i]))
    return answer


# --- features and fitting ------------------------------------------------------------------


@dataclass
class Encoded:
    sentences: np.ndarray  # n x (h * sentence layers)
    tokens: list[np.ndarray]  # per text: tokens x (3 * h * token layers), with neighbours
    offsets: list[np.ndarray]  # per text: tokens x 2 character spans


def encode(encoder: Encoder, texts: list[str], opts: StructuredExtractorOptions,
           block: int = 512) -> Encoded:
    """Sentence features and per-token features of each text, in blocks of ``block``
    texts: only one block's raw states (every token, every layer read) are held at once."""
    layers = list(dict.fromkeys([*opts.sentence_layers, *opts.token_layers]))
    sent_at = [layers.index(x) for x in opts.sentence_layers]
    tok_at = [layers.index(x) for x in opts.token_layers]
    sentences, tokens, offsets = [], [], []
    for start in range(0, len(texts), block):
        states = encoder.token_states(texts[start:start + block], layers, opts.max_tokens,
                                      opts.batch_size)
        for s, o in states:
            sentences.append(s[:, sent_at].mean(axis=0).reshape(-1))
            own = s[:, tok_at].reshape(len(s), -1)
            pad = np.zeros_like(own[:1])
            tokens.append(np.concatenate([own, np.concatenate([pad, own[:-1]]),
                                          np.concatenate([own[1:], pad])], axis=1))
            offsets.append(o)
    return Encoded(np.stack(sentences).astype(np.float32), tokens, offsets)


def token_tags(layout: Layout, text: str, target: dict[str, Any], offsets: np.ndarray
               ) -> np.ndarray:
    """Begin/inside tags of each span field's value (first occurrence) at the tokens it
    covers: 0 outside, 1 + 2s begin and 2 + 2s inside span field s."""
    tags = np.zeros(len(offsets), dtype=np.int64)
    for s, i in enumerate(layout.spans):
        found, value = _get(target, layout.fields[i].path)
        if not found or not isinstance(value, str) or not value.strip():
            continue
        start = text.find(value)
        if start < 0:
            continue
        end = start + len(value)
        first = True
        for j, (a, b) in enumerate(offsets.tolist()):
            if b > a and start <= a < end:
                tags[j] = 1 + 2 * s + (0 if first else 1)
                first = False
    return tags


@dataclass
class Scales:
    """Feature means and scales, from the rows a model trains on only: centring on every
    row would shift a fold's held-out rows against the mean of the rest (their centred
    features sum to minus the others'), and on 102 rows that made the out-of-fold answers
    far less confident than the same model's answers to new inputs."""

    sent_mean: np.ndarray
    sent_scale: np.ndarray
    tok_mean: np.ndarray
    tok_scale: np.ndarray

    @classmethod
    def of(cls, enc: Encoded, rows: np.ndarray) -> Scales:
        tokens = np.concatenate([enc.tokens[r] for r in rows])
        sentences = enc.sentences[rows]
        return cls(sentences.mean(0), sentences.std(0) + 1e-6,
                   tokens.mean(0), tokens.std(0) + 1e-6)


@dataclass
class FoldModel:
    """The weights of one model (one per fold when cross-fitted)."""

    scales: Scales
    labels_w: np.ndarray
    labels_b: np.ndarray
    choice_w: list[np.ndarray]
    choice_b: list[np.ndarray]
    tagger_w: np.ndarray
    tagger_b: np.ndarray
    mlp: list[np.ndarray] = field(default_factory=list)  # w1, b1, w2, b2; empty: none

    def label_probs(self, x: np.ndarray) -> np.ndarray:
        probs = sigmoid(x @ self.labels_w + self.labels_b)
        if self.mlp:
            from scipy.special import erf

            w1, b1, w2, b2 = self.mlp
            h = x @ w1 + b1
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # GELU, as torch computes it
            probs = (probs + sigmoid(h @ w2 + b2)) / 2
        return probs


def _fit_mlp(x: np.ndarray, y: np.ndarray, opts: StructuredExtractorOptions
             ) -> list[np.ndarray]:
    """A one-hidden-layer multi-label network (dropout, GELU), trained by AdamW."""
    import torch

    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(opts.seed)
        first = torch.nn.Linear(x.shape[1], opts.labels_mlp_hidden)
        second = torch.nn.Linear(opts.labels_mlp_hidden, y.shape[1])
        net = torch.nn.Sequential(torch.nn.Dropout(opts.labels_mlp_dropout), first,
                                  torch.nn.GELU(), torch.nn.Dropout(opts.labels_mlp_dropout),
                                  second)
        optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        yt = torch.from_numpy(y.astype(np.float32))
        for _ in range(opts.labels_mlp_epochs):
            order = torch.randperm(len(xt))
            for start in range(0, len(xt), 64):
                batch = order[start:start + 64]
                optimiser.zero_grad()
                torch.nn.functional.binary_cross_entropy_with_logits(
                    net(xt[batch]), yt[batch]).backward()
                optimiser.step()
    return [first.weight.detach().numpy().T.copy(), first.bias.detach().numpy().copy(),
            second.weight.detach().numpy().T.copy(), second.bias.detach().numpy().copy()]


def fit_model(layout: Layout, enc: Encoded, targets: list[dict[str, Any]],
              texts: list[str], rows: np.ndarray, opts: StructuredExtractorOptions
              ) -> FoldModel:
    """Every field's classifier and the tagger on ``rows``."""
    scales = Scales.of(enc, rows)
    x = (enc.sentences[rows] - scales.sent_mean) / scales.sent_scale
    columns = layout.label_columns
    y = np.zeros((len(rows), len(columns)), dtype=np.float32)
    for r, row in enumerate(rows.tolist()):
        for c, (i, label) in enumerate(columns):
            found, value = _get(targets[row], layout.fields[i].path)
            y[r, c] = float(found and isinstance(value, list) and label in value)
    labels_w, labels_b = (fit_linear(x, y, opts.labels_l2, opts.max_iter, True, len(columns))
                          if columns else (np.zeros((x.shape[1], 0), np.float32),
                                           np.zeros(0, np.float32)))
    choice_w, choice_b = [], []
    for i in layout.choices:
        f = layout.fields[i]
        index = {v: k for k, v in enumerate(f.values)}
        yc = []
        for row in rows.tolist():
            found, value = _get(targets[row], f.path)
            yc.append(index.get(_render(value) if found else ABSENT, 0))
        w, b = fit_linear(x, np.array(yc), opts.labels_l2, opts.max_iter, False, len(f.values))
        choice_w.append(w)
        choice_b.append(b)
    tags = 1 + 2 * len(layout.spans)
    if layout.spans:
        xt = (np.concatenate([enc.tokens[r] for r in rows]) - scales.tok_mean) / scales.tok_scale
        yt = np.concatenate([token_tags(layout, texts[r], targets[r], enc.offsets[r])
                             for r in rows])
        tagger_w, tagger_b = fit_linear(xt, yt, opts.tagger_l2, opts.max_iter, False, tags)
    else:
        tagger_w = np.zeros((enc.tokens[0].shape[1], 1), np.float32)
        tagger_b = np.zeros(1, np.float32)
    mlp = _fit_mlp(x, y, opts) if columns and opts.labels_mlp_hidden > 0 else []
    return FoldModel(scales, labels_w, labels_b, choice_w, choice_b, tagger_w, tagger_b, mlp)


def predict_rows(layout: Layout, model: FoldModel, enc: Encoded, texts: list[str],
                 rows: list[int]) -> list[Prediction]:
    """Answers and joint confidences of ``rows`` by one model."""
    if not rows:
        return []
    scales = model.scales
    x = (enc.sentences[rows] - scales.sent_mean) / scales.sent_scale
    p_labels = model.label_probs(x)
    p_choices = [softmax(x @ w + b) for w, b in zip(model.choice_w, model.choice_b,
                                                     strict=True)]
    columns = layout.label_columns
    out = []
    for r, row in enumerate(rows):
        p = p_labels[r]
        confidence = float(np.prod(np.where(p > 0.5, p, 1.0 - p)))
        labels: dict[int, list[str]] = {}
        for c, (i, label) in enumerate(columns):  # each field's labels in its order
            if p[c] > 0.5:
                labels.setdefault(i, []).append(label)
        choices: dict[int, str] = {}
        for k, i in enumerate(layout.choices):
            best = int(p_choices[k][r].argmax())
            confidence *= float(p_choices[k][r, best])
            choices[i] = layout.fields[i].values[best]
        spans: dict[int, str] = {}
        if layout.spans:
            xt = (enc.tokens[row] - scales.tok_mean) / scales.tok_scale
            probs = softmax(xt @ model.tagger_w + model.tagger_b)
            tags = probs.argmax(-1)
            real = [j for j, (a, b) in enumerate(enc.offsets[row].tolist()) if b > a]
            confidence *= float(np.prod(probs[real, tags[real]]))
            spans = _cut_spans(layout, texts[row], tags, enc.offsets[row], real)
        answer = assemble(layout, labels, choices, spans)
        out.append(Prediction(target=answer, confidence=confidence))
    return out


def _cut_spans(layout: Layout, text: str, tags: np.ndarray, offsets: np.ndarray,
               real: list[int]) -> dict[int, str]:
    """The first tagged span of each span field, as the input's characters."""
    found: dict[int, list[int]] = {}
    extending = None  # the span field whose first span is being cut
    for j in real:
        tag = int(tags[j])
        if tag == 0:
            extending = None
            continue
        s = (tag - 1) // 2
        a, b = int(offsets[j][0]), int(offsets[j][1])
        if tag % 2 == 0 and extending == s:  # inside: the open span goes on
            found[s][1] = b
        elif s in found:  # a later span of a field: only the first one is kept
            extending = None
        else:  # a begin tag (or an inside tag with no span open): a new span
            found[s] = [a, b]
            extending = s
    return {layout.spans[s]: text[a:b] for s, (a, b) in found.items()}


# --- trainer and student -------------------------------------------------------------------


class StructuredExtractorStudent(Student):
    def __init__(self, encoder: Encoder, layout: Layout, models: list[FoldModel],
                 opts: StructuredExtractorOptions) -> None:
        self.encoder = encoder
        self.layout = layout
        self.models = models  # one, or one per fold of the inputs (cross-fitted)
        self.options = opts

    def predict(self, inputs: list[str]) -> list[Prediction]:
        if not inputs:
            return []
        enc = encode(self.encoder, inputs, self.options)
        return predict_by_fold(inputs, self.models, lambda model, rows: predict_rows(
            self.layout, model, enc, inputs, rows))


class StructuredExtractorTrainer(FoldedTrainer):
    """Per-field classifiers and a span tagger on frozen MiniLM states."""

    Options = StructuredExtractorOptions
    options: StructuredExtractorOptions

    def fit(self, examples: list[Example], task: Task, out_dir: Path, folds: int
            ) -> tuple[dict[str, Any], list[Prediction]]:
        started = time.perf_counter()
        opts = self.options
        texts = [e.input for e in examples]
        targets = [e.target for e in examples]
        layout = learn_layout(texts, targets, opts.span_share)
        encoder = get_encoder(opts.encoder, opts.quantize)
        enc = encode(encoder, texts, opts)
        encoded = time.perf_counter()
        models, predictions = fit_folds(
            assign_folds(texts, folds), folds,
            lambda rows: fit_model(layout, enc, targets, texts, rows, opts),
            lambda model, rows: predict_rows(layout, model, enc, texts, rows))
        agree = [p.target == t for p, t in zip(predictions, targets, strict=True)]
        figures: dict[str, Any] = {
            "examples": len(examples),
            "fields": {".".join(f.path): f.kind for f in layout.fields},
            # in-sample for one model, out of fold when cross-fitted
            ("cv_agreement" if folds > 1 else "train_agreement"): round(float(np.mean(agree)), 4),
            "encode_seconds": round(encoded - started, 2),
            "fit_seconds": round(time.perf_counter() - encoded, 2),
        }
        if folds > 1:
            figures["folds"] = folds
        tensors = {name: np.stack([getattr(m.scales, name) for m in models])
                   for name in ("sent_mean", "sent_scale", "tok_mean", "tok_scale")}
        tensors |= {"labels_w": np.stack([m.labels_w for m in models]),
                   "labels_b": np.stack([m.labels_b for m in models]),
                   "tagger_w": np.stack([m.tagger_w for m in models]),
                   "tagger_b": np.stack([m.tagger_b for m in models])}
        if models[0].mlp:
            for j, name in enumerate(("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2")):
                tensors[name] = np.stack([m.mlp[j] for m in models])
        for c in range(len(layout.choices)):
            tensors[f"choice{c}_w"] = np.stack([m.choice_w[c] for m in models])
            tensors[f"choice{c}_b"] = np.stack([m.choice_b[c] for m in models])
        figures["train_seconds"] = round(time.perf_counter() - started, 2)
        write_artifact(out_dir, "structured-extractor", FORMAT_VERSION, META_FILE, encoder,
                       opts, folds, tensors,
                       layout={"fields": [asdict(f) for f in layout.fields],
                               "objects": layout.objects},
                       figures=figures)
        log.info("structured-extractor: %d examples, %d fields, %d fold(s), %.1fs",
                 len(examples), len(layout.fields), folds, figures["train_seconds"])
        return figures, predictions

    def load(self, artifact_dir: Path, task: Task) -> StructuredExtractorStudent:
        meta, opts, t, encoder = read_artifact(artifact_dir, "structured-extractor",
                                               FORMAT_VERSION, META_FILE,
                                               StructuredExtractorOptions)
        layout = Layout([AnswerField(**f) for f in meta["layout"]["fields"]],
                        meta["layout"]["objects"])
        models = [FoldModel(Scales(t["sent_mean"][k], t["sent_scale"][k], t["tok_mean"][k],
                                   t["tok_scale"][k]),
                            t["labels_w"][k], t["labels_b"][k],
                            [t[f"choice{c}_w"][k] for c in range(len(layout.choices))],
                            [t[f"choice{c}_b"][k] for c in range(len(layout.choices))],
                            t["tagger_w"][k], t["tagger_b"][k],
                            [t[name][k] for name in ("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2")
                             if name in t])
                  for k in range(int(meta["folds"]))]
        student = StructuredExtractorStudent(encoder, layout, models, opts)
        student.predict(["warm-up"])  # the encoder's first pass traces its graph
        return student


@hookimpl
def register_trainers(register: Any) -> None:
    register("structured-extractor", StructuredExtractorTrainer)
