"""Which classify student serves the largest share at 0.97 end-to-end agreement?

Rerunnable: ``.venv/bin/python benchmarks/student_classify.py [--finetune] [--out FILE]``
(set HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false).
Results: benchmarks/results/student_classify.md.

Streams (../shared/data/banking77):
  real  test_llm_labels.jsonl + extra_llm_labels.jsonl (4,081 rows, teacher = a real GPT
        model's recorded answer), shuffled with seed 0
  gold  train.csv (10,003 rows, teacher = the gold category), shuffled with seed 0 (the file
        is sorted by category)

Protocol: train on the first N rows, predict the rest. The rest is split in two halves
(even and odd positions); the confidence threshold is picked on one half (the largest share
whose end-to-end agreement there is >= target) and applied to the other, both ways round,
and the two results averaged: ``cov`` and ``e2e`` (the agreement it delivered). ``oracle``
is the best threshold picked on all the rest itself (an upper bound), ``conf-only`` picks
the threshold from the student's confidences alone, without labels (expected errors = the
sum of 1 - confidence over served rows), which tests the calibration. End-to-end agreement
at a threshold = 1 - (served and wrong) / all: a teacher-served row agrees by definition.

Frozen-encoder variants share one encoding pass per stream (the heads are fitted on cached
features through the plugin's own ``fit_head``); ``--finetune`` adds the trainer end to end
with SetFit-style encoder tuning (slow: minutes per size). The default trainer is then timed
end to end: training on all 10,003 gold rows, loading, and predict latency.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.interfaces import Example  # noqa: E402
from plugins.classify import ClassifyOptions, ClassifyTask  # noqa: E402
from plugins.trainers.embedding_classifier import (  # noqa: E402
    BUNDLED_ENCODER,
    EmbeddingClassifierOptions,
    EmbeddingClassifierTrainer,
    encoder_path,
    fit_head,
    get_encoder,
)

DATA = ROOT.parent / "shared" / "data" / "banking77"
TARGET = 0.97
SIZES = {"real": [1000, 2000, 3000], "gold": [2000, 5000, 8000]}

# name -> option overrides (layers: what the logistic head sees; kNN always uses the
# sentence embedding)
VARIANTS: dict[str, dict[str, Any]] = {
    "logistic (last layer)": {"head": "logistic", "layers": [6], "calibration": "platt"},
    "knn k=10": {"head": "knn", "layers": [6], "calibration": "platt"},
    "ensemble (last layer)": {"head": "ensemble", "layers": [6], "calibration": "platt"},
    "ensemble (layers 4-6)": {"head": "ensemble", "layers": [4, 5, 6], "calibration": "platt"},
    "ensemble (layers 4-6) + feature calibration [default]": {},
}


def load_stream(name: str) -> tuple[list[str], list[str]]:
    if name == "real":
        rows = [json.loads(line) for f in ("test_llm_labels.jsonl", "extra_llm_labels.jsonl")
                for line in (DATA / f).read_text().splitlines() if line.strip()]
        random.Random(0).shuffle(rows)
        return [r["text"] for r in rows], [r["teacher"] for r in rows]
    with (DATA / "train.csv").open(newline="") as handle:
        gold = list(csv.DictReader(handle))
    random.Random(0).shuffle(gold)
    return [r["text"] for r in gold], [r["category"] for r in gold]


def coverage(conf: np.ndarray, correct: np.ndarray, target: float) -> tuple[float, float]:
    """Largest share served (highest confidences first, ties together) with end-to-end
    agreement >= target, and the threshold that serves it (inf: serve nothing)."""
    order = np.argsort(-conf, kind="stable")
    c, wrong = conf[order], np.cumsum(~correct[order])
    n = len(conf)
    ends = np.flatnonzero(np.append(c[1:] != c[:-1], True))  # last index of each tie group
    ok = ends[wrong[ends] <= (1 - target) * n]
    if len(ok) == 0:
        return 0.0, float("inf")
    return (ok[-1] + 1) / n, float(c[ok[-1]])


def conf_only_threshold(conf: np.ndarray, target: float) -> float:
    """Threshold from confidences alone: expected errors sum(1 - conf) over served rows."""
    order = np.argsort(-conf, kind="stable")
    expected = np.cumsum(1 - conf[order])
    ok = np.flatnonzero(expected <= (1 - target) * len(conf))
    return float(conf[order][ok[-1]]) if len(ok) else float("inf")


@dataclass
class Row:
    stream: str
    n_train: int
    variant: str
    agreement: float
    mean_conf: float
    oracle: float
    cov: float
    e2e: float
    conf_only_cov: float
    conf_only_e2e: float
    fit_seconds: float


def evaluate(stream: str, n: int, variant: str, pred: list[str], conf: np.ndarray,
             truth: list[str], seconds: float) -> Row:
    correct = np.array([p == t for p, t in zip(pred, truth, strict=True)])
    idx = np.arange(len(conf))
    covs, e2es = [], []
    for pick, use in ((idx % 2 == 0, idx % 2 == 1), (idx % 2 == 1, idx % 2 == 0)):
        _, threshold = coverage(conf[pick], correct[pick], TARGET)
        served = conf[use] >= threshold
        covs.append(served.mean())
        e2es.append(1 - (served & ~correct[use]).sum() / use.sum())
    t = conf_only_threshold(conf, TARGET)
    served = conf >= t
    return Row(stream, n, variant, float(correct.mean()), float(conf.mean()),
               coverage(conf, correct, TARGET)[0], float(np.mean(covs)), float(np.mean(e2es)),
               float(served.mean()), float(1 - (served & ~correct).mean()), seconds)


def frozen_variants(stream: str, texts: list[str], teacher: list[str],
                    sizes: list[int]) -> list[Row]:
    defaults = EmbeddingClassifierOptions()
    encoder = get_encoder(defaults.encoder, defaults.quantize)
    started = time.perf_counter()
    # One pass gives both feature sets: the layer-6 block of the [4,5,6] features is the
    # sentence embedding scaled by 1/sqrt(3).
    emb, feats456 = encoder.encode(texts, [4, 5, 6], 256, 64)
    print(f"# encoded {len(texts)} {stream} texts in {time.perf_counter() - started:.1f}s",
          flush=True)
    feats = {(6,): emb, (4, 5, 6): feats456}
    rows = []
    for n in sizes:
        labels = sorted(set(teacher[:n]))
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[t] for t in teacher[:n]])
        for name, overrides in VARIANTS.items():
            opts = EmbeddingClassifierOptions(**overrides)
            x = feats[tuple(opts.layers)]
            t0 = time.perf_counter()
            head, _ = fit_head(emb[:n], x[:n], y, labels, opts)
            seconds = time.perf_counter() - t0
            out = head.raw(emb[n:], x[n:], opts)
            conf = head.calibrator(out)
            pred = [labels[i] for i in out.pred]
            rows.append(evaluate(stream, n, name, pred, conf, teacher[n:], seconds))
            print_row(rows[-1])
    return rows


def trainer_variant(stream: str, texts: list[str], teacher: list[str], sizes: list[int],
                    name: str, options: dict[str, Any]) -> list[Row]:
    task = ClassifyTask("bench", ClassifyOptions())
    rows = []
    for n in sizes:
        trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions(**options))
        with tempfile.TemporaryDirectory() as tmp:
            figures = trainer.train([Example(t, y) for t, y in zip(texts[:n], teacher[:n],
                                                                   strict=True)],
                                    task, Path(tmp))
            student = trainer.load(Path(tmp), task)
            preds = student.predict(texts[n:])
        conf = np.array([p.confidence for p in preds])
        rows.append(evaluate(stream, n, name, [p.target for p in preds], conf, teacher[n:],
                             figures["train_seconds"]))
        print_row(rows[-1])
    return rows


def print_row(r: Row) -> None:
    print(f"| {r.stream} | {r.n_train} | {r.variant} | {r.agreement:.3f} | {r.mean_conf:.3f} | "
          f"**{r.cov:.3f}** | {r.e2e:.3f} | {r.oracle:.3f} | {r.conf_only_cov:.3f} | "
          f"{r.conf_only_e2e:.3f} | {r.fit_seconds:.1f} |", flush=True)


def timings(texts: list[str], teacher: list[str]) -> dict[str, Any]:
    """The default trainer end to end on every gold row, then load and predict latency."""
    task = ClassifyTask("bench", ClassifyOptions())
    trainer = EmbeddingClassifierTrainer(EmbeddingClassifierOptions())
    with tempfile.TemporaryDirectory() as tmp:
        figures = trainer.train([Example(t, y) for t, y in zip(texts, teacher, strict=True)],
                                task, Path(tmp))
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        t0 = time.perf_counter()
        student = EmbeddingClassifierTrainer(EmbeddingClassifierOptions()).load(Path(tmp), task)
        load_s = time.perf_counter() - t0
    sample = texts[:1024]
    student.predict(sample[:32])  # warm-up
    # The bare encoder on the same inputs, interleaved so both see the same machine load:
    # the difference is what the student adds (extra layer features, heads, calibration).
    from sentence_transformers import SentenceTransformer

    bare = SentenceTransformer(encoder_path(BUNDLED_ENCODER), device="cpu")
    bare_batch, bare_single, batch, single = [], [], [], []
    for i in range(0, len(sample), 32):
        for fn, sink in ((student.predict, batch), (bare.encode, bare_batch)):
            t0 = time.perf_counter()
            fn(sample[i:i + 32])
            sink.append(time.perf_counter() - t0)
    for text in sample[:300]:
        for fn, sink in ((student.predict, single), (bare.encode, bare_single)):
            t0 = time.perf_counter()
            fn([text])
            sink.append(time.perf_counter() - t0)

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)) * 1000, 1)

    return {"train": figures, "artifact_bytes": size, "load_seconds": round(load_s, 3),
            "batch32_ms_p50": pct(batch, 50), "batch32_ms_p90": pct(batch, 90),
            "single_ms_p50": pct(single, 50), "single_ms_p99": pct(single, 99),
            "bare_encoder_batch32_ms_p50": pct(bare_batch, 50),
            "bare_encoder_single_ms_p50": pct(bare_single, 50)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average "
            f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="real,gold")
    parser.add_argument("--finetune", action="store_true",
                        help="add the trainer with encoder tuning (minutes per size)")
    parser.add_argument("--finetune-sizes", default="1000,2000,3000",
                        help="sizes for the tuned variant (real stream only)")
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--no-frozen", action="store_true",
                        help="skip the frozen-encoder variants (e.g. only --finetune)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print("| stream | N | student | agreement | mean conf | cov@0.97 | e2e | oracle cov "
          "| conf-only cov | conf-only e2e | head fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[Row] = []
    data = {s: load_stream(s) for s in args.streams.split(",")}
    for stream, (texts, teacher) in data.items():
        if not args.no_frozen:
            rows += frozen_variants(stream, texts, teacher, SIZES[stream])
    if args.finetune and "real" in data:
        texts, teacher = data["real"]
        sizes = [int(v) for v in args.finetune_sizes.split(",")]
        rows += trainer_variant("real", texts, teacher, sizes,
                                "default + encoder tuning 1 epoch (end to end)",
                                {"finetune_epochs": 1.0})
    result: dict[str, Any] = {"machine": machine(), "target": TARGET,
                              "rows": [r.__dict__ for r in rows]}
    if not args.no_timings:
        texts, teacher = data.get("gold") or load_stream("gold")
        result["timings"] = timings(texts, teacher)
        print("\n" + json.dumps(result["timings"], indent=2))
        result["machine_after"] = machine()
        print(f"machine after: {result['machine_after']}")
    for stream in data:
        best = [r for r in rows if r.stream == stream]
        print(f"\nbest cov@0.97 on {stream}: " + ", ".join(
            f"N={n}: {max((r for r in best if r.n_train == n), key=lambda r: r.cov).variant}"
            for n in sorted({r.n_train for r in best})) if best else "-")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
