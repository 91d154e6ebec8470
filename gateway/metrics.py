"""Prometheus metrics, one registry per app (several apps can live in one process).

With several workers per replica, set PROMETHEUS_MULTIPROC_DIR and /metrics aggregates
the workers' files (prometheus-client's multiprocess mode): counters and histograms add
up; each gauge says how its workers' values combine (the promise and the threshold are
the same everywhere, the audited agreement takes the lowest worker's, savings add up),
and the traffic store's figures are kept in the workers' files too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.store import TrafficStore

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "distill_requests",
            "Chat requests answered.",
            ["task", "served_by", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "distill_request_latency_seconds",
            "Time from request to full response.",
            ["task", "served_by"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "distill_gateway_overhead_seconds",
            "Latency the gateway adds: request latency minus time waiting on the teacher.",
            ["task", "served_by"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.teacher_tokens = Counter(
            "distill_teacher_tokens",
            "Tokens billed by teachers.",
            ["task", "model", "kind"],
            registry=r,
        )
        self.teacher_cost = Counter(
            "distill_teacher_cost_usd",
            "Teacher cost in USD.",
            ["task", "model"],
            registry=r,
        )
        self.teacher_attempts = Counter(
            "distill_teacher_attempts",
            "Calls to teacher models, by outcome.",
            ["task", "model", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "distill_errors",
            "Errors answered to clients, by OpenAI error type.",
            ["task", "type"],
            registry=r,
        )
        self.invalid_targets = Counter(
            "distill_invalid_teacher_answers",
            "Teacher answers the task could not parse into a target.",
            ["task"],
            registry=r,
        )

        self.student_confidence = Histogram(
            "distill_student_confidence",
            "Student confidence on requests it was asked.",
            ["task"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        self.student_passed_over = Counter(
            "distill_student_passed_over",
            "Requests sent straight to the teacher without asking the active student, which "
            "answered less than policy.min_share of the recent requests it was asked, or "
            "failed a moment ago (backing off after an error).",
            ["task"],
            registry=r,
        )
        self.student_errors = Counter(
            "distill_student_errors",
            "Requests escalated because the active student failed to predict (an exception, "
            "e.g. its generation server is down or timed out).",
            ["task"],
            registry=r,
        )
        self.student_share = Gauge(
            "distill_student_share",
            "Share of this task's answers served by the student (since start).",
            ["task"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.student_threshold = Gauge(
            "distill_student_threshold",
            "Confidence threshold of the active student.",
            ["task"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.audits = Counter(
            "distill_audits",
            "Student answers checked against the teacher, by outcome.",
            ["task", "outcome"],
            registry=r,
        )
        self.target_agreement = Gauge(
            "distill_target_agreement",
            "The promise: the task's policy.target_agreement (a line to read the audited "
            "agreement against).",
            ["task"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.audited_agreement = Gauge(
            "distill_audited_agreement",
            "Estimated end-to-end agreement with the teacher from audits of the active "
            "student (1 - share served x audited disagreement rate).",
            ["task"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.threshold_adjustments = Counter(
            "distill_threshold_adjustments",
            "Thresholds raised because audits showed the promise at risk.",
            ["task"],
            registry=r,
        )
        self.drift_actions = Counter(
            "distill_drift_actions",
            "Drift guard actions (raise_threshold, rollback).",
            ["task", "action"],
            registry=r,
        )
        self.filter_examples = Counter(
            "distill_filter_examples",
            "Examples each curation filter kept, changed or dropped in training rounds.",
            ["task", "filter", "outcome"],
            registry=r,
        )
        self.training_rounds = Counter(
            "distill_training_rounds",
            "Training rounds by outcome.",
            ["task", "outcome"],
            registry=r,
        )
        self.counterfactual_cost = Counter(
            "distill_counterfactual_teacher_cost_usd",
            "What the teacher alone would have cost for the same traffic (estimated for "
            "student answers from the task's average teacher cost).",
            ["task"],
            registry=r,
        )
        self.savings = Gauge(
            "distill_savings_usd",
            "Counterfactual teacher cost minus actual cost, audits included (since start).",
            ["task"],
            multiprocess_mode="livesum",
            registry=r,
        )

    def count_round(self, summary: dict[str, Any]) -> None:
        """Metrics from a round's summary (it may have run in another process)."""
        task = summary["task"]
        outcome = (
            "failed"
            if summary.get("failed")
            else "promoted"
            if summary.get("promoted")
            else "candidate"
            if summary.get("version")
            else "skipped"
        )
        self.training_rounds.labels(task, outcome).inc()
        filters = (summary.get("curation") or {}).get("filters") or {}
        for name, counts in filters.items():
            for kind in ("kept", "changed", "dropped"):
                self.filter_examples.labels(task, name, kind).inc(counts.get(kind, 0))

    def watch_store(self, store: TrafficStore) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            store.after_batch = _StoreFiles(store, self.registry).sync
        else:
            self.registry.register(_StoreCollector(store))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_STORE_COUNTERS = (
    ("written", "Records inserted into the database."),
    ("spooled", "Records written to the spool file."),
    ("replayed", "Spooled records replayed into the database."),
    ("db_errors", "Failed database writes."),
)
_QUEUE_DEPTH_DOC = "Records waiting for the writer."


class _StoreCollector(Collector):
    """Reads the writer's counters at scrape time, so the hot path pays nothing."""

    def __init__(self, store: TrafficStore) -> None:
        self._store = store

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._store
        yield GaugeMetricFamily("distill_store_queue_depth", _QUEUE_DEPTH_DOC,
                                value=s.queue_depth)
        for name, doc in _STORE_COUNTERS:
            yield CounterMetricFamily(f"distill_store_{name}", doc, value=getattr(s, name))


class _StoreFiles:
    """Multiprocess mode: the same figures as file-backed metrics, so that a scrape adds up
    every worker's; the writer thread brings them up to date after each batch (it wakes at
    least once a second), never the request path."""

    def __init__(self, store: TrafficStore, registry: CollectorRegistry) -> None:
        self._store = store
        self._counters = {name: Counter(f"distill_store_{name}", doc, registry=registry)
                          for name, doc in _STORE_COUNTERS}
        self._seen = dict.fromkeys(self._counters, 0)
        self._depth = Gauge("distill_store_queue_depth", _QUEUE_DEPTH_DOC,
                            multiprocess_mode="livesum", registry=registry)

    def sync(self) -> None:
        for name, counter in self._counters.items():
            value = getattr(self._store, name)
            if value != self._seen[name]:
                counter.inc(value - self._seen[name])
                self._seen[name] = value
        self._depth.set(self._store.queue_depth)
