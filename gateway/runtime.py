"""What one app holds: settings, plugins, the configured tasks, the store and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway.config import (
    ConfigError,
    Settings,
    StudentConfig,
    TeacherConfig,
    format_validation_error,
)
from gateway.curation import build_chain
from gateway.interfaces import Filter, Task
from gateway.metrics import GatewayMetrics
from gateway.plugins import Plugins, load_plugins
from gateway.redaction import record_transform, redactor_of
from gateway.registry import Registry
from gateway.store import ExchangeRecord, TrafficStore
from gateway.students import StudentPool
from gateway.teacher import TeacherClient

PASSTHROUGH_TASK = "passthrough"


@dataclass
class TaskRuntime:
    """A configured task: its plugin object and its teacher client."""

    name: str | None  # None for pass-through traffic (a model name that is not a task)
    task: Task
    teacher: TeacherClient
    filters: list[tuple[str, Filter]] = field(default_factory=list)
    metric_label: str = field(init=False)
    requests: int = 0  # answered since start, for the student-share gauge
    student_served: int = 0
    teacher_cost_ema: float | None = None  # average teacher cost of one answer
    counterfactual_usd: float = 0.0  # teacher-only cost of the same traffic
    actual_usd: float = 0.0  # what was paid, audits included

    def observe_teacher_cost(self, cost: float) -> None:
        # An exponential average follows price or prompt-length drift without storing history.
        if self.teacher_cost_ema is None:
            self.teacher_cost_ema = cost
        else:
            self.teacher_cost_ema += 0.02 * (cost - self.teacher_cost_ema)

    def __post_init__(self) -> None:
        # Pass-through model names are client-chosen: one label keeps cardinality bounded.
        self.metric_label = self.name if self.name is not None else "(passthrough)"


def configured_trainer(settings: Settings, name: str, task: Task) -> str | None:
    """The trainer of task ``name``'s student: the config's, else the task plugin's default."""
    return settings.tasks[name].student.trainer or task.default_trainer


def _check_student(name: str, student: StudentConfig, default: str | None,
                   plugins: Plugins) -> None:
    """A misspelt trainer or a bad trainer option is a config error at start-up, not a
    failed training round hours later."""
    trainer = student.trainer or default
    if trainer is None:
        return
    try:
        trainer_class = plugins.trainers.get(trainer)
    except KeyError as exc:
        key = "trainer" if student.trainer else "trainer (the task's default)"
        raise ConfigError(
            f"invalid configuration:\n  tasks.{name}.student.{key}: {exc.args[0]}"
        ) from None
    try:
        trainer_class.Options.model_validate(student.options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(
            exc, trainer_class.Options, ("tasks", name, "student", "options"))) from None


def build_tasks(
    settings: Settings, plugins: Plugins, metrics: GatewayMetrics | None = None
) -> tuple[dict[str, TaskRuntime], TaskRuntime | None]:
    """Instantiate every configured task; errors name the config key that is wrong."""

    def teacher_client(name: str, config: TeacherConfig) -> TeacherClient:
        if metrics is None:
            return TeacherClient(config)
        attempts = metrics.teacher_attempts

        def on_attempt(model: str, outcome: str) -> None:
            attempts.labels(name, model, outcome).inc()

        return TeacherClient(config, on_attempt=on_attempt)

    tasks: dict[str, TaskRuntime] = {}
    for name, config in settings.tasks.items():
        try:
            task_class = plugins.tasks.get(config.plugin)
        except KeyError as exc:
            raise ConfigError(
                f"invalid configuration:\n  tasks.{name}.plugin: {exc.args[0]}"
            ) from None
        try:
            options = task_class.Options.model_validate(config.options)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, task_class.Options, ("tasks", name, "options"))
            ) from None
        _check_student(name, config.student, task_class.default_trainer, plugins)
        teacher = config.teacher or settings.default_teacher
        if teacher is None:
            raise ConfigError(
                f"invalid configuration:\n  tasks.{name}.teacher: required when no "
                "default_teacher is configured"
            )
        chain = build_chain(name, config.filters, plugins)
        tasks[name] = TaskRuntime(
            name, task_class(name, options), teacher_client(name, teacher), chain
        )

    passthrough = None
    if settings.default_teacher is not None:
        task_class = plugins.tasks.get(PASSTHROUGH_TASK)
        task = task_class(PASSTHROUGH_TASK, task_class.Options())
        passthrough = TaskRuntime(
            None, task, teacher_client("(passthrough)", settings.default_teacher)
        )
    return tasks, passthrough


class Runtime:
    """Per-app state, built by create_app and reached through FastAPI dependencies."""

    def __init__(self, settings: Settings, plugins: Plugins | None = None) -> None:
        self.settings = settings
        self.plugins = plugins or load_plugins(settings.plugins)
        self.metrics = GatewayMetrics()
        self.tasks, self.passthrough = build_tasks(settings, self.plugins, self.metrics)
        hook = self.plugins.manager.hook

        def recorded(record: ExchangeRecord) -> None:
            hook.exchange_recorded(record=record)

        redactors = {}
        for name, runtime in self.tasks.items():
            redact = redactor_of(runtime.filters)
            if redact is not None and settings.tasks[name].redact_records:
                redactors[name] = redact
        self.store = TrafficStore(
            settings.database,
            settings.spool_dir,
            settings.store,
            on_recorded=recorded,
            transform=record_transform(redactors),
        )
        self.metrics.watch_store(self.store)
        self.registry = Registry(self.store.engine, settings.artifact_store())
        guards = {name: (task.policy.min_share, task.policy.min_share_window)
                  for name, task in settings.tasks.items()}
        students = {name: (configured_trainer(settings, name, self.tasks[name].task),
                           task.student.options) for name, task in settings.tasks.items()}
        self.students = StudentPool(self.registry, self.plugins, self.tasks, guards, students)

        def swapped(task: str, version: str | None) -> None:
            loaded = self.students.get(task)
            threshold = loaded.threshold if loaded is not None else None
            self.metrics.student_threshold.labels(task).set(
                threshold if threshold is not None else float("nan")
            )

        self.students.on_swap = swapped
        for name in self.trainable_tasks():
            self.metrics.target_agreement.labels(name).set(
                settings.tasks[name].policy.target_agreement
            )

    def trainable_tasks(self) -> list[str]:
        """Tasks with a student trainer (configured, or the task plugin's default)."""
        return [
            name
            for name, runtime in self.tasks.items()
            if configured_trainer(self.settings, name, runtime.task)
            in self.plugins.trainers
        ]

    def resolve(self, model: str) -> TaskRuntime | None:
        """The task a request's ``model`` names, else pass-through, else None."""
        runtime = self.tasks.get(model)
        return runtime if runtime is not None else self.passthrough

    async def aclose(self) -> None:
        """Close the teachers' connection pools."""
        clients = [t.teacher for t in self.tasks.values()]
        if self.passthrough is not None:
            clients.append(self.passthrough.teacher)
        for client in clients:
            await client.close()
        self.students.close()
