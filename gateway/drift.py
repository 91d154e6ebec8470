"""The drift guard: when audits show the promise at risk, act, and say why.

Audited agreement is checked over a window of recent audits. When the lower bound on the
live disagreement rises above ``1 - target`` (a breach beyond the statistical margin, not
just too few audits to prove the promise), the guard recalibrates the threshold as if
the student were as wrong as the audits show. If no threshold of this version keeps the
promise, it rolls the task back to the previous version (or to the teacher alone). Every
action is an event (``events`` table), a log line and ``distill_drift_actions_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.calibration import tighten, upper_bound
from gateway.events import record_event
from gateway.students import LiveStats, LoadedStudent

if TYPE_CHECKING:
    from gateway.runtime import Runtime, TaskRuntime

log = logging.getLogger("distill_gateway.drift")


def stricter_threshold(loaded: LoadedStudent, target: float, level: float) -> float | None:
    """A threshold for this version that keeps the promise against the audited error
    rate, or None when none does."""
    if loaded.held_out is None or loaded.threshold is None:
        return None
    stats = loaded.stats
    confidences, agrees = loaded.held_out
    served = [ok for c, ok in zip(confidences, agrees, strict=True) if c >= loaded.threshold]
    wrong = served.count(False)
    expected = wrong / len(served) if wrong else upper_bound(0, len(served), level)
    observed = upper_bound(stats.audit_disagreements, stats.audits, level)
    stricter = tighten(confidences, agrees, target, observed / max(expected, 1e-6), level)
    if stricter.threshold is None:
        return None
    return max(stricter.threshold, loaded.threshold)


class DriftGuard:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def act(self, task: TaskRuntime, loaded: LoadedStudent, bound: float) -> None:
        policy = self.runtime.settings.tasks[loaded.task].policy
        stats = loaded.stats
        details = {
            "version": loaded.version,
            "audits": stats.audits,
            "disagreements": stats.audit_disagreements,
            "share_served": round(stats.share_served, 4),
            "agreement_upper_bound": round(1.0 - bound, 4),
            "target": policy.target_agreement,
            "threshold": loaded.threshold,
        }
        threshold = stricter_threshold(loaded, policy.target_agreement, policy.confidence_level)
        previous = loaded.threshold
        loaded.stats = LiveStats()  # fresh evidence for the new setting
        loaded.guard.reset()
        metrics = self.runtime.metrics
        registry = self.runtime.registry
        engine = self.runtime.store.engine
        if threshold is not None:
            loaded.threshold = threshold
            action = "raise_threshold"
            message = (
                f"audited agreement at most {1.0 - bound:.4f} < target "
                f"{policy.target_agreement}: threshold {previous} -> {threshold:.4f}"
            )
            work: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
                (registry.set_threshold, (loaded.task, loaded.version, threshold))
            ]
        else:
            loaded.threshold = None  # stop serving from this replica at once
            action = "rollback"
            message = (
                f"audited agreement at most {1.0 - bound:.4f} < target "
                f"{policy.target_agreement} and no threshold of {loaded.version} "
                "keeps the promise: rolled back"
            )
            work = [(registry.rollback, (loaded.task,))]
        details["new_threshold"] = threshold
        metrics.drift_actions.labels(task.metric_label, action).inc()
        metrics.threshold_adjustments.labels(task.metric_label).inc()
        metrics.student_threshold.labels(task.metric_label).set(
            threshold if threshold is not None else float("nan")
        )
        log.warning("drift guard, task %s: %s", loaded.task, message)
        work.append((record_event, (engine, loaded.task, f"drift_{action}", message, details)))

        def persist() -> None:
            # Every replica polls the registry, so they all follow this decision.
            for function, args in work:
                function(*args)

        job = asyncio.get_running_loop().run_in_executor(None, persist)
        job.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("drift guard could not store its decision: %s", future.exception())
