"""Choosing the confidence threshold that keeps the quality promise.

The promise: of ALL answers, a share ``target`` agrees with what the teacher would say.
Teacher answers agree by definition, so only student answers that disagree count against
it: at threshold t the end-to-end disagreement is D(t) = P(confidence >= t and wrong).

We estimate D(t) on teacher labels the serving student never trained on, and bound it
from above (Clopper-Pearson, one-sided, level ``1 - confidence_level``) instead of
trusting the point estimate. Thresholds are tested from the most to the least
conservative and we stop at the first one whose bound exceeds ``1 - target``: fixed-
sequence testing (as in Learn-then-Test), so scanning many thresholds does not inflate the
chance of breaking the promise. Live audits then correct the choice (see ``tighten``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# The beta quantile from scipy.special: scipy.stats would add ~50 MB to every serving process.
from scipy.special import betaincinv


def upper_bound(errors: int, n: int, confidence_level: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial proportion."""
    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(betaincinv(errors + 1, n - errors, confidence_level))


@dataclass
class Calibration:
    target: float
    confidence_level: float
    n: int  # held-out teacher labels used
    threshold: float | None  # None: no threshold keeps the promise; teacher only
    coverage: float  # share the student serves at the threshold (held-out estimate)
    agreement: float  # end-to-end agreement at the threshold (point estimate)
    disagreement_bound: float  # the upper bound that was tested against 1 - target
    student_agreement: float  # agreement of the student on everything (no threshold)
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def margin(self) -> float:
        """How much the bound sits above the point estimate of disagreement."""
        return self.disagreement_bound - (1.0 - self.agreement)


def calibrate(
    confidences: Sequence[float],
    agrees: Sequence[bool],
    target: float,
    confidence_level: float = 0.95,
    curve_points: int = 50,
) -> Calibration:
    """The lowest threshold (largest share served) whose disagreement bound keeps the
    promise, found by fixed-sequence testing from the highest threshold down."""
    conf = np.asarray(confidences, dtype=float)
    ok = np.asarray(agrees, dtype=bool)
    n = int(conf.size)
    budget = 1.0 - target
    if n == 0:
        return Calibration(target, confidence_level, 0, None, 0.0, 1.0, 1.0, 0.0)
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    wrong_so_far = np.cumsum(~ok)
    # Candidate thresholds: each distinct confidence, served = all items at or above it.
    last_of_value = np.r_[conf[1:] != conf[:-1], True]
    candidates = np.flatnonzero(last_of_value)
    chosen: int | None = None
    bound_at_choice = 1.0
    for index in candidates:
        errors = int(wrong_so_far[index])
        bound = upper_bound(errors, n, confidence_level)
        if bound > budget:
            break
        chosen, bound_at_choice = int(index), bound
    curve = _curve(conf, wrong_so_far, candidates, n, confidence_level, curve_points)
    student_agreement = float(ok.mean())
    if chosen is None:
        return Calibration(
            target,
            confidence_level,
            n,
            None,
            0.0,
            1.0,
            upper_bound(0, n, confidence_level),
            student_agreement,
            curve,
        )
    served = chosen + 1
    return Calibration(
        target=target,
        confidence_level=confidence_level,
        n=n,
        threshold=float(conf[chosen]),
        coverage=served / n,
        agreement=1.0 - int(wrong_so_far[chosen]) / n,
        disagreement_bound=bound_at_choice,
        student_agreement=student_agreement,
        curve=curve,
    )


def _curve(
    conf: np.ndarray,
    wrong: np.ndarray,
    candidates: np.ndarray,
    n: int,
    confidence_level: float,
    points: int,
) -> list[dict[str, float]]:
    picks = (
        candidates
        if len(candidates) <= points
        else candidates[np.unique(np.linspace(0, len(candidates) - 1, points).round().astype(int))]
    )
    return [
        {
            "threshold": float(conf[i]),
            "coverage": (int(i) + 1) / n,
            "agreement": 1.0 - int(wrong[i]) / n,
            "agreement_bound": 1.0 - upper_bound(int(wrong[i]), n, confidence_level),
        }
        for i in picks
    ]


def naive_threshold(
    confidences: Sequence[float], agrees: Sequence[bool], target: float
) -> float | None:
    """The baseline the promise breaks with: the point estimate, no margin."""
    conf = np.asarray(confidences, dtype=float)
    ok = np.asarray(agrees, dtype=bool)
    if conf.size == 0:
        return None
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    wrong = np.cumsum(~ok) / conf.size
    fits = np.flatnonzero(wrong <= 1.0 - target)
    return float(conf[fits[-1]]) if fits.size else None


def audit_bound(
    served_audits: int, served_disagreements: int, share_served: float, confidence_level: float
) -> float:
    """Upper bound on the live end-to-end disagreement: the share served times the bound
    on the audited disagreement rate among student answers."""
    return share_served * upper_bound(served_disagreements, served_audits, confidence_level)


def lower_bound(errors: int, n: int, confidence_level: float) -> float:
    """One-sided Clopper-Pearson lower bound on a binomial proportion."""
    if n == 0 or errors <= 0:
        return 0.0
    return float(betaincinv(errors, n - errors + 1, 1.0 - confidence_level))


def audit_breach(
    served_audits: int, served_disagreements: int, share_served: float, confidence_level: float
) -> float:
    """Lower bound on the live end-to-end disagreement. Above ``1 - target`` the audits
    show, beyond their statistical margin, that the promise is broken; a few audits with
    no disagreement never trigger it (an upper bound would, for lack of evidence)."""
    return share_served * lower_bound(served_disagreements, served_audits, confidence_level)


def tighten(
    confidences: Sequence[float],
    agrees: Sequence[bool],
    target: float,
    factor: float,
    confidence_level: float = 0.95,
) -> Calibration:
    """Recalibrate as if the student were ``factor`` times as wrong as the held-out data
    says (factor = live audited error / held-out error at the current threshold): the
    promise is kept against what audits show, not what calibration hoped."""
    budget = (1.0 - target) / max(factor, 1.0)
    return calibrate(confidences, agrees, 1.0 - budget, confidence_level)
