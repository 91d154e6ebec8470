"""Benchmark the ``lora-lm`` student (SmolLM2-135M + LoRA) on extract and rewrite.

    .venv/bin/python benchmarks/student_lora.py [--tasks extract rewrite] [--budget 300]

Extract: NLU++ banking, target ``{"intents": [...sorted], "slots": {name: text}}`` validated
against a JSON Schema built from the ontology. Rewrite: Disfl-QA, disfluent -> original
question, agreement at character similarity >= 0.9. Gold labels stand in for the teacher.

For each task: train within a time budget, predict a calibration split and a test split
(all disjoint), choose the serving threshold on the calibration split with the gateway's
own calibrator (upper confidence bound on disagreement) and report on the test split the
share the student serves and the end-to-end agreement, plus latency. Results go to
``benchmarks/results/student_lora.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.calibration import calibrate  # noqa: E402
from gateway.interfaces import Example, Task  # noqa: E402
from plugins.extract import ExtractTask, field_f1  # noqa: E402
from plugins.rewrite import RewriteTask  # noqa: E402
from plugins.trainers.lora_lm import LoraLMStudent, LoraLMTrainer, torch_threads  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = (0.90, 0.95)


def nlupp_rows() -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    ontology = json.loads((DATA / "nlupp" / "ontology.json").read_text())
    intents = sorted(k for k, v in ontology["intents"].items()
                     if {"banking", "general"} & set(v["domain"]))
    slots = sorted(k for k, v in ontology["slots"].items()
                   if {"banking", "general"} & set(v["domain"]))
    schema = {
        "type": "object",
        "properties": {
            "intents": {"type": "array", "items": {"enum": intents}, "uniqueItems": True},
            "slots": {"type": "object", "additionalProperties": False,
                      "properties": {s: {"type": "string"} for s in slots}},
        },
        "required": ["intents", "slots"],
        "additionalProperties": False,
    }
    rows = []
    for fold in sorted((DATA / "nlupp" / "banking").glob("fold*.json")):
        for row in json.loads(fold.read_text()):
            target = {"intents": sorted(set(row.get("intents", []))),
                      "slots": {k: v["text"] for k, v in row.get("slots", {}).items()}}
            rows.append((row["text"], target))
    return rows, schema


def disfl_rows(split: str) -> list[tuple[str, Any]]:
    data = json.loads((DATA / "disfl_qa" / f"{split}.json").read_text())
    return [(r["disfluent"], r["original"].strip()) for r in data.values()]


def splits(task_name: str, n_train: int, n_cal: int, n_test: int, seed: int) -> tuple[
        Task, list[tuple[str, Any]], list[tuple[str, Any]], list[tuple[str, Any]], str]:
    rng = random.Random(seed)
    if task_name == "extract":
        rows, schema = nlupp_rows()
        rng.shuffle(rows)
        task: Task = ExtractTask("nlupp-banking",
                                 ExtractTask.Options.model_validate({"json_schema": schema}))
        system = ("Extract the banking intents and slots of the user's message. Reply with "
                  "one JSON object with keys intents and slots.")
        train = rows[:n_train]
        rest = rows[n_train:]
        return task, train, rest[:n_cal], rest[n_cal:n_cal + n_test], system
    task = RewriteTask("disfl-qa", RewriteTask.Options.model_validate({"similarity": 0.9}))
    train = disfl_rows("train")
    rng.shuffle(train)
    held = disfl_rows("dev")
    rng.shuffle(held)
    system = ("Rewrite the user's question as the fluent question they meant: drop the "
              "words they corrected or abandoned. Reply with the question only.")
    return task, train[:n_train], held[:n_cal], held[n_cal:n_cal + n_test], system


def measure_latency(student: LoraLMStudent, probe: list[str]) -> dict[str, float]:
    latency: dict[str, float] = {}
    for size in (1, 8):
        times = []
        for k in range(3):
            batch = probe[k:k + 1] if size == 1 else probe
            t0 = time.perf_counter()
            student.predict(batch)
            times.append(time.perf_counter() - t0)
        latency[f"batch{size}_median_s"] = round(statistics.median(times), 3)
    return latency


def run_task(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    task, train, cal, test, system = splits(name, args.train, args.cal, args.test, args.seed)
    options = LoraLMTrainer.Options.model_validate({
        "system_prompt": system, "max_train_seconds": args.budget, "epochs": args.epochs,
        "batch_size": args.batch_size, "max_new_tokens": 96 if name == "extract" else 64,
        "torch_threads": args.threads, "device": args.device,
        **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
    })
    trainer = LoraLMTrainer(options)
    examples = [Example(input=i, target=task.parse_target(task.render(t))) for i, t in train]
    print(f"[{name}] training on {len(examples)} examples, budget {args.budget} s", flush=True)
    figures = trainer.train(examples, task, work / name)

    started = time.perf_counter()
    student = trainer.load(work / name, task)
    load_seconds = time.perf_counter() - started
    assert isinstance(student, LoraLMStudent)

    def judge(rows: list[tuple[str, Any]]) -> tuple[list[float], list[bool], list[Any]]:
        predictions = student.predict([i for i, _ in rows])
        agrees = [p.target is not None and task.agree(p.target, g)
                  for p, (_, g) in zip(predictions, rows, strict=True)]
        return [p.confidence for p in predictions], agrees, [p.target for p in predictions]

    with torch_threads(args.threads):
        started = time.perf_counter()
        cal_conf, cal_ok, _ = judge(cal)
        test_conf, test_ok, test_targets = judge(test)
        predict_seconds = time.perf_counter() - started
        latency = measure_latency(student, [i for i, _ in test[:8]])

    result: dict[str, Any] = {
        "task": name, "train_examples": len(examples), "cal": len(cal), "test": len(test),
        "figures": figures, "load_seconds": round(load_seconds, 2),
        "predict_seconds_per_row": round(predict_seconds / (len(cal) + len(test)), 3),
        "latency": latency,
        "student_agreement": round(sum(test_ok) / len(test_ok), 4),
        "invalid_share": round(sum(t is None for t in test_targets) / len(test), 4),
    }
    if name == "extract":
        f1 = [field_f1(t, g) for t, (_, g) in zip(test_targets, test, strict=True)]
        result["field_f1"] = round(sum(f1) / len(f1), 4)
    try:
        from sklearn.metrics import roc_auc_score

        result["test_auroc"] = round(float(roc_auc_score(test_ok, test_conf)), 3)
    except ValueError:
        result["test_auroc"] = None
    result["cascade"] = []
    for target in TARGETS:
        cal_fit = calibrate(cal_conf, cal_ok, target)
        threshold = cal_fit.threshold
        served = [threshold is not None and c >= threshold for c in test_conf]
        wrong = sum(s and not ok for s, ok in zip(served, test_ok, strict=True))
        result["cascade"].append({
            "target": target, "threshold": threshold,
            "cal_coverage": round(cal_fit.coverage, 4),
            "test_coverage": round(sum(served) / len(served), 4),
            "test_end_to_end_agreement": round(1 - wrong / len(served), 4),
        })
    print(json.dumps(result, indent=1), flush=True)
    return result


def device_name(results: list[dict[str, Any]]) -> str:
    """'CPU', or the GPU the runs trained on."""
    devices = {r["figures"].get("device", "cpu") for r in results}
    if devices <= {"cpu"}:
        return "CPU"
    import torch

    return f"{torch.cuda.get_device_name()} GPU"


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# lora-lm student benchmark (SmolLM2-135M-Instruct + LoRA, "
        f"{device_name(results)})",
        "",
        f"`python benchmarks/student_lora.py --budget {args.budget} --train {args.train} "
        f"--cal {args.cal} --test {args.test} --batch-size {args.batch_size} "
        f"--threads {args.threads} --device {args.device}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        + (f", {device_name(results)}" if device_name(results) != "CPU" else
           " (shared with other jobs while measured: timings are upper bounds)") + ".",
        "",
        "Gold labels stand in for the teacher. The threshold is chosen on the calibration "
        "split by `gateway.calibration.calibrate` (95% upper bound on disagreement) and "
        "applied to the test split.",
        "",
        "| task | train ex. | steps (epochs) | s/step | student agreement | field F1 | "
        "test AUROC | coverage @0.90 (e2e) | coverage @0.95 (e2e) | batch 1 / 8 latency |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        f = r["figures"]
        cov = [f"{c['test_coverage']:.0%} ({c['test_end_to_end_agreement']:.3f})"
               for c in r["cascade"]]
        lines.append(
            f"| {r['task']} | {f['train_examples']} | {f['steps']} ({f['epochs_done']}) | "
            f"{f['seconds_per_step']} | {r['student_agreement']:.3f} | "
            f"{r.get('field_f1', '-')} | {r['test_auroc']} | {cov[0]} | {cov[1]} | "
            f"{r['latency']['batch1_median_s']} s / {r['latency']['batch8_median_s']} s |")
    lines += ["", "Raw figures: `student_lora.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["extract", "rewrite"],
                        choices=["extract", "rewrite"])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--cal", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads "
                        "(1 is much faster on a machine shared with other busy processes)")
    parser.add_argument("--device", default="auto", help="the trainer's device option: "
                        "auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=None, help="base-model cache (default: "
                        "DISTILL_BASE_MODEL_CACHE or ./artifacts/base-models)")
    parser.add_argument("--out", type=Path, default=RESULTS / "student_lora.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_task(name, args, Path(tmp)) for name in args.tasks]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, args))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
