"""`distill-gateway serve` as a user runs it: a real process with uvloop and httptools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from gateway.testing.teacher_server import TeacherServer
from tests.servers import free_port


def launch(tmp_path: Path, teacher: TeacherServer, *args: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`distill-gateway serve` on a config with one classify task, as a user starts it;
    returns the process and its base URL once it answers /healthz."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: sqlite:///{tmp_path / 'd.db'}\n"
        f"artifacts: {tmp_path / 'artifacts'}\n"
        "default_teacher:\n"
        f"  model: openai/teacher-model\n  api_base: {teacher.url}\n  api_key: sk-x\n"
        "tasks:\n  support-intents: {plugin: classify}\n"
    )
    port = free_port()
    bin_dir = Path(sys.executable).parent
    process = subprocess.Popen(
        [str(bin_dir / "distill-gateway"), "serve", "--config", str(config), "--port", str(port),
         *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("gateway did not start: " + process.communicate()[0].decode())
        time.sleep(0.2)


def test_serve_command(tmp_path: Path, teacher: TeacherServer) -> None:
    process, base = launch(tmp_path, teacher)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        answer = client.chat.completions.create(
            model="support-intents", messages=[{"role": "user", "content": "ping"}]
        )
        assert answer.choices[0].message.content == "echo: ping"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=40)[0].decode()
    # uvicorn re-raises the signal it handled once the graceful shutdown is done
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "sk-x" not in output
    # the graceful shutdown drained the record into the database
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'd.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM exchanges")).scalar_one() == 1


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("server: {port: lots}\n")
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "distill-gateway"), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "server.port" in result.stderr


def test_several_workers_aggregate_their_metrics(tmp_path: Path, teacher: TeacherServer) -> None:
    """`serve --workers 2` with PROMETHEUS_MULTIPROC_DIR: whichever worker answers the
    scrape reports every worker's requests and stored records, and the gauges combine as
    documented."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    process, base = launch(tmp_path, teacher, "--workers", "2",
                           env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        sent, pids = 0, set()
        deadline = time.monotonic() + 60
        # a connection each, until both workers have answered some (each writes counter
        # files of its own on its first request); which one accepts is the kernel's choice
        while len(pids) < 2 or sent < 20:
            assert time.monotonic() < deadline, f"one worker answered all {sent}: {pids}"
            with httpx.Client(base_url=base) as client:
                answer = client.post("/v1/chat/completions", json={
                    "model": "support-intents",
                    "messages": [{"role": "user", "content": f"ping {sent}"}]})
            assert answer.status_code == 200
            sent += 1
            pids = {f.stem.rsplit("_", 1)[-1] for f in metrics_dir.glob("counter_*.db")}
        written = f"distill_store_written_total {float(sent)}"
        deadline = time.monotonic() + 10
        while written not in (text := httpx.get(base + "/metrics").text):
            # each worker's writer brings its figures up to date after a batch (<= 1 s)
            assert time.monotonic() < deadline, [line for line in text.splitlines()
                                                 if line.startswith("distill_store")]
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=40)
    requests = [line for line in text.splitlines()
                if line.startswith("distill_requests_total{") and 'task="support-intents"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in requests) == sent
    # the promise is one series, not one per worker
    assert [line for line in text.splitlines() if line.startswith("distill_target_agreement")
            ] == ['distill_target_agreement{task="support-intents"} 0.97']
