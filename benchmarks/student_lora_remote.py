"""A ``lora-lm`` student generated in the gateway's process against one generated on a
LoRA-serving server (``server_url``): the memory a replica holds, and the round trip.

    .venv/bin/python benchmarks/student_lora_remote.py [--train-seconds 60] [--requests 20]
        [--artifact DIR] [--cache-dir DIR] [--out FILE]

Trains a Disfl-QA rewrite adapter on SmolLM2-135M for ``--train-seconds`` (or takes
``--artifact``), then measures in fresh processes: the student loaded locally, and the
student loaded with ``server_url`` pointing at the stand-in server
(``gateway.testing.lora_server``, in a process of its own): each process's resident memory
after the load and after ``--requests`` single requests, and their latency. The stand-in
generates on this CPU just as the local student does, so the latencies show what the remote
path adds here, not what vLLM on a GPU would take.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
SYSTEM = "Rewrite the question without its disfluencies. Reply with the question only."


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disfl_rows(split: str) -> list[tuple[str, str]]:
    data = json.loads((DATA / "disfl_qa" / f"{split}.json").read_text())
    return [(row["disfluent"], row["original"]) for row in data.values()]


def options(cache_dir: str, **extra: Any) -> Any:
    from plugins.trainers.lora_lm import LoraLMTrainer

    return LoraLMTrainer.Options.model_validate({
        "cache_dir": cache_dir, "system_prompt": SYSTEM, "dtype": "float32",
        "batch_size": 4, "calibration_fraction": 0.1, "min_calibration_examples": 20,
        **extra})


def rewrite_task() -> Any:
    from plugins.rewrite import RewriteTask

    return RewriteTask("fluent", RewriteTask.Options.model_validate({"similarity": 0.9}))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: load the student one way, answer single requests."""
    from plugins.trainers.lora_lm import LoraLMTrainer

    before = rss_mb()
    extra = {"server_url": args.server, "server_timeout_s": 600.0} if args.server else {}
    started = time.perf_counter()
    student = LoraLMTrainer(options(args.cache_dir, **extra)).load(Path(args.artifact),
                                                                   rewrite_task())
    load_s = time.perf_counter() - started
    after_load = rss_mb()
    texts = [d for d, _ in disfl_rows("dev")[: args.requests + 2]]
    student.predict(texts[:2])  # warm-up
    ms = []
    for text in texts[2:]:
        started = time.perf_counter()
        student.predict([text])
        ms.append((time.perf_counter() - started) * 1000)
    return {"start_rss_mb": round(before, 1), "rss_after_load_mb": round(after_load, 1),
            "rss_after_requests_mb": round(rss_mb(), 1), "load_seconds": round(load_s, 2),
            "p50_ms": round(statistics.median(ms), 1), "mean_ms": round(statistics.mean(ms), 1),
            "requests": len(ms)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child(args: argparse.Namespace, server: str | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", "--artifact", args.artifact,
               "--cache-dir", args.cache_dir, "--requests", str(args.requests)]
    if server:
        command += ["--server", server]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--artifact", default=None, help="a trained lora-lm artifact")
    parser.add_argument("--cache-dir", default=str(ROOT / "artifacts" / "base-models"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "student_lora_remote.json"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    from gateway.interfaces import Example
    from plugins.trainers.lora_lm import LoraLMTrainer, resolve_base

    if args.artifact is None:
        args.artifact = tempfile.mkdtemp(prefix="lora-remote-") + "/artifact"
        task = rewrite_task()
        examples = [Example(input=d, target=task.parse_target(o))
                    for d, o in disfl_rows("train")[:300]]
        LoraLMTrainer(options(args.cache_dir, max_train_seconds=args.train_seconds,
                              epochs=3)).train(examples, task, Path(args.artifact))
    base = resolve_base(options(args.cache_dir))
    local = child(args, None)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway.testing.lora_server", "--model", base,
         "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "serving ... on URL" once the model is loaded
        remote = child(args, f"http://127.0.0.1:{port}/v1")
        server_rss = float("nan")
        for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                server_rss = int(line.split()[1]) / 1024
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"machine": cpu_model(),
              "cpus": len(os.sched_getaffinity(0)), "artifact": args.artifact,
              "local": local, "remote": remote,
              "stand_in_server_rss_mb": round(server_rss, 1)}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("| student | RSS after load | after requests | load s | p50 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("local", "remote"):
        r = report[name]
        print(f"| {name} | {r['rss_after_load_mb']} MB | {r['rss_after_requests_mb']} MB | "
              f"{r['load_seconds']} | {r['p50_ms']} |")
    print(f"stand-in server RSS: {report['stand_in_server_rss_mb']} MB")


if __name__ == "__main__":
    main()
