from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.cli import app as cli
from gateway.config import ConfigError, load_settings
from gateway.plugins import load_plugins
from gateway.runtime import build_tasks

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_issue_example_config_validates() -> None:
    settings = load_settings(EXAMPLE)
    task = settings.tasks["support-intents"]
    assert task.plugin == "classify"
    assert task.teacher is not None and task.teacher.model == "openai/gpt-4o"
    assert task.teacher.price is not None and task.teacher.price.output_per_mtok == 10.0
    assert task.options == {"labels": ["card_arrival", "card_linking"]}
    assert settings.default_teacher is not None
    assert settings.default_teacher.model == "openai/gpt-4o-mini"
    tasks, passthrough = build_tasks(settings, load_plugins())
    assert set(tasks) == {"support-intents", "banking-requests", "clean-questions"}
    assert passthrough is not None
    extract = settings.tasks["banking-requests"]
    assert extract.plugin == "extract" and extract.teacher is None  # the default teacher
    assert extract.student.trainer == "structured-extractor"
    rewrite = settings.tasks["clean-questions"]
    assert rewrite.plugin == "rewrite" and rewrite.student.trainer == "deletion-tagger"


def test_embedded_defaults() -> None:
    settings = load_settings(None)
    assert settings.database == "sqlite:///./distill.db"
    assert settings.artifacts == "./artifacts"
    assert settings.server.max_body_bytes == 1024 * 1024


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  a:\n    plugin: classify\n    teachr: {model: x}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "tasks.a.teachr: unknown key" in message
    assert "teacher" in message  # lists what was expected


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"databse: unknown key \(expected one of: .*database"):
        load_settings(write(tmp_path, "databse: sqlite:///x.db\n"))


def test_wrong_type_names_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, "default_teacher:\n  model: m\n  timeout_s: soon\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "default_teacher.timeout_s: Input should be a valid number" in str(info.value)
    assert "'soon'" in str(info.value)


def test_fallback_errors_are_indexed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "default_teacher:\n  model: m\n  fallbacks:\n    - {model: ok}\n    - {modl: bad}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "default_teacher.fallbacks[1].model: Field required" in str(info.value)
    assert "default_teacher.fallbacks[1].modl: unknown key" in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "tasks: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")


def test_bad_database_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="database: Value error, expected a sqlite"):
        load_settings(write(tmp_path, "database: mysql://x\n"))


def test_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path, "database: sqlite:///a.db\ndefault_teacher:\n  model: m\n  timeout_s: 3\n"
    )
    monkeypatch.setenv("DISTILL_DATABASE", "postgresql://u@127.0.0.1:5432/test")
    monkeypatch.setenv("DISTILL_DEFAULT_TEACHER__TIMEOUT_S", "9")
    monkeypatch.setenv("DISTILL_SERVER__PORT", "9999")
    settings = load_settings(path)
    assert settings.database == "postgresql+psycopg://u@127.0.0.1:5432/test"
    assert settings.default_teacher is not None
    assert settings.default_teacher.timeout_s == 9 and settings.default_teacher.model == "m"
    assert settings.server.port == 9999


def test_bad_env_override_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_SERVER__PORT", "high")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(None)


def test_api_key_is_secret(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "default_teacher: {model: m, api_key: sk-123}\n"))
    assert "sk-123" not in repr(settings) and "sk-123" not in str(settings.model_dump())
    assert settings.default_teacher is not None
    assert settings.default_teacher.resolve_api_key() == "sk-123"
    with pytest.raises(ConfigError, match="either api_key or api_key_env"):
        load_settings(write(tmp_path, "default_teacher: {model: m, api_key: a, api_key_env: B}\n"))


def test_task_plugin_and_options_are_checked(tmp_path: Path) -> None:
    plugins = load_plugins()
    unknown = load_settings(
        write(tmp_path, "default_teacher: {model: m}\ntasks:\n  t: {plugin: clasify}\n")
    )
    with pytest.raises(
        ConfigError,
        match=r"tasks.t.plugin: unknown task 'clasify' "
        r"\(registered: classify, extract, passthrough",
    ):
        build_tasks(unknown, plugins)
    bad_options = load_settings(
        write(
            tmp_path,
            "default_teacher: {model: m}\ntasks:\n  t:\n"
            "    plugin: classify\n"
            "    options: {labels: [a, A]}\n",
        )
    )
    with pytest.raises(ConfigError, match=r"tasks\.t\.options\.labels: .*distinct"):
        build_tasks(bad_options, plugins)
    typo = load_settings(
        write(
            tmp_path,
            "default_teacher: {model: m}\ntasks:\n  t:\n"
            "    plugin: classify\n    options: {label: [a]}\n",
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"tasks.t.options.label: unknown key \(expected one "
        r"of: input, labels, max_label_chars\)",
    ):
        build_tasks(typo, plugins)
    no_teacher = load_settings(write(tmp_path, "tasks:\n  t: {plugin: classify}\n"))
    with pytest.raises(ConfigError, match=r"tasks\.t\.teacher: required"):
        build_tasks(no_teacher, plugins)


def test_student_trainer_and_its_options_are_checked(tmp_path: Path) -> None:
    plugins = load_plugins()

    def settings(student: str) -> Any:
        return load_settings(write(tmp_path, "default_teacher: {model: m}\ntasks:\n  t:\n"
                                   f"    plugin: extract\n    student: {student}\n"))

    with pytest.raises(ConfigError, match=r"tasks\.t\.student\.trainer: unknown trainer "
                       r"'structured-extractr' \(registered: deletion-tagger, "
                       r"embedding-classifier, lora-lm, "
                       r"structured-extractor"):
        build_tasks(settings("{trainer: structured-extractr}"), plugins)
    with pytest.raises(ConfigError, match=r"tasks\.t\.student\.options\.max_iter: Input "
                       r"should be greater than 0"):
        build_tasks(settings("{trainer: structured-extractor, options: {max_iter: 0}}"),
                    plugins)
    # no trainer named: the task's default (lora-lm for extract) checks the options
    with pytest.raises(ConfigError, match=r"tasks\.t\.student\.options\.rnk: unknown key"):
        build_tasks(settings("{options: {rnk: 8}}"), plugins)
    tasks, _ = build_tasks(settings("{trainer: structured-extractor, options: "
                                    "{labels_mlp_hidden: 0}}"), plugins)
    assert tasks["t"].task.default_trainer == "lora-lm"


def test_check_config_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["check-config", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert "support-intents" in ok.output and "openai/gpt-4o" in ok.output
    bad = runner.invoke(cli, ["check-config", str(write(tmp_path, "tasks: {t: {plugn: x}}\n"))])
    assert bad.exit_code == 2
    assert "tasks.t.plugn: unknown key" in bad.output
