"""Economics of the cascade: share served by the student, the promise, and the money.

    .venv/bin/python benchmarks/economics.py [--streams real gold extract rewrite]
        [--variants teacher-only naive bound crossfit] [--out-dir benchmarks/results]

Every run is ``distill-gateway bench cascade`` (cold start, real gateway on loopback, the
replay teacher over the stream, rounds trained synchronously at the policy's triggers),
at target 0.97, in four variants side by side:

* ``teacher-only``: no student ever (``--min-examples`` above the stream length) — the
  bill without distill-gateway;
* ``naive``: a student whose threshold is fitted by cross-validation on its own training
  data, no margin (``--calibration naive``) — what a straightforward cascade does;
* ``bound``: held-out teacher labels, upper confidence bound on disagreement,
  fixed-sequence threshold, online correction from audits;
* ``crossfit``: the gateway's default, the same bound on every label, out of fold (one
  model per fold of the inputs, each input answered by the model that never saw it).

Streams (../shared/data):

* ``real``: Banking77 with a real GPT model's recorded answers as the teacher
  (test_llm_labels.jsonl + extra_llm_labels.jsonl, 4,081 rows; gold kept for accuracy);
* ``gold``: Banking77 train.csv with the gold category as the teacher (10,003 rows);
* ``extract``: NLU++ banking, all folds (2,071 rows, 2,047 distinct texts): the target
  ``{"intents": [sorted], "slots": {name: text}}`` validated by a JSON Schema built
  from the ontology; student ``structured-extractor`` (intents as labels, slot values
  tagged as spans of the input);
* ``extract-classes``: the same stream with the ``embedding-classifier`` student (each
  distinct answer a class);
* ``rewrite``: Disfl-QA test, disfluent question -> original (3,643 rows, 3,631 distinct
  questions), normalised
  exact match as agreement; student ``deletion-tagger`` (the words to drop, picked on
  frozen MiniLM states);
* ``rewrite-lm``: the first ``--rewrite-limit`` rows of it with the ``lora-lm`` student
  (SmolLM2-135M + LoRA) and a training budget per round.

Writes ``economics.json`` (every report in full) and ``economics.md`` (the table).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TARGET = 0.97
VARIANTS = ("teacher-only", "naive", "bound", "crossfit")
GOALS = {"real": 0.65, "gold": 0.85, "extract": 0.40}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def banking_labels(work: Path) -> Path:
    labels = json.loads((DATA / "banking77" / "categories.json").read_text())
    path = work / "banking77_labels.json"
    path.write_text(json.dumps(labels))
    return path


def real_stream(work: Path) -> Path:
    rows = []
    for name in ("test_llm_labels.jsonl", "extra_llm_labels.jsonl"):
        for line in (DATA / "banking77" / name).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append({"text": row["text"], "teacher": row["teacher"],
                             "gold": row.get("gold")})
    return write_jsonl(work / "banking77_real.jsonl", rows)


def gold_stream(work: Path) -> Path:
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = [{"text": r["text"], "teacher": r["category"], "gold": r["category"]}
                for r in csv.DictReader(f)]
    return write_jsonl(work / "banking77_gold.jsonl", rows)


def nlupp_stream(work: Path) -> tuple[Path, Path]:
    from student_lora import nlupp_rows  # the same targets and schema as the LoRA benchmark

    pairs, schema = nlupp_rows()
    rows = [{"text": text, "teacher": target, "gold": target} for text, target in pairs]
    schema_path = work / "nlupp_schema.json"
    schema_path.write_text(json.dumps(schema))
    return write_jsonl(work / "nlupp_extract.jsonl", rows), schema_path


def disfl_stream(work: Path) -> Path:
    data = json.loads((DATA / "disfl_qa" / "test.json").read_text())
    rows = [{"text": r["disfluent"], "teacher": r["original"].strip(),
             "gold": r["original"].strip()} for r in data.values()]
    return write_jsonl(work / "disfl_qa_rewrite.jsonl", rows)


def stream_args(name: str, work: Path, args: argparse.Namespace) -> tuple[list[str], int]:
    """The bench cascade arguments of a stream and its length after --limit."""
    classify = ["--task", "classify", "--labels", str(banking_labels(work))]
    if name == "real":
        path, extra = real_stream(work), classify
    elif name == "gold":
        path, extra = gold_stream(work), classify
    elif name in ("extract", "extract-classes"):
        path, schema = nlupp_stream(work)
        trainer = "structured-extractor" if name == "extract" else "embedding-classifier"
        extra = ["--task", "extract", "--schema", str(schema), "--trainer", trainer]
    elif name == "rewrite":
        path, extra = disfl_stream(work), ["--task", "rewrite", "--trainer", "deletion-tagger"]
    elif name == "rewrite-lm":
        path = disfl_stream(work)
        extra = ["--task", "rewrite", "--trainer", "lora-lm", "--limit", str(args.rewrite_limit),
                 "--min-examples", str(args.rewrite_min_examples),
                 "--retrain-every", str(args.rewrite_limit),
                 "--trainer-options", json.dumps({"max_train_seconds": args.rewrite_budget,
                                                  "epochs": 3, "torch_threads": 2})]
    else:
        raise SystemExit(f"unknown stream {name!r}")
    lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    if name == "rewrite-lm":
        lines = min(lines, args.rewrite_limit)
    return ["--stream", str(path), *extra], lines


def run(name: str, variant: str, base: list[str], rows: int, out: Path) -> dict[str, Any]:
    cli = Path(sys.executable).parent / "distill-gateway"
    cmd = [str(cli), "bench", "cascade", *base, "--target-agreement", str(TARGET),
           "--seed", "0", "--out", str(out)]
    if variant == "teacher-only":
        cmd += ["--min-examples", str(rows + 1)]
    else:
        cmd += ["--calibration", variant]
    print(f"== {name} / {variant}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                         "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                         "TOKENIZERS_PARALLELISM": "false"})
    report: dict[str, Any] = json.loads(out.read_text())
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def row_of(name: str, variant: str, r: dict[str, Any]) -> str:
    acc = r.get("accuracy_vs_gold")
    student_agreement = r.get("student_agreement")
    return (f"| {name} | {variant} | {r['requests']:,} | {r['student_share']:.3f} | "
            f"{r['agreement_with_teacher']:.4f} | "
            f"{'-' if student_agreement is None else f'{student_agreement:.3f}'} | "
            f"{'-' if acc is None else f'{acc:.3f}'} | {r['teacher_calls']:,} "
            f"({r['audit_calls']} audits) | ${r['teacher_only_cost_usd']:.3f} | "
            f"${r['cost_usd']:.3f} | {r['savings_pct']:.1f}% | "
            f"{'yes' if r['promise_kept'] else '**no**'} | {len(r['trainings'])} | "
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['wall_seconds']:.0f} s |")


def markdown(results: dict[str, dict[str, dict[str, Any]]], argv: list[str]) -> str:
    lines = [
        "# Economics of the cascade (target agreement 0.97)",
        "",
        f"`python benchmarks/economics.py {' '.join(argv)}` on {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}; "
        "priced as gpt-4o; seed 0; training rounds synchronous (traffic waits while a "
        "round trains, so p99 includes no training but the runs are reproducible).",
        "",
        "| stream | variant | requests | student share | agreement with teacher | "
        "student agreement | accuracy vs gold | teacher calls | teacher-only cost | cost | "
        "savings | promise kept | rounds | p50 / p99 ms | wall |",
        "|" + " --- |" * 15,
    ]
    for name, variants in results.items():
        for variant, report in variants.items():
            lines.append(row_of(name, variant, report))
    lines.append("")
    for name, goal in GOALS.items():
        runs = results.get(name, {})
        variant = "crossfit" if "crossfit" in runs else "bound"  # the default, if it ran
        best = runs.get(variant)
        if best is not None:
            met = best["student_share"] >= goal and best["promise_kept"]
            lines.append(f"- {name} ({variant}): goal share >= {goal} with the promise kept: "
                         f"{'met' if met else 'missed'} ({best['student_share']:.3f}, "
                         f"agreement {best['agreement_with_teacher']:.4f}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", default=["real", "gold", "extract", "rewrite"],
                        choices=["real", "gold", "extract", "extract-classes", "rewrite",
                                 "rewrite-lm"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rewrite-limit", type=int, default=600)
    parser.add_argument("--rewrite-min-examples", type=int, default=300)
    parser.add_argument("--rewrite-budget", type=float, default=300.0,
                        help="lora-lm training seconds per round (CPU)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "economics.json"
    # Reruns of some streams keep the others' recorded results.
    results: dict[str, dict[str, dict[str, Any]]] = (
        json.loads(json_path.read_text()) if json_path.exists() else {})
    with tempfile.TemporaryDirectory(prefix="economics-") as tmp:
        work = Path(tmp)
        for name in args.streams:
            base, rows = stream_args(name, work, args)
            for variant in args.variants:
                report = run(name, variant, base, rows, work / f"{name}-{variant}.json")
                report.pop("stream", None)  # a temporary path
                results.setdefault(name, {})[variant] = report
                json_path.write_text(json.dumps(results, indent=2) + "\n")
                print(row_of(name, variant, report), flush=True)
    table = markdown(results, sys.argv[1:])
    (args.out_dir / "economics.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
