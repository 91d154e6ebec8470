"""Student serving on 2 cores: latency, throughput, retrain time and memory.

Rerunnable: ``.venv/bin/python benchmarks/student_serving.py [--out FILE]``.

1. Imports Banking77 train (10,003 rows, gold label as the teacher's answer) into a
   fresh SQLite store and times ``distill-gateway train`` (retrain time on 10k) three
   ways: a round on all but the last 500 rows with the feature cache on (the default),
   then, after those 500 are imported, a round on all 10k that encodes only them, and
   the same 10k round with the cache off, which encodes every input as a first round
   does.
2. Serves the gateway as a user does (``distill-gateway serve``, one worker) with the
   trained classify student active; the teacher is a local OpenAI-compatible server
   (``gateway.testing.teacher_server``), reached the way an OpenAI teacher is.
3. Single request: sequential requests on one keep-alive connection, p50 / p99 of the
   requests the student answered.
4. Throughput under concurrency: 32 keep-alive connections in a closed loop, cycling
   through the test texts the student answered in step 3, from a load generator that writes
   prebuilt requests on raw sockets (a few microseconds of client CPU per request, as
   with wrk, which these machines lack), against the encoder's own batched throughput
   on the same texts (random batches of 32, the student's options, in this process,
   while the gateway idles; the better of one caller on all cores and one caller per
   core), the two measured in alternating slices.
5. Gateway RSS with the student loaded, after the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen, a sibling script
from loadgen import raw_load

from gateway.feature_cache import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
sys.path.insert(0, str(ROOT))  # the plugins, for the encoder ceiling
BIN = Path(sys.executable).parent
# No TOKENIZERS_PARALLELISM here: the encoder turns the tokenizer's thread pool off itself,
# in the gateway and in this process's encoder ceiling alike, so both run as a user's do.
#: Rows that arrive between the two cached rounds (the rest were encoded by the first).
NEW = 500
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "distill-gateway"), *args], cwd=cwd, env=env or ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1])
    return total / 1024


def trainer_seconds(db: Path) -> float | None:
    """The trainer's own time in the round ``train`` ran (the command adds start-up, reading
    the store and the curation filters)."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT metrics FROM student_versions ORDER BY id DESC").fetchone()
    metrics = json.loads(row[0]) if row and row[0] else {}
    value = metrics.get("train_seconds")
    return float(value) if value is not None else None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path(
            "/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def encoder_throughput(texts: list[str], seconds: float = 10.0, workers: int = 1) -> float:
    """The student's own encoder (int8, as configured by default) on random batches of 32
    of the same texts the gateway is loaded with, encoded the way the student encodes them
    (its layers and pass size), in this process: the ceiling the gateway's micro-batching
    is measured against. ``workers`` = 1: one caller allowed every core (the encoder then
    runs its passes on concurrent threads); more: that many callers at once, one intra-op
    thread each."""
    import threading

    import torch

    from plugins.trainers.embedding_classifier import EmbeddingClassifierOptions, get_encoder

    options = EmbeddingClassifierOptions()
    encoder = get_encoder(options.encoder, options.quantize)
    # Random batches, as concurrent requests make them: the test file is grouped by label,
    # and consecutive texts (alike in length, little padding) would flatter the encoder.
    rng = random.Random(0)
    batches = [rng.sample(texts, min(32, len(texts))) for _ in range(200)]
    threads = len(os.sched_getaffinity(0)) if workers == 1 else 1
    counts = [0] * workers

    def caller(slot: int, until: float) -> None:
        torch.set_num_threads(threads)  # per thread (OpenMP)
        done = 0
        while time.perf_counter() < until:
            batch = batches[(slot + done // 32 * workers) % len(batches)]
            encoder.encode(batch, options.layers, options.max_tokens,
                           options.predict_batch_size)
            done += len(batch)
        counts[slot] = done

    warm_up = threading.Thread(target=caller, args=(0, time.perf_counter() + 0.5))
    warm_up.start()  # in a thread of its own, like the callers: the setting is per thread
    warm_up.join()
    started = time.perf_counter()
    callers = [threading.Thread(target=caller, args=(slot, started + seconds))
               for slot in range(workers)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "student_serving.json")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of load for each of gateway and encoder, in all")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating gateway / encoder slices the duration is cut into")
    args = parser.parse_args()
    import csv

    rows = list(csv.DictReader((DATA / "train.csv").open()))
    tests = [json.loads(line)["text"] for line in (DATA / "test_llm_labels.jsonl").open()]
    labels = json.loads((DATA / "categories.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="distill-student-bench-"))
    try:
        teacher_port = free_port()
        config = work / "config.yaml"
        config.write_text(json.dumps({
            "database": f"sqlite:///{work / 'bench.db'}", "artifacts": str(work / "artifacts"),
            "tasks": {"support-intents": {
                "plugin": "classify", "options": {"labels": labels},
                "teacher": {"model": "openai/gpt-4o", "api_key": "sk-bench",
                            "api_base": f"http://127.0.0.1:{teacher_port}/v1"},
                "policy": {"target_agreement": 0.97, "audit_rate": 0.0},
            }},
            "server": {"log_level": "warning"}, "loop": {"enabled": False},
        }))
        # Rounds with the feature cache (the default): one over all but the last NEW rows,
        # then one after they arrive, which encodes only them; then the same 10k round
        # with the cache off, which encodes everything as a first round does.
        cached_env = {**ENV, CACHE_ENV: str(work / "features")}
        for name, part in (("old.jsonl", rows[:-NEW]), ("new.jsonl", rows[-NEW:])):
            (work / name).write_text("".join(
                json.dumps({"text": r["text"], "teacher": r["category"]}) + "\n" for r in part))
            run("import", "support-intents", str(work / name), "--config", str(config),
                cwd=work)
            seconds = run("train", "support-intents", "--config", str(config), "--promote",
                          "always", cwd=work, env=cached_env)
            if name == "old.jsonl":
                first_round_s, first_trainer_s = seconds, trainer_seconds(work / "bench.db")
        cached_s, cached_trainer_s = seconds, trainer_seconds(work / "bench.db")
        retrain_s = run("train", "support-intents", "--config", str(config), "--promote",
                        "always", cwd=work, env={**ENV, CACHE_ENV: ""})
        trainer_s = trainer_seconds(work / "bench.db")
        port = free_port()
        teacher = subprocess.Popen([sys.executable, "-m", "gateway.testing.teacher_server",
                                    "--port", str(teacher_port), "--answer", "card_arrival"],
                                   cwd=ROOT, env=ENV, start_new_session=True)
        server = subprocess.Popen([str(BIN / "distill-gateway"), "serve", "--config",
                                   str(config), "--port", str(port)], cwd=work, env=ENV,
                                  start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway did not start")
                time.sleep(0.5)
            client = httpx.Client()
            student_ms: list[float] = []
            all_ms: list[float] = []
            served: list[str] = []  # the texts the student answered, for the load below
            for i in range(args.requests + 100):
                text = tests[i % len(tests)]
                body = orjson.dumps({"model": "support-intents", "messages": [
                    {"role": "user", "content": text}]})
                started = time.perf_counter()
                response = client.post(url, content=body,
                                       headers={"content-type": "application/json"})
                ms = (time.perf_counter() - started) * 1000
                by_student = response.headers.get("x-distill-served-by") == "student"
                if by_student:
                    served.append(text)
                if i >= 100:  # warm-up
                    all_ms.append(ms)
                    if by_student:
                        student_ms.append(ms)
            served = served or tests
            bodies = [orjson.dumps({"model": "support-intents", "messages": [
                {"role": "user", "content": t}]}) for t in served]
            # Gateway and encoder in alternating slices (the gateway idles meanwhile): the
            # speed of these shared 2-core machines drifts by 10-20% within minutes, and
            # the ratio should compare like with like.
            rounds = max(1, args.rounds)
            slice_s = args.duration / rounds
            gateway_rps, one_caller, per_core = [], [], []
            cores = len(os.sched_getaffinity(0))
            raw_load(port, bodies, 2, 32)  # warm-up
            for _ in range(rounds):
                # The encoder's ceiling both ways: one caller on all cores, and one caller
                # per core on one thread each (the way the gateway runs it); the higher
                # counts.
                one_caller.append(encoder_throughput(served, slice_s / 2))
                per_core.append(encoder_throughput(served, slice_s / 2, workers=cores))
                load = raw_load(port, bodies, slice_s, 32)
                gateway_rps.append(load.ok / load.seconds)
            rps = statistics.mean(gateway_rps)
            encoder_one = statistics.mean(one_caller)
            encoder_per_core = statistics.mean(per_core)
            encoder = max(encoder_one, encoder_per_core)
            memory = rss_mb(server.pid)
        finally:
            for process in (server, teacher):
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    report = {
        "retrain_10k_seconds": round(retrain_s, 1),
        "retrain_10k_trainer_seconds": trainer_s,
        "retrain_10k_cached_seconds": round(cached_s, 1),
        "retrain_10k_cached_trainer_seconds": cached_trainer_s,
        "retrain_new_rows": NEW,
        "first_round_seconds": round(first_round_s, 1),
        "first_round_trainer_seconds": first_trainer_s,
        "student_share_of_test_requests": len(student_ms) / len(all_ms) if all_ms else 0.0,
        "student_p50_ms": round(statistics.median(student_ms), 2) if student_ms else None,
        "student_p99_ms": round(pct(student_ms, 0.99), 2) if student_ms else None,
        "all_p50_ms": round(statistics.median(all_ms), 2),
        "throughput_rps_c32": round(rps, 1),
        "encoder_batched_texts_per_s": round(encoder, 1),
        "throughput_vs_encoder": round(rps / encoder, 3) if encoder else None,
        "encoder_one_caller_texts_per_s": round(encoder_one, 1),
        "throughput_vs_encoder_one_caller": round(rps / encoder_one, 3),
        "encoder_caller_per_core_texts_per_s": round(encoder_per_core, 1),
        "throughput_rounds": [{"gateway_rps": round(g, 1),
                               "encoder_one_caller_texts_per_s": round(a, 1),
                               "encoder_caller_per_core_texts_per_s": round(b, 1)}
                              for g, a, b in zip(gateway_rps, one_caller, per_core,
                                                 strict=True)],
        "gateway_rss_mb": round(memory, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "processor": cpu_model(), "load_average": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key != "machine":
            print(f"{key:<{width}}  {value}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
