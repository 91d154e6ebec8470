#!/usr/bin/env python3
"""Gateway overhead benchmark: latency added over a direct teacher call, and throughput.

What it measures, in one run on the same machine:

1. A fast local OpenAI-compatible teacher (``gateway.testing.teacher_server``) in its own
   process, answering ``card_arrival`` to every request.
2. **Latency**: sequential requests (after a warm-up) on one keep-alive ``httpx`` connection,
   to the teacher directly, through ``distill-gateway serve`` (one worker) and through the
   LiteLLM proxy (one worker). p50/p99 of each, and the gateway's overhead as the difference
   of percentiles (gateway p50 - direct p50, gateway p99 - direct p99). Per-request
   differences are not meaningful (the requests are not paired), so the raw distributions
   are reported alongside.
3. **Throughput** under concurrency with ``wrk`` (Debian package ``wrk``); without it,
   ``benchmarks/loadgen.py`` (prebuilt requests on raw sockets, said so in the report).

The LiteLLM proxy lives in its own venv, ``.bench-venv-litellm-proxy/`` (created with
``--setup-litellm-proxy``); it is skipped, with a note, when that venv is absent.

Usage::

    .venv/bin/python benchmarks/overhead.py [--requests 2000] [--warmup 200] [--duration 10]
        [--connections 32] [--skip-proxy] [--setup-litellm-proxy] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen, a sibling script
from loadgen import raw_load

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PROXY_VENV = ROOT / ".bench-venv-litellm-proxy"
TASK = "support-intents"
ANSWER = "card_arrival"
PERCENTILES = (1, 10, 25, 50, 75, 90, 95, 99, 99.9)


def chat_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "Classify the banking support request."},
            {"role": "user", "content": "I ordered a new card two weeks ago, where is it?"},
        ],
        "temperature": 0,
    }


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@dataclass
class Procs:
    """Every subprocess started, terminated (process group and all) at exit."""

    items: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: list[str],
        log_dir: Path,
        env: dict[str, str | None] | None = None,
    ) -> Proc:
        """Start ``cmd`` in its own session; ``env`` entries set to None are removed."""
        log = log_dir / f"{name}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
            start_new_session=True,
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        popen = proc.popen
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(5)
        # children that outlived their parent (uvicorn / gunicorn workers)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.items)):
            self.stop(proc)


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    """Poll ``url`` until it answers 200, failing early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} before becoming ready:\n"
                f"{proc.tail()}"
            )
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s at {url} ({last}):\n{proc.tail()}")


# -- measurements ---------------------------------------------------------------------------


def summarize(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def pct(p: float) -> float:
        # nearest-rank on the sorted samples, linear interpolation between ranks
        k = (len(ordered) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    out = {f"p{p:g}": round(pct(p), 4) for p in PERCENTILES}
    out["mean"] = round(statistics.fmean(ordered), 4)
    out["stdev"] = round(statistics.pstdev(ordered), 4)
    out["min"] = round(ordered[0], 4)
    out["max"] = round(ordered[-1], 4)
    return out


def sequential(url: str, model: str, requests: int, warmup: int) -> dict[str, Any]:
    """Sequential POSTs on one keep-alive connection; per-request latency in ms."""
    body = json.dumps(chat_body(model)).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer x"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    samples: list[float] = []
    errors: dict[str, int] = {}
    served_by: dict[str, int] = {}
    answer = None
    with httpx.Client(limits=limits, timeout=30) as client:
        for i in range(warmup + requests):
            start = time.perf_counter()
            r = client.post(url, content=body, headers=headers)
            r.read()
            elapsed = (time.perf_counter() - start) * 1000
            if r.status_code != 200:
                key = f"HTTP {r.status_code}: {r.text[:300]}"
                errors[key] = errors.get(key, 0) + 1
                if len(errors) == 1 and sum(errors.values()) == 1:
                    print(f"    ! {key}", file=sys.stderr)
                continue
            if i == 0:
                answer = r.json()["choices"][0]["message"]["content"]
            if i >= warmup:
                samples.append(elapsed)
                tag = r.headers.get("x-distill-served-by")
                if tag:
                    served_by[tag] = served_by.get(tag, 0) + 1
    if not samples:
        raise RuntimeError(f"no successful request to {url}: {errors}")
    return {
        "requests": len(samples),
        "warmup": warmup,
        "errors": errors,
        "answer": answer,
        "served_by": served_by,
        "latency_ms": summarize(samples),
    }


_WRK_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer x"
"""


def _wrk_latency_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    url: str, model: str, duration: float, connections: int, threads: int, workdir: Path
) -> dict[str, Any]:
    script = workdir / f"post-{model}.lua"
    script.write_text(_WRK_LUA.format(body=json.dumps(json.dumps(chat_body(model)))))
    base = ["wrk", f"-t{threads}", f"-c{connections}", "--latency", "-s", str(script)]
    # a short warm-up at the same concurrency, then the measured run
    subprocess.run([*base, "-d2s", url], capture_output=True, check=False, timeout=60)
    proc = subprocess.run(
        [*base, f"-d{duration:g}s", url],
        capture_output=True,
        text=True,
        check=False,
        timeout=duration + 60,
    )
    out = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    lat = {
        f"p{p}": round(_wrk_latency_ms(m.group(1)), 4)
        for p, m in (
            (p, re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)) for p in ("50", "75", "90", "99")
        )
        if m
    }
    if rps is None:
        raise RuntimeError(f"wrk failed (rc {proc.returncode}): {out}\n{proc.stderr}")
    result: dict[str, Any] = {
        "tool": "wrk",
        "requests_per_s": float(rps.group(1)),
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sock.group(1).strip() if sock else None,
        "latency_ms": lat,
        "duration_s": duration,
        "connections": connections,
        "threads": threads,
    }
    return result


def run_raw_load(url: str, model: str, duration: float, connections: int) -> dict[str, Any]:
    """Where wrk is not installed: prebuilt requests on raw sockets (benchmarks/loadgen.py),
    a few microseconds of client CPU per request."""
    parts = urllib.parse.urlsplit(url)
    body = json.dumps(chat_body(model)).encode()
    args = (parts.port or 80, [body])
    raw_load(*args, min(2.0, duration), connections, path=parts.path,
             headers={"authorization": "Bearer x"})  # warm-up
    load = raw_load(*args, duration, connections, path=parts.path,
                    headers={"authorization": "Bearer x"})
    return {
        "tool": "benchmarks/loadgen.py (raw sockets; wrk not installed)",
        "requests_per_s": round((load.ok + load.other) / load.seconds, 1),
        "requests": load.ok + load.other,
        "non_2xx": load.other,
        "socket_errors": None,
        "latency_ms": {},
        "duration_s": duration,
        "connections": connections,
        "threads": 1,
    }


def throughput(url: str, model: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if shutil.which("wrk"):
        return run_wrk(url, model, args.duration, args.connections, args.threads, workdir)
    return run_raw_load(url, model, args.duration, args.connections)


# -- systems --------------------------------------------------------------------------------


def gateway_config(tmp: Path, teacher_port: int) -> Path:
    cfg = tmp / "gateway.yaml"
    cfg.write_text(
        f"""database: sqlite:///{tmp}/bench.db
artifacts: {tmp}/artifacts
default_teacher:
  model: openai/teacher-model
  api_base: http://127.0.0.1:{teacher_port}/v1
  api_key: x
  price: {{input_per_mtok: 2.5, output_per_mtok: 10.0}}
tasks:
  {TASK}:
    plugin: classify
    options: {{labels: [card_arrival, card_linking]}}
server: {{log_level: warning}}
"""
    )
    return cfg


def proxy_config(tmp: Path, teacher_port: int) -> Path:
    cfg = tmp / "proxy.yaml"
    cfg.write_text(
        f"""model_list:
  - model_name: {TASK}
    litellm_params:
      model: openai/teacher-model
      api_base: http://127.0.0.1:{teacher_port}/v1
      api_key: x
litellm_settings:
  set_verbose: false
  json_logs: false
general_settings: {{}}
"""
    )
    return cfg


_PROXY_REQS_SCRIPT = """
import importlib.metadata as m
from packaging.markers import Marker
from packaging.requirements import Requirement
skip = {"litellm-proxy"}             # the split-out package; its code still ships in litellm
unpin = {"litellm-proxy-extras", "litellm-enterprise"}
for line in m.requires("litellm") or []:
    req = Requirement(line)
    if req.marker is None or not req.marker.evaluate({"extra": "proxy"}):
        continue
    if req.marker.evaluate({"extra": ""}):
        continue                     # a base requirement, already installed
    if req.name in skip:
        continue
    print(req.name if req.name in unpin else f"{req.name}{req.specifier}")
"""


def setup_litellm_proxy(version: str | None) -> None:
    """Create the LiteLLM proxy venv: ``pip install 'litellm[proxy]'``.

    Recent litellm releases move part of ``[proxy]`` into a ``litellm-proxy`` distribution
    pinned to the same version, which a registry mirror may not carry; the proxy server
    itself still ships inside ``litellm``. When the plain install fails, install ``litellm``
    and the ``[proxy]`` extra's other requirements (the ``litellm-proxy-extras`` /
    ``litellm-enterprise`` pins relaxed to what the index has).
    """
    spec = f"litellm[proxy]=={version}" if version else "litellm[proxy]"
    print(f"creating {PROXY_VENV} with {spec} ...")
    subprocess.run([sys.executable, "-m", "venv", str(PROXY_VENV)], check=True)
    python = str(PROXY_VENV / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip", "packaging"], check=True)
    if subprocess.run([*pip, spec], check=False).returncode == 0:
        return
    print(f"`pip install {spec}` failed; installing litellm and the [proxy] requirements")
    subprocess.run([*pip, f"litellm=={version}" if version else "litellm"], check=True)
    reqs = subprocess.run(
        [python, "-c", _PROXY_REQS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    subprocess.run([*pip, *reqs], check=True)


def package_version(python: Path, name: str) -> str | None:
    proc = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nproc = None
    with contextlib.suppress(OSError, FileNotFoundError):
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    return {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "litellm_gateway": package_version(VENV_BIN / "python", "litellm"),
        "litellm_proxy": package_version(PROXY_VENV / "bin" / "python", "litellm")
        if (PROXY_VENV / "bin" / "python").exists()
        else None,
        # None when the proxy venv was built without the split-out `litellm-proxy` wheel
        "litellm_proxy_dist": package_version(PROXY_VENV / "bin" / "python", "litellm-proxy")
        if (PROXY_VENV / "bin" / "python").exists()
        else None,
        "wrk": shutil.which("wrk") is not None,
    }


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into SystemExit so that ``finally`` blocks stop subprocesses."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def measure(
    name: str,
    url: str,
    model: str,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    print(f"  {name}: {args.requests} sequential requests ({args.warmup} warm-up) ...")
    result = sequential(url, model, args.requests, args.warmup)
    lat = result["latency_ms"]
    print(f"    p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms  answer={result['answer']!r}")
    print(f"  {name}: throughput, {args.connections} connections for {args.duration:g}s ...")
    result["throughput"] = throughput(url, model, args, workdir)
    print(f"    {result['throughput']['requests_per_s']:.1f} req/s")
    return result


def print_table(results: dict[str, Any]) -> None:
    direct = results.get("teacher_direct")
    rows = [("system", "p50 ms", "p99 ms", "overhead p50", "overhead p99", "req/s")]
    for name, res in results.items():
        if "skipped" in res or "error" in res:
            note = res.get("skipped") or res.get("error", "")
            rows.append((name, "-", "-", "-", "-", f"({note.splitlines()[0][:60]})"))
            continue
        lat = res["latency_ms"]
        if name == "teacher_direct" or direct is None or "latency_ms" not in direct:
            o50 = o99 = "-"
        else:
            o50 = f"{res['overhead_ms']['p50']:+.3f}"
            o99 = f"{res['overhead_ms']['p99']:+.3f}"
        rps = res.get("throughput", {}).get("requests_per_s")
        rows.append(
            (
                name,
                f"{lat['p50']:.3f}",
                f"{lat['p99']:.3f}",
                o50,
                o99,
                f"{rps:.1f}" if rps is not None else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print(
            " | ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests")
    parser.add_argument("--duration", type=float, default=10.0, help="wrk seconds per system")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--skip-proxy", action="store_true", help="do not measure LiteLLM proxy")
    parser.add_argument("--skip-gateway", action="store_true", help="do not measure the gateway")
    parser.add_argument(
        "--setup-litellm-proxy",
        action="store_true",
        help=f"create {PROXY_VENV.name}/ with litellm[proxy] (same litellm version as .venv)",
    )
    parser.add_argument(
        "--proxy-litellm-version",
        default=None,
        help="litellm version for --setup-litellm-proxy (default: the gateway's)",
    )
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = parser.parse_args(argv)

    if args.setup_litellm_proxy:
        version = args.proxy_litellm_version or package_version(VENV_BIN / "python", "litellm")
        setup_litellm_proxy(version)

    if not shutil.which("wrk"):
        print(
            "NOTE: wrk not found (install it with `apt-get install -y wrk`); using "
            "benchmarks/loadgen.py (prebuilt requests on raw sockets) instead.",
            file=sys.stderr,
        )

    procs = Procs()
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    env_common: dict[str, str | None] = {
        "HF_HUB_OFFLINE": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    try:
        with terminate_on_signals():
            teacher_port = free_port()
            teacher = procs.start(
                "teacher",
                [
                    str(VENV_BIN / "python"),
                    "-m",
                    "gateway.testing.teacher_server",
                    "--port",
                    str(teacher_port),
                    "--answer",
                    ANSWER,
                ],
                tmp,
            )
            wait_http(f"http://127.0.0.1:{teacher_port}/v1/models", teacher, 30)
            print(f"teacher on :{teacher_port}")
            results["teacher_direct"] = measure(
                "teacher_direct",
                f"http://127.0.0.1:{teacher_port}/v1/chat/completions",
                "teacher-model",
                args,
                tmp,
            )

            if args.skip_gateway:
                results["gateway"] = {"skipped": "--skip-gateway"}
            else:
                port = free_port()
                cfg = gateway_config(tmp, teacher_port)
                cli = VENV_BIN / "distill-gateway"
                gw = procs.start(
                    "gateway",
                    [
                        str(cli),
                        "serve",
                        "--config",
                        str(cfg),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--workers",
                        "1",
                    ],
                    tmp,
                    env_common,
                )
                try:
                    wait_http(f"http://127.0.0.1:{port}/healthz", gw, args.ready_timeout)
                    print(f"gateway on :{port}")
                    results["gateway"] = measure(
                        "gateway", f"http://127.0.0.1:{port}/v1/chat/completions", TASK, args, tmp
                    )
                except Exception as exc:
                    print(f"gateway FAILED: {exc}\n{gw.tail()}", file=sys.stderr)
                    results["gateway"] = {"error": f"{exc}", "log_tail": gw.tail()}
                finally:
                    procs.stop(gw)

            if args.skip_proxy:
                results["litellm_proxy"] = {"skipped": "--skip-proxy"}
            elif not (PROXY_VENV / "bin" / "litellm").exists():
                note = f"{PROXY_VENV.name}/ absent; run with --setup-litellm-proxy"
                print(f"LiteLLM proxy skipped: {note}")
                results["litellm_proxy"] = {"skipped": note}
            else:
                port = free_port()
                cfg = proxy_config(tmp, teacher_port)
                px = procs.start(
                    "litellm_proxy",
                    [
                        str(PROXY_VENV / "bin" / "litellm"),
                        "--config",
                        str(cfg),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--num_workers",
                        "1",
                    ],
                    tmp,
                    {
                        **env_common,
                        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
                        "LITELLM_LOG": "ERROR",
                        "DATABASE_URL": None,  # no DB: keyless, spend-less local run
                    },
                )
                try:
                    wait_http(f"http://127.0.0.1:{port}/health/liveliness", px, args.ready_timeout)
                    print(f"LiteLLM proxy on :{port}")
                    results["litellm_proxy"] = measure(
                        "litellm_proxy",
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        TASK,
                        args,
                        tmp,
                    )
                except Exception as exc:
                    print(f"LiteLLM proxy FAILED: {exc}", file=sys.stderr)
                    results["litellm_proxy"] = {"error": f"{exc}", "log_tail": px.tail()}
                finally:
                    procs.stop(px)
    finally:
        procs.stop_all()

    direct = results["teacher_direct"]["latency_ms"]
    for name, res in results.items():
        if name != "teacher_direct" and "latency_ms" in res:
            lat = res["latency_ms"]
            res["overhead_ms"] = {
                k: round(lat[k] - direct[k], 4) for k in ("p50", "p90", "p99", "mean")
            }

    machine = machine_info()
    report: dict[str, Any] = {
        "benchmark": "overhead",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "requests": args.requests,
            "warmup": args.warmup,
            "duration_s": args.duration,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "teacher_answer": ANSWER,
            "request_body": chat_body(TASK),
            "note": (
                "overhead = percentile(system) - percentile(teacher_direct); the requests are "
                "not paired, so per-request differences are not reported"
            ),
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    m = machine
    print(f"{m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}")
    print_table(results)
    print(f"\nwritten to {out}")
    ok = all("error" not in r for r in results.values())
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs kept in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
