"""The "uncertain" flag of a case: a documented rule on the ensemble's P(PD).

A case is **uncertain** when at least one of these holds (P(PD) calibrated when the bundle is):

1. ``near-threshold``: ``|P(PD) - THRESHOLD| < MARGIN`` (0.10): the call would flip with a
   small change of the probability;
2. ``fold-spread``: the standard deviation of the fold models' P(PD) exceeds ``FOLD_SPREAD``
   (0.15): the models trained on different folds disagree;
3. ``tta-spread`` (only with TTA): for some fold, ``|P(PD) original - P(PD) mirrored|`` exceeds
   ``TTA_SPREAD`` (0.10): the call depends on the left/right orientation.

Otherwise it is **confident**. The thresholds are module constants (and parameters), not fitted
to any cohort; ``mrn report`` gives the accuracy on confident vs uncertain cases and the share
flagged so that they can be judged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mrn_engine.results import THRESHOLD, call_of

#: half-width of the band around the threshold that is flagged
MARGIN: float = 0.10
#: largest accepted standard deviation of the fold models' P(PD)
FOLD_SPREAD: float = 0.15
#: largest accepted |original - mirrored| P(PD) of one fold (TTA on)
TTA_SPREAD: float = 0.10


@dataclass(frozen=True)
class Uncertainty:
    """The flag of one case and what it was decided from."""

    uncertain: bool
    reasons: tuple[str, ...]
    distance: float  #: |P(PD) - THRESHOLD|
    fold_spread: float  #: std of the fold P(PD)
    tta_spread: float | None  #: max over folds of |original - mirrored|, None without TTA

    @property
    def label(self) -> str:
        """``"uncertain (near-threshold, fold-spread)"`` or ``"confident"``."""
        return f"uncertain ({', '.join(self.reasons)})" if self.uncertain else "confident"

    def record(self) -> dict[str, object]:
        """JSON form: the flag, its reasons, the rule's inputs and the limits it used."""
        return {
            "uncertain": self.uncertain,
            "label": self.label,
            "reasons": list(self.reasons),
            "inputs": {
                "distance": self.distance,
                "fold_spread": self.fold_spread,
                "tta_spread": self.tta_spread,
            },
            "rule": {
                "threshold": THRESHOLD,
                "margin": MARGIN,
                "fold_spread": FOLD_SPREAD,
                "tta_spread": TTA_SPREAD,
            },
        }


def assess(
    p_pd: float,
    p_pd_folds: Sequence[float] = (),
    tta_spread: Sequence[float] | None = None,
    *,
    margin: float = MARGIN,
    fold_spread: float = FOLD_SPREAD,
    tta_limit: float = TTA_SPREAD,
    threshold: float = THRESHOLD,
) -> Uncertainty:
    """Apply the rule (module docstring) to one case's ensemble P(PD) and per-fold values."""
    distance = abs(float(p_pd) - threshold)
    spread = float(np.std(p_pd_folds)) if len(p_pd_folds) else 0.0
    tta = max(tta_spread) if tta_spread else None
    reasons = []
    if distance < margin:
        reasons.append("near-threshold")
    if spread > fold_spread:
        reasons.append("fold-spread")
    if tta is not None and tta > tta_limit:
        reasons.append("tta-spread")
    return Uncertainty(bool(reasons), tuple(reasons), distance, spread, tta)


def assess_prediction(pred: object) -> Uncertainty:
    """:func:`assess` of a ``CasePrediction`` (uses its TTA spread when TTA was on)."""
    return assess(
        pred.p_pd,
        getattr(pred, "p_pd_folds", ()),
        getattr(pred, "tta_spread", None) or None,
    )


def assess_row(row: Mapping[str, object]) -> Uncertainty:
    """:func:`assess` of a prediction table row (``p_pd``, ``p_pd_fold<k>``, ``tta_spread``)."""
    folds = [float(v) for k, v in row.items() if k.startswith("p_pd_fold") and v not in ("", None)]
    tta = row.get("tta_spread")
    tta_list = [float(tta)] if tta not in (None, "") and not math.isnan(float(tta)) else None
    return assess(float(row["p_pd"]), folds, tta_list)


def confidence_summary(
    labels: Iterable[int], flags: Iterable[Uncertainty], p_pd: Iterable[float]
) -> dict[str, float]:
    """Share flagged and accuracy on confident / uncertain cases (NaN when a group is empty)."""
    y = np.asarray(list(labels), dtype=int)
    flagged = np.asarray([f.uncertain for f in flags], dtype=bool)
    correct = np.asarray([call_of(p) for p in p_pd], dtype=int) == y

    def acc(sel: np.ndarray) -> float:
        return float(correct[sel].mean()) if sel.any() else math.nan

    return {
        "n": int(y.size),
        "n_uncertain": int(flagged.sum()),
        "share_uncertain": float(flagged.mean()) if y.size else math.nan,
        "accuracy_all": acc(np.ones_like(flagged)),
        "accuracy_confident": acc(~flagged),
        "accuracy_uncertain": acc(flagged),
    }
