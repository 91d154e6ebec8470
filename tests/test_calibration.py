"""The threshold keeps the promise on fresh data; the naive one does not."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.calibration import audit_bound, calibrate, naive_threshold, tighten, upper_bound


def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A student whose chance of agreeing rises with its confidence."""
    confidence = rng.beta(5, 1.5, n)
    agrees = rng.random(n) < confidence**0.5
    return confidence, agrees


def end_to_end(threshold: float | None, confidence: np.ndarray, agrees: np.ndarray) -> float:
    if threshold is None:
        return 1.0
    served = confidence >= threshold
    return 1.0 - float(np.mean(served & ~agrees))


def test_upper_bound_is_clopper_pearson() -> None:
    assert upper_bound(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    assert upper_bound(5, 100, 0.95) > 0.05
    assert upper_bound(3, 3, 0.95) == 1.0 and upper_bound(0, 0, 0.95) == 1.0


def test_promise_holds_on_fresh_data_where_the_naive_threshold_breaks_it() -> None:
    target = 0.97
    kept = naive_kept = 0
    shares = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        conf, ok = sample(rng, 800)
        fresh_conf, fresh_ok = sample(rng, 20_000)
        c = calibrate(conf, ok, target, 0.95)
        kept += end_to_end(c.threshold, fresh_conf, fresh_ok) >= target
        naive_kept += end_to_end(naive_threshold(conf, ok, target), fresh_conf, fresh_ok) >= target
        shares.append(c.coverage)
    assert kept >= 57  # the bound holds at 95% confidence: about 3 misses in 60 at most
    assert naive_kept < 45  # the point estimate misses about half the time
    assert 0.2 < float(np.mean(shares)) < 0.9  # and the student still serves a real share


def test_calibration_figures() -> None:
    conf = [0.99] * 90 + [0.5] * 10
    ok = [True] * 90 + [False] * 10
    c = calibrate(conf, ok, 0.9, 0.95)
    assert c.threshold == 0.99 and c.coverage == pytest.approx(0.9)
    assert c.agreement == 1.0 and c.student_agreement == pytest.approx(0.9)
    assert c.margin == pytest.approx(c.disagreement_bound)
    assert c.curve[0]["coverage"] <= c.curve[-1]["coverage"]
    hopeless = calibrate([0.9] * 10, [False] * 10, 0.97)
    assert hopeless.threshold is None and hopeless.coverage == 0.0


def test_audits_tighten_the_threshold() -> None:
    rng = np.random.default_rng(1)
    conf, ok = sample(rng, 2000)
    base = calibrate(conf, ok, 0.97)
    stricter = tighten(conf, ok, 0.97, factor=2.0)
    assert base.threshold is not None and stricter.threshold is not None
    assert stricter.threshold > base.threshold and stricter.coverage < base.coverage
    assert audit_bound(100, 0, 0.5, 0.95) < audit_bound(100, 5, 0.5, 0.95)


def test_audits_without_disagreement_never_breach() -> None:
    from gateway.calibration import audit_breach, lower_bound

    # 30 clean audits cannot prove a 3% budget, but they show no breach either
    assert audit_breach(30, 0, 0.6, 0.95) == 0.0
    assert audit_breach(30, 1, 0.6, 0.95) < 0.03
    assert audit_breach(30, 25, 0.6, 0.95) > 0.03
    assert 0.0 < lower_bound(5, 100, 0.95) < 0.05 < upper_bound(5, 100, 0.95)
