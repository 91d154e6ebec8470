"""Student serving on 2 cores: latency, throughput, retrain time and memory.

Rerunnable: ``.venv/bin/python benchmarks/student_serving.py [--out FILE]``.

1. Imports Banking77 train (10,003 rows, gold label as the teacher's answer) into a
   fresh SQLite store and times ``distill-gateway train`` (retrain time on 10k).
2. Serves the gateway as a user does (``distill-gateway serve``, one worker) with the
   trained classify student active and the replay teacher behind it.
3. Single request: sequential requests on one keep-alive connection, p50 / p99 of the
   requests the student answered.
4. Throughput under concurrency (wrk, 32 connections) against the encoder's own batched
   throughput (the same MiniLM encoding batches of 32 in a loop, in this process).
5. Gateway RSS with the student loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
       "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "distill-gateway"), *args], cwd=cwd, env=ENV, check=True,
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


def encoder_throughput(texts: list[str], seconds: float = 10.0) -> float:
    """The student's own encoder (as configured by default: int8) on batches of 32, the
    sentence embedding only: the ceiling the gateway's micro-batching is measured against."""
    sys.path.insert(0, str(ROOT))
    from plugins.trainers.embedding_classifier import EmbeddingClassifierOptions, get_encoder

    defaults = EmbeddingClassifierOptions()
    encoder = get_encoder(defaults.encoder, defaults.quantize)
    encoder.encode(texts[:64], [-1], defaults.max_tokens, 32)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = texts[done % (len(texts) - 32): done % (len(texts) - 32) + 32]
        encoder.encode(batch, [-1], defaults.max_tokens, 32)
        done += len(batch)
    return done / (time.perf_counter() - started)


def python_load(url: str, body: bytes, duration: int, connections: int) -> float:
    """Where wrk is not installed: the same closed loop from aiohttp (costs the client more
    CPU than wrk on the same cores, so it reads lower)."""
    import asyncio

    import aiohttp

    async def main() -> int:
        done = 0
        deadline = time.perf_counter() + duration
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    async with session.post(url, data=body, headers={
                            "content-type": "application/json"}) as response:
                        await response.read()
                        done += response.status == 200
            await asyncio.gather(*(worker() for _ in range(connections)))
        return done

    started = time.perf_counter()
    done = asyncio.run(main())
    return done / (time.perf_counter() - started)


def wrk(url: str, body: bytes, duration: int, connections: int) -> float:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body.decode())}\n")
    result = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s",
                             str(script), url], capture_output=True, text=True, check=True)
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "student_serving.json")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    import csv

    rows = list(csv.DictReader((DATA / "train.csv").open()))
    tests = [json.loads(line)["text"] for line in (DATA / "test_llm_labels.jsonl").open()]
    labels = json.loads((DATA / "categories.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="distill-student-bench-"))
    try:
        stream = work / "teacher.jsonl"
        stream.write_text("".join(json.dumps({"text": t, "teacher": "card_arrival"}) + "\n"
                                  for t in tests))
        config = work / "config.yaml"
        config.write_text(json.dumps({
            "database": f"sqlite:///{work / 'bench.db'}", "artifacts": str(work / "artifacts"),
            "tasks": {"support-intents": {
                "plugin": "classify", "options": {"labels": labels},
                "teacher": {"model": "replay/gpt-4o", "api_base": str(stream)},
                "policy": {"target_agreement": 0.97, "audit_rate": 0.0},
            }},
            "server": {"log_level": "warning"}, "loop": {"enabled": False},
        }))
        logs = work / "train.jsonl"
        logs.write_text("".join(json.dumps({"text": r["text"], "teacher": r["category"]}) + "\n"
                                for r in rows))
        run("import", "support-intents", str(logs), "--config", str(config), cwd=work)
        retrain_s = run("train", "support-intents", "--config", str(config), "--promote",
                        "always", cwd=work)
        trainer_s = trainer_seconds(work / "bench.db")
        port = free_port()
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
            for i in range(args.requests + 100):
                body = orjson.dumps({"model": "support-intents", "messages": [
                    {"role": "user", "content": tests[i % len(tests)]}]})
                started = time.perf_counter()
                response = client.post(url, content=body,
                                       headers={"content-type": "application/json"})
                ms = (time.perf_counter() - started) * 1000
                if i >= 100:  # warm-up
                    all_ms.append(ms)
                    if response.headers.get("x-distill-served-by") == "student":
                        student_ms.append(ms)
            served = [t for t in tests[:300] if client.post(url, content=orjson.dumps({
                "model": "support-intents", "messages": [{"role": "user", "content": t}]}),
                headers={"content-type": "application/json"}).headers.get(
                "x-distill-served-by") == "student"]
            body = orjson.dumps({"model": "support-intents", "messages": [
                {"role": "user", "content": served[0] if served else tests[0]}]})
            rps = (wrk(url, body, args.duration, 32) if shutil.which("wrk")
                   else python_load(url, body, args.duration, 32))
            memory = rss_mb(server.pid)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        encoder = encoder_throughput(tests)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    report = {
        "retrain_10k_seconds": round(retrain_s, 1),
        "retrain_10k_trainer_seconds": trainer_s,
        "student_share_of_test_requests": len(student_ms) / len(all_ms) if all_ms else 0.0,
        "student_p50_ms": round(statistics.median(student_ms), 2) if student_ms else None,
        "student_p99_ms": round(pct(student_ms, 0.99), 2) if student_ms else None,
        "all_p50_ms": round(statistics.median(all_ms), 2),
        "throughput_rps_c32": round(rps, 1),
        "encoder_batched_texts_per_s": round(encoder, 1),
        "throughput_vs_encoder": round(rps / encoder, 3) if encoder else None,
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
