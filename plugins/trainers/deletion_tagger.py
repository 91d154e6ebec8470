"""Built-in trainer ``deletion-tagger``: a ``rewrite`` student for rewrites that drop words
from the input (disfluency removal, stripping fillers or boilerplate), on the frozen
bundled MiniLM.

A generative student (``lora-lm``) can write anything but costs about a second per answer
on a CPU and trains slowly. Many narrow rewrite tasks only delete: on Disfl-QA the
teacher's answer is the input with words left out in 76-81% of the rows, and in 94.5% of
those the words left out are one run (a false start and what interrupts it). This
student picks that run:

* **Labels from the teacher's answers.** The answer's words are matched to the input's
  from the end (the later copy of a repeated phrase is kept: a speaker's correction comes
  after what it corrects), comparing case-folded words without trailing punctuation; the
  kept words, joined by spaces, must agree with the answer by the task's own test (with
  a ``similarity`` bound, words the answer changed slightly may be kept). Rows
  where they cannot (the teacher reworded, reordered or added words) or that drop two
  runs are not learnt by the span scorer.
* **The span scorer** gives every run of words i..j (and "delete nothing") a score: a
  linear function of word i's and word j's states (each word's first token in a few
  encoder layers, ``token_layers``), of the words just before and after the run, of
  whether the words after it repeat its start (exact match and cosine: a restart repeats
  how the sentence began), a learnt low-rank similarity between word i and word j+1
  (``rank``) and the run's length; a softmax over all runs, fitted by L-BFGS.
* **Confidence** is the chosen run's probability times that of the answer being one
  deletion at all (a logistic regression on the mean-pooled states), so a request the
  teacher would reword escalates. An input longer than the encoder's window
  (``max_tokens``) is escalated (confidence 0): its tail would go unread.
* **Cross-fitted** (the gateway's default calibration): one model per fold of the
  inputs, each answering the inputs of its fold.

Measured on Disfl-QA (2,000 rows, 5 folds, out of fold): 0.57 agreement, and the best
single threshold serves 0.23 of the rows at 0.97 end-to-end agreement (0.43 at 0.90); a
keep/delete tagger per word agreed on 0.27 and served 0.10. Most of what is left at the
top of the confidence scale is the teacher's own typos and rewordings (docs/performance.md).

Artifact (``out_dir``): ``deletion_tagger.json`` (format, encoder, options, figures) and
``weights.safetensors`` (per fold: feature means and scales of its training rows, the
span scorer's and the derivability classifier's weights).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Prediction, Student, Task
from plugins.rewrite import normalise
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

log = logging.getLogger("distill_gateway.deletion_tagger")

META_FILE = "deletion_tagger.json"
FORMAT_VERSION = 1
_WORD = re.compile(r"\S+")


class DeletionTaggerOptions(FrozenEncoderOptions):
    token_layers: list[int] = Field(
        default_factory=lambda: [6, 3, 1], min_length=1,
        description="encoder layers (1 = first) whose states at each word's first token "
        "describe the word (on Disfl-QA, L2 3e-2: 6, 3, 1 served 0.23 at 0.97, 6, 4, 1 "
        "0.21; 6, 4 at L2 1e-2 0.20)")
    rank: int = Field(default=16, ge=0, description="rank of the learnt similarity between "
                      "the first deleted word and the first word after the deletion (a "
                      "restart repeats how the sentence began; 0: none; 16 served 0.201 at "
                      "0.97 against 0.185 without, layers 6, 4)")
    sentence_layers: list[int] = Field(
        default_factory=lambda: [2, 4, 6], min_length=1,
        description="encoder layers whose mean-pooled states feed the classifier of "
        "whether the teacher's answer is one deletion (the derivability classifier)")
    span_l2: float = Field(default=3e-2, ge=0, description="L2 penalty (on the summed "
                           "squared weights, beside the mean loss) of the span scorer "
                           "(without the similarity 1e-4 / 1e-3 / 1e-2 agreed on 0.44 / "
                           "0.47 / 0.51; with it 1e-2 / 3e-2 on 0.545 / 0.548)")
    derivable_l2: float = Field(default=1e-3, ge=0, description="L2 penalty of the "
                                "derivability classifier")
    max_iter: int = Field(default=60, gt=0, description="L-BFGS iterations per fit")
    seed: int = Field(default=0, description="seed of the similarity's initialisation")
    max_tokens: int = Field(default=128, gt=0, description="the encoder's window: longer "
                            "inputs are escalated")
    batch_size: int = Field(default=32, gt=0, description="texts per encoder pass")


# --- labels --------------------------------------------------------------------------------


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the input's words (runs of non-space characters)."""
    return [m.span() for m in _WORD.finditer(text)]


def join_kept(text: str, spans: list[tuple[int, int]], keep: np.ndarray) -> str:
    """The kept words: neighbours in the input keep the whitespace between them (a line
    break stays one), words brought together by a deletion get one space."""
    parts: list[str] = []
    previous = -2
    for index, ((a, b), k) in enumerate(zip(spans, keep.tolist(), strict=True)):
        if not k:
            continue
        if parts:
            parts.append(text[spans[previous][1]:a] if previous == index - 1 else " ")
        parts.append(text[a:b])
        previous = index
    return "".join(parts)


def keep_tags(text: str, target: str, task: Task) -> np.ndarray | None:
    """1 for each input word the answer keeps, 0 for each it drops; None when no input
    with words dropped agrees with the answer (by the task's own agreement test)."""
    spans = words(text)
    keys = [normalise(text[a:b]) for a, b in spans]
    wanted = [normalise(w) for w in target.split()]
    keep = np.zeros(len(spans), dtype=np.int64)
    i = len(wanted) - 1
    for j in range(len(spans) - 1, -1, -1):  # from the end: the correction is kept
        if i >= 0 and keys[j] == wanted[i]:
            keep[j] = 1
            i -= 1
    if i >= 0:
        # Not a subsequence: under a similarity test the answer may still agree with a
        # deletion that keeps the words it changed (a typo, a word form). Matched from
        # the end, as above (difflib prefers the earliest of equally long matches).
        keep[:] = 0
        n = len(keys)
        matcher = SequenceMatcher(None, keys[::-1], wanted[::-1], autojunk=False)
        for op, a1, a2, b1, b2 in matcher.get_opcodes():
            if op == "equal" or (op == "replace" and a2 - a1 == b2 - b1):
                keep[n - a2:n - a1] = 1
    if not task.agree(join_kept(text, spans, keep), target):
        return None
    return keep


def deleted_span(keep: np.ndarray | None) -> tuple[int, int] | None:
    """The answer's deleted words as one run (first, last), 1-based; (0, 0) when nothing is
    deleted; None when the answer is not derivable or deletes two or more runs (5% of the
    derivable Disfl-QA rows: the student does not learn those)."""
    if keep is None:
        return None
    dropped = np.flatnonzero(keep == 0)
    if len(dropped) == 0:
        return 0, 0
    if dropped[-1] - dropped[0] + 1 != len(dropped):
        return None
    return int(dropped[0]) + 1, int(dropped[-1]) + 1


# --- features ------------------------------------------------------------------------------


@dataclass
class Encoded:
    sentences: np.ndarray  # n x (h * sentence layers)
    words: list[np.ndarray]  # per text: words x (h * token layers), each word's first token
    keys: list[list[str]]  # per text: the words as compared with the answer's
    hidden: int  # the encoder's width: the first ``hidden`` word columns are one layer
    spans: list[list[tuple[int, int]]]  # per text: the words' character spans
    complete: np.ndarray  # per text: every word has a token inside the encoder's window


def encode(encoder: Encoder, texts: list[str], opts: DeletionTaggerOptions,
           block: int = 512) -> Encoded:
    """Each text's sentence features and word states. Blocks of ``block`` texts: every
    token's states in five layers are 3x the words' kept here, so encoding 10,000
    questions at once peaked at 3.7 GB."""
    layers = list(dict.fromkeys([*opts.sentence_layers, *opts.token_layers]))
    sent_at = [layers.index(x) for x in opts.sentence_layers]
    tok_at = [layers.index(x) for x in opts.token_layers]
    sentences, features, all_keys, all_spans, complete = [], [], [], [], []
    for start in range(0, len(texts), block):
        part = texts[start:start + block]
        states = encoder.token_states(part, layers, opts.max_tokens, opts.batch_size)
        for text, (s, offsets) in zip(part, states, strict=True):
            sentences.append(s[:, sent_at].mean(axis=0).reshape(-1))
            spans = words(text)
            own = s[:, tok_at].reshape(len(s), -1)
            starts = offsets[:, 0]
            real = offsets[:, 1] > offsets[:, 0]
            first: list[int] = []
            for a, b in spans:
                inside = np.flatnonzero(real & (starts >= a) & (starts < b))
                first.append(int(inside[0]) if len(inside) else -1)
            complete.append(all(f >= 0 for f in first))
            # a copy, so the block's token states are freed
            features.append(own[[max(f, 0) for f in first]] if spans else own[:0].copy())
            all_keys.append([normalise(text[a:b]) for a, b in spans])
            all_spans.append(spans)
    return Encoded(np.stack(sentences).astype(np.float32), features, all_keys,
                   encoder.hidden_size, all_spans, np.array(complete, dtype=bool))


@dataclass
class Chunk:
    """Texts of similar length padded together: position 0 stands before the first word,
    1..m are the words, the rest padding (zero vectors after standardising)."""

    rows: list[int]
    states: Any  # torch B x P x D, standardised
    pairs: Any  # torch B x P x P x 3: features of deleting words i..j (see pair_features)
    n_words: Any  # torch B


def pair_features(words_: np.ndarray, keys: list[str], size: int, hidden: int) -> np.ndarray:
    """For deleting words i..j: whether word i equals word j+1 (a restart repeats the
    start), whether word i+1 equals word j+2, and the cosine of words i and j+1 in the
    first of ``token_layers`` (the top layer by default; its ``hidden`` columns)."""
    m = len(keys)
    out = np.zeros((size, size, 3), dtype=np.float32)
    if m == 0:
        return out
    top = words_[:, :hidden]
    top = top / (np.linalg.norm(top, axis=1, keepdims=True) + 1e-6)
    cos = top @ top.T
    key = np.array(keys, dtype=object)
    same = key[:, None] == key[None, :]
    for i in range(1, m + 1):
        js = np.arange(i, m)  # deletions i..j that leave a word j+1 after them
        out[i, js, 0] = same[i - 1, js]
        out[i, js, 2] = cos[i - 1, js]
        if i < m:  # and a word j+2, with word i+1 inside the deletion
            js2 = np.arange(i + 1, m - 1)
            out[i, js2, 1] = same[i, js2 + 1]
    return out


def chunks(enc: Encoded, rows: list[int], mean: np.ndarray, scale: np.ndarray,
           size: int = 256) -> list[Chunk]:
    import torch

    order = sorted(rows, key=lambda r: len(enc.keys[r]))
    out = []
    for start in range(0, len(order), size):
        part = order[start:start + size]
        width = max(len(enc.keys[r]) for r in part) + 2
        states = np.zeros((len(part), width, len(mean)), dtype=np.float32)
        pairs = np.zeros((len(part), width, width, 3), dtype=np.float32)
        for b, r in enumerate(part):
            m = len(enc.keys[r])
            states[b, 1:m + 1] = (enc.words[r] - mean) / scale
            pairs[b] = pair_features(enc.words[r], enc.keys[r], width, enc.hidden)
        out.append(Chunk(part, torch.from_numpy(states), torch.from_numpy(pairs),
                         torch.tensor([len(enc.keys[r]) for r in part])))
    return out


# --- the span scorer -----------------------------------------------------------------------


SPAN_WEIGHTS = ("start_w", "end_w", "after_w", "before_w", "pair_w", "none_b", "length_w",
                "query_w", "key_w")


def span_logits(w: dict[str, Any], chunk: Chunk) -> Any:
    """Scores of every deletion (i, j), flattened to B x P*P; index 0 is "delete nothing"
    and positions that are not a deletion of words i..j score -inf."""
    import torch

    h = chunk.states
    size = h.shape[1]
    s = ((h @ w["start_w"])[:, :, None] + (h @ w["end_w"])[:, None, :]
         + torch.roll(h @ w["after_w"], -1, 1)[:, None, :]  # the word after the deletion
         + torch.roll(h @ w["before_w"], 1, 1)[:, :, None]  # the word before it
         + chunk.pairs @ w["pair_w"])
    i = torch.arange(size)[:, None]
    j = torch.arange(size)[None, :]
    s = s + w["length_w"] * torch.log1p((j - i).clamp(min=0).float())
    if w["query_w"].shape[1]:
        s = s + torch.einsum("bir,bjr->bij", h @ w["query_w"],
                             torch.roll(h @ w["key_w"], -1, 1))
    valid = (i >= 1) & (j >= i) & (j <= chunk.n_words[:, None, None])
    s = torch.where(valid, s, torch.tensor(float("-inf")))
    s[:, 0, 0] = w["none_b"]
    return s.reshape(len(h), -1)


@dataclass
class FoldModel:
    """One model (one per fold when cross-fitted): feature means and scales of its
    training rows, the span scorer's weights, the derivability classifier."""

    word_mean: np.ndarray
    word_scale: np.ndarray
    sent_mean: np.ndarray
    sent_scale: np.ndarray
    derivable_w: np.ndarray
    derivable_b: np.ndarray
    span: dict[str, np.ndarray]

    ARRAYS = ("word_mean", "word_scale", "sent_mean", "sent_scale", "derivable_w",
              "derivable_b")


def fit_model(enc: Encoded, gold: list[tuple[int, int] | None], rows: np.ndarray,
              opts: DeletionTaggerOptions) -> FoldModel:
    import torch

    learnable = np.array([gold[r] is not None for r in rows], dtype=np.float32)
    sentences = enc.sentences[rows]
    sent_mean, sent_scale = sentences.mean(0), sentences.std(0) + 1e-6
    dw, db = fit_linear((sentences - sent_mean) / sent_scale, learnable[:, None], opts.derivable_l2,
                  opts.max_iter, True, 1)
    # (an input past the encoder's window has words without states: not learnt)
    spanned = [int(r) for r in rows if gold[r] is not None and enc.keys[r] and enc.complete[r]]
    width = enc.words[0].shape[1]
    x = (np.concatenate([enc.words[r] for r in spanned]) if spanned
         else np.zeros((1, width), np.float32))
    mean, scale = x.mean(0), x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(opts.seed)
    w = {name: torch.zeros(width) for name in ("start_w", "end_w", "after_w", "before_w")}
    w |= {"pair_w": torch.zeros(3), "none_b": torch.zeros(()), "length_w": torch.zeros(())}
    # The similarity is bilinear: zero would be a saddle point, so it starts small.
    w |= {name: torch.randn(width, opts.rank, generator=generator) * 0.01
          for name in ("query_w", "key_w")}
    if spanned:
        parts = chunks(enc, spanned, mean, scale)
        targets = []
        for part in parts:
            size = part.states.shape[1]
            targets.append(torch.tensor([a * size + b for a, b in
                                         (gold[r] or (0, 0) for r in part.rows)]))
        params = [t.requires_grad_() for t in w.values()]
        optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=opts.max_iter, history_size=20,
                                      tolerance_grad=1e-6, tolerance_change=1e-9,
                                      line_search_fn="strong_wolfe")
        penalised = [w[name] for name in ("start_w", "end_w", "after_w", "before_w",
                                           "query_w", "key_w")]

        def closure() -> Any:
            optimiser.zero_grad()
            loss = torch.stack([
                torch.nn.functional.cross_entropy(span_logits(w, part), target, reduction="sum")
                for part, target in zip(parts, targets, strict=True)]).sum() / len(spanned)
            loss = loss + opts.span_l2 * torch.stack([(p * p).sum() for p in penalised]).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
    return FoldModel(mean, scale, sent_mean, sent_scale, dw, db,
                     {name: t.detach().numpy() for name, t in w.items()})


def predict_rows(model: FoldModel, enc: Encoded, texts: list[str], rows: list[int]
                 ) -> list[Prediction]:
    import torch

    if not rows:
        return []
    x = (enc.sentences[rows] - model.sent_mean) / model.sent_scale
    p_learnable = dict(zip(rows, sigmoid(x @ model.derivable_w + model.derivable_b)[:, 0],
                           strict=True))
    w = {name: torch.from_numpy(np.asarray(v)) for name, v in model.span.items()}
    out: dict[int, Prediction] = {}
    worded = [r for r in rows if enc.keys[r]]
    for part in chunks(enc, worded, model.word_mean, model.word_scale):
        with torch.no_grad():
            probs = torch.softmax(span_logits(w, part), dim=1)
        best = probs.max(dim=1)
        size = part.states.shape[1]
        for r, index, p in zip(part.rows, best.indices.tolist(), best.values.tolist(),
                               strict=True):
            first, last = divmod(index, size)
            keep = np.ones(len(enc.keys[r]), dtype=bool)
            if first:
                keep[first - 1:last] = False
            answer = join_kept(texts[r], enc.spans[r], keep)
            confidence = float(p * p_learnable[r])
            if not answer or not enc.complete[r]:
                confidence = 0.0  # nothing kept, or words past the encoder's window
            out[r] = Prediction(target=answer or texts[r], confidence=confidence)
    for r in rows:
        if r not in out:  # no words at all
            out[r] = Prediction(target=texts[r], confidence=0.0)
    return [out[r] for r in rows]


# --- trainer and student -------------------------------------------------------------------


class DeletionTaggerStudent(Student):
    def __init__(self, encoder: Encoder, models: list[FoldModel],
                 opts: DeletionTaggerOptions) -> None:
        self.encoder = encoder
        self.models = models  # one, or one per fold of the inputs (cross-fitted)
        self.options = opts

    def predict(self, inputs: list[str]) -> list[Prediction]:
        if not inputs:
            return []
        enc = encode(self.encoder, inputs, self.options)
        return predict_by_fold(inputs, self.models,
                               lambda model, rows: predict_rows(model, enc, inputs, rows))


class DeletionTaggerTrainer(FoldedTrainer):
    """Picks the input's words to delete, on frozen MiniLM states."""

    Options = DeletionTaggerOptions
    options: DeletionTaggerOptions

    def fit(self, examples: list[Example], task: Task, out_dir: Path, folds: int
            ) -> tuple[dict[str, Any], list[Prediction]]:
        if not all(isinstance(e.target, str) for e in examples):
            raise ValueError("deletion-tagger needs answers that are text (a rewrite task)")
        started = time.perf_counter()
        opts = self.options
        texts = [e.input for e in examples]
        tags = [keep_tags(e.input, e.target, task) for e in examples]
        gold = [deleted_span(t) for t in tags]
        encoder = get_encoder(opts.encoder, opts.quantize)
        enc = encode(encoder, texts, opts)
        encoded = time.perf_counter()
        models, predictions = fit_folds(
            assign_folds(texts, folds), folds, lambda rows: fit_model(enc, gold, rows, opts),
            lambda model, rows: predict_rows(model, enc, texts, rows))
        agree = [task.agree(p.target, e.target) for p, e in zip(predictions, examples,
                                                                strict=True)]
        figures: dict[str, Any] = {
            "examples": len(examples),
            "derivable_share": round(float(np.mean([t is not None for t in tags])), 4),
            "one_span_share": round(float(np.mean([g is not None for g in gold])), 4),
            ("cv_agreement" if folds > 1 else "train_agreement"): round(float(np.mean(agree)), 4),
            "encode_seconds": round(encoded - started, 2),
            "fit_seconds": round(time.perf_counter() - encoded, 2),
        }
        if folds > 1:
            figures["folds"] = folds
        tensors = {name: np.stack([getattr(m, name) for m in models])
                   for name in FoldModel.ARRAYS}
        tensors |= {name: np.stack([m.span[name] for m in models]) for name in SPAN_WEIGHTS}
        figures["train_seconds"] = round(time.perf_counter() - started, 2)
        write_artifact(out_dir, "deletion-tagger", FORMAT_VERSION, META_FILE, encoder, opts,
                       folds, tensors, figures=figures)
        log.info("deletion-tagger: %d examples (%.0f%% derivable), %d fold(s), %.1fs",
                 len(examples), 100 * figures["derivable_share"], folds,
                 figures["train_seconds"])
        return figures, predictions

    def load(self, artifact_dir: Path, task: Task) -> DeletionTaggerStudent:
        meta, opts, t, encoder = read_artifact(artifact_dir, "deletion-tagger", FORMAT_VERSION,
                                               META_FILE, DeletionTaggerOptions)
        models = [FoldModel(**{name: t[name][k] for name in FoldModel.ARRAYS},
                            span={name: t[name][k] for name in SPAN_WEIGHTS})
                  for k in range(int(meta["folds"]))]
        student = DeletionTaggerStudent(encoder, models, opts)
        student.predict(["warm-up"])  # the encoder's first pass traces its graph
        return student


@hookimpl
def register_trainers(register: Any) -> None:
    register("deletion-tagger", DeletionTaggerTrainer)
