"""Configuration: one YAML file, validated with pydantic, overridden by ``DISTILL_*`` variables.

Precedence, highest first: keyword arguments, environment (``DISTILL_DATABASE``,
``DISTILL_TASKS__SUPPORT_INTENTS__TEACHER__MODEL`` …), the YAML file, the defaults.
Unknown keys are errors, and every error names the dotted path of the bad key.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.artifacts import ArtifactStore, is_url

DEFAULT_DATABASE = "sqlite:///./distill.db"
CONFIG_ENV_VAR = "DISTILL_CONFIG_FILE"


class ConfigError(ValueError):
    """A configuration file or override that does not validate; the message names each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceConfig(_Strict):
    """USD per million tokens; overrides litellm's price map for this teacher."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class TeacherEndpoint(_Strict):
    """One teacher model reached through litellm."""

    model: str = Field(min_length=1, description="any litellm model string, e.g. openai/gpt-4o")
    api_base: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    num_retries: int = Field(default=2, ge=0, le=10)
    price: PriceConfig | None = None
    transport: Literal["auto", "litellm", "http"] = Field(
        default="auto",
        description="auto: direct HTTP for OpenAI-compatible endpoints, "
        "litellm.acompletion for every other provider",
    )
    extra_params: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for litellm.acompletion"
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> TeacherEndpoint:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give either api_key or api_key_env, not both")
        return self

    def resolve_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env is not None:
            return os.environ.get(self.api_key_env)
        return None


class TeacherConfig(TeacherEndpoint):
    """The primary teacher plus fallback teachers of the same shape, tried in order."""

    fallbacks: list[TeacherEndpoint] = Field(default_factory=list)

    def chain(self) -> list[TeacherEndpoint]:
        return [self, *self.fallbacks]


class StudentConfig(_Strict):
    trainer: str | None = Field(
        default=None, description="registered trainer plugin; default: the task's own choice"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="the trainer's options")


class PolicyConfig(_Strict):
    target_agreement: float = Field(
        default=0.97,
        gt=0,
        le=1,
        description="promised share of all answers that match what the teacher would say",
    )
    audit_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="share of student answers also sent to the teacher, off the response path",
    )
    min_examples: int = Field(default=200, ge=10, description="train the first student at")
    retrain_every: int = Field(default=500, ge=1, description="new examples between trainings")
    holdout_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="teacher labels kept out of training (by a hash of the input) to calibrate",
    )
    confidence_level: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="confidence of the upper bound put on the student's disagreement rate",
    )
    retrain_interval_s: float | None = Field(
        default=None, gt=0, description="also retrain on this schedule when new data came in"
    )
    calibration: Literal["crossfit", "bound", "naive"] = Field(
        default="crossfit",
        description="crossfit: one model per fold of the inputs (by hash), each input "
        "answered by the model that never trained on it, threshold from an upper confidence "
        "bound on all labels (trainers that cannot cross-fit use bound); bound: the same "
        "bound on the held-out labels alone; naive: a cross-validated point estimate applied "
        "to a student retrained on everything (a baseline, it breaks the promise)",
    )
    calibration_folds: int = Field(
        default=5, ge=2, le=20, description="folds (models) when calibration is crossfit"
    )
    min_share: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="an active student that answered less than this share of the last "
        "min_share_window (or more) requests it was asked is asked only one request in 10 "
        "until it answers more; the rest go straight to the teacher without waiting for "
        "its prediction (0: always ask)",
    )
    min_share_window: int = Field(
        default=200, ge=10, description="requests the student's share is judged over"
    )
    drift_window: int = Field(
        default=500, ge=30, description="audits the drift guard looks back over"
    )
    keep_versions: int = Field(
        default=5, ge=1, description="artifacts kept besides the active version"
    )


FilterSpec = str | dict[str, dict[str, Any]]


class TaskConfig(_Strict):
    plugin: str = Field(min_length=1, description="name of a registered task plugin")
    student: StudentConfig = Field(default_factory=StudentConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    filters: list[FilterSpec] = Field(
        default_factory=lambda: list[FilterSpec](DEFAULT_FILTERS),
        description="curation chain: filter names, or {name: {options}} mappings",
    )
    redact_records: bool = Field(
        default=True,
        description="when a filter of the chain redacts (pii), redact the raw "
        "traffic records too, before they are stored; false keeps them verbatim",
    )
    teacher: TeacherConfig | None = Field(
        default=None, description="defaults to default_teacher when omitted"
    )
    options: dict[str, Any] = Field(default_factory=dict)


# The curation chain when a task names none: validity, duplicates, PII, length bounds.
DEFAULT_FILTERS: tuple[str, ...] = ("valid", "dedup", "pii", "length")


class LoopConfig(_Strict):
    enabled: bool = Field(default=True, description="train in the background of the gateway")
    interval_s: float = Field(default=5.0, gt=0, description="how often triggers are checked")
    subprocess: bool = Field(
        default=True,
        description="train in a child process at lower priority, so serving "
        "keeps the cores and the GIL",
    )
    nice: int = Field(default=10, ge=0, le=19, description="priority of the training process")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    registry_poll_s: float = Field(
        default=2.0, gt=0, description="how often a replica looks for newly promoted students"
    )
    max_concurrent_audits: int = Field(
        default=32, ge=0, description="audits in flight at once; more are skipped, not queued"
    )


class StoreConfig(_Strict):
    queue_size: int = Field(default=10_000, gt=0, description="records held in memory")
    batch_size: int = Field(default=256, gt=0)
    flush_interval_ms: int = Field(default=50, gt=0)
    spool_dir: str | None = Field(
        default=None,
        description="where records wait while the database is down; defaults to <artifacts>/spool",
    )
    retry_interval_s: float = Field(default=1.0, gt=0)
    run_migrations: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DISTILL_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database: str = DEFAULT_DATABASE
    artifacts: str = Field(
        default="./artifacts",
        description="where student artifacts live: a directory, or an object-storage URL "
        "(s3://bucket/prefix; any fsspec backend installed) shared by every replica",
    )
    artifacts_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the object store's fsspec storage options (e.g. endpoint_url, key, "
        "secret for s3://; credentials can also come from the backend's usual environment)",
    )
    artifacts_cache: str = Field(
        default="./artifacts-cache",
        description="with an object-storage URL: the local directory where rounds stage "
        "artifacts and replicas keep the versions they load (and the spool by default)",
    )
    default_teacher: TeacherConfig | None = None
    tasks: dict[str, TaskConfig] = Field(default_factory=dict)
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    plugins: list[str] = Field(
        default_factory=list,
        description="extra plugin modules to load by import path, beside the entry points",
    )

    @field_validator("database")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("expected a sqlite:/// or postgresql+psycopg:// URL")
        if value.startswith("postgresql://") or value.startswith("postgres://"):
            # psycopg 3 is the driver we ship; make the short form work.
            value = "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @field_validator("artifacts")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if is_url(value):
            from fsspec import get_filesystem_class

            protocol = value.split("://", 1)[0]
            try:
                get_filesystem_class(protocol)
            except (ImportError, ValueError) as exc:
                raise ValueError(
                    f"no fsspec backend for {protocol}:// ({exc}); install it "
                    "(s3://: pip install 'distill-gateway[s3]')"
                ) from None
        return value

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for name in value:
            if not name or name.strip() != name or "/" in name:
                raise ValueError(f"task name {name!r} must be non-empty, without spaces or '/'")
        return value

    @property
    def local_artifacts(self) -> Path:
        """The artifacts directory on this machine: the object store's local cache when
        artifacts live at a URL."""
        return Path(self.artifacts_cache if is_url(self.artifacts) else self.artifacts)

    @property
    def spool_dir(self) -> Path:
        return Path(self.store.spool_dir or self.local_artifacts / "spool")

    @property
    def feature_cache_dir(self) -> Path:
        """Where trainers and filters keep features between rounds (``feature_cache: auto``,
        unless ``DISTILL_FEATURE_CACHE`` says otherwise): beside the local artifacts."""
        return self.local_artifacts / "features"

    def artifact_store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts, self.artifacts_cache, self.artifacts_options)

    def teacher_for(self, task: str) -> TeacherConfig | None:
        config = self.tasks[task]
        return config.teacher or self.default_teacher

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file is passed as init kwargs by load_settings; env must win over it.
        return env_settings, init_settings


def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after", "function-before") or str(item).startswith(
            ("function-", "constrained-")
        ):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _expected_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys allowed where an unknown key was found, for a helpful error."""
    current: Any = model
    for item in loc[:-1]:
        current = _strip_optional(current)
        origin = get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(item))
            if field is None:
                return None
            current = field.annotation
        elif origin is dict:
            current = get_args(current)[1]  # item is the key
        elif origin is list:
            current = get_args(current)[0]  # item is the index
        else:
            return None
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def format_validation_error(
    error: ValidationError,
    model: type[BaseModel] = Settings,
    prefix: tuple[str, ...] = (),
) -> str:
    """One line per error, each naming the dotted path of the key (under ``prefix``)."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = _format_location(prefix + loc)
        if item["type"] == "extra_forbidden":
            expected = _expected_keys(model, loc)
            hint = f" (expected one of: {', '.join(expected)})" if expected else ""
            lines.append(f"{where}: unknown key{hint}")
            continue
        message = item["msg"]
        value = item.get("input")
        shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
        lines.append(f"{where}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file at ``path`` (or $DISTILL_CONFIG_FILE), apply env overrides, validate."""
    data: dict[str, Any] = {}
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR) or None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping at the top level")
        data = loaded
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
