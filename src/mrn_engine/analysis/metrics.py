"""Classification metrics (accuracy, ROC AUC, F1, confusion matrix) on top of scikit-learn.

The paper reports accuracy, ROC AUC and F1; its F1 equals its accuracy on a balanced set, which
is the *macro* F1 (mean of the PD and HC F1). ``f1`` is therefore the macro F1 and ``f1_pd`` the
F1 of the PD class alone. With a single class present the ROC AUC is undefined: it is ``nan``
and ``note`` says why (no exception, no scikit-learn warning).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from mrn_engine.errors import InputDataError
from mrn_engine.results import THRESHOLD


@dataclass
class BinaryMetrics:
    """Metrics of one set of binary predictions (1 = PD, 0 = HC).

    Attributes
    ----------
    n, n_pd: number of cases and of PD cases.
    accuracy, auc, f1, f1_pd: scores in [0, 1]; ``auc`` is ``nan`` with one class present.
    confusion: 2x2 ``[[TN, FP], [FN, TP]]`` (rows = truth HC/PD, columns = call HC/PD).
    note: empty, or why a value is undefined.
    """

    n: int
    n_pd: int
    accuracy: float
    auc: float
    f1: float
    f1_pd: float
    confusion: list[list[int]] = field(default_factory=lambda: [[0, 0], [0, 0]])
    threshold: float = THRESHOLD
    note: str = ""

    def as_row(self, **extra: object) -> dict[str, object]:
        """Flat dict for CSV/markdown tables (confusion as tn/fp/fn/tp)."""
        row: dict[str, object] = dict(extra)
        d = asdict(self)
        (tn, fp), (fn, tp) = d.pop("confusion")
        row.update(d)
        row.update(tn=tn, fp=fp, fn=fn, tp=tp)
        return row


def _as_arrays(
    labels: Iterable[int], p_pd: Iterable[float], where: str
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(list(labels), dtype=float)
    p = np.asarray(list(p_pd), dtype=float)
    if y.shape != p.shape or y.ndim != 1:
        raise InputDataError(f"{where}: {y.size} labels but {p.size} probabilities")
    if y.size == 0:
        raise InputDataError(f"{where}: no labelled predictions to score")
    if not np.isin(y, (0, 1)).all():
        raise InputDataError(
            f"{where}: labels must be 0 (HC) or 1 (PD), got {sorted(set(y.tolist()))}"
        )
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise InputDataError(f"{where}: probabilities must be finite and within [0, 1]")
    return y.astype(int), p


def binary_metrics(
    labels: Iterable[int],
    p_pd: Iterable[float],
    *,
    threshold: float = THRESHOLD,
    where: str = "predictions",
) -> BinaryMetrics:
    """Accuracy, ROC AUC, macro/PD F1 and the confusion matrix of P(PD) against labels.

    Parameters
    ----------
    labels: truth per case (0 = HC, 1 = PD).
    p_pd: predicted P(PD) per case.
    threshold: the PD call is ``p_pd >= threshold``.
    where: named in error messages (file or table the values came from).
    """
    y, p = _as_arrays(labels, p_pd, where)
    call = (p >= threshold).astype(int)
    notes = []
    if len(np.unique(y)) < 2:
        auc = math.nan
        notes.append(f"only one class present ({'PD' if y[0] else 'HC'}): ROC AUC undefined")
    else:
        auc = float(roc_auc_score(y, p))
    cm = confusion_matrix(y, call, labels=[0, 1])
    return BinaryMetrics(
        n=int(y.size),
        n_pd=int(y.sum()),
        accuracy=float(accuracy_score(y, call)),
        auc=auc,
        f1=float(f1_score(y, call, average="macro", labels=[0, 1], zero_division=0)),
        f1_pd=float(f1_score(y, call, pos_label=1, zero_division=0)),
        confusion=cm.astype(int).tolist(),
        threshold=threshold,
        note="; ".join(notes),
    )


def roc_points(
    labels: Iterable[int], p_pd: Iterable[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, TPR) of the ROC curve, or ``None`` with fewer than two classes."""
    y, p = _as_arrays(labels, p_pd, "roc")
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr


def fold_metrics(
    oof: Mapping[int, Sequence[Mapping[str, object]]], *, threshold: float = THRESHOLD
) -> list[dict[str, object]]:
    """Out-of-fold metrics: one row per fold, then ``pooled`` over all folds' validation cases.

    Parameters
    ----------
    oof: fold index -> rows with ``label`` and ``p_pd`` (the bundle's ``fold_k/oof.csv``).
    """
    rows: list[dict[str, object]] = []
    all_y: list[int] = []
    all_p: list[float] = []
    for k in sorted(oof):
        y = [int(r["label"]) for r in oof[k]]  # type: ignore[call-overload]
        p = [float(r["p_pd"]) for r in oof[k]]  # type: ignore[arg-type]
        if not y:
            continue
        all_y += y
        all_p += p
        rows.append(
            binary_metrics(y, p, threshold=threshold, where=f"fold_{k}/oof.csv").as_row(
                set=f"fold {k}"
            )
        )
    if all_y and len(rows) > 1:
        rows.append(
            binary_metrics(all_y, all_p, threshold=threshold, where="oof").as_row(set="pooled OOF")
        )
    return rows


def ensemble_metrics(
    labels: Sequence[int],
    p_pd_folds: Sequence[Sequence[float]],
    *,
    fold_names: Sequence[str] | None = None,
    threshold: float = THRESHOLD,
) -> list[dict[str, object]]:
    """Held-out metrics of every fold model and of their mean (the ensemble).

    Parameters
    ----------
    labels: truth per case.
    p_pd_folds: per case, P(PD) of each fold model (same fold order for every case).
    fold_names: names of the folds (default ``fold 0`` ...).
    """
    arr = np.asarray(p_pd_folds, dtype=float)
    if arr.ndim != 2 or arr.shape[0] != len(labels):
        raise InputDataError(
            f"held-out predictions: expected ({len(labels)}, n_folds) probabilities, got {arr.shape}"
        )
    names = (
        list(fold_names) if fold_names is not None else [f"fold {k}" for k in range(arr.shape[1])]
    )
    rows = [
        binary_metrics(labels, arr[:, j], threshold=threshold, where=names[j]).as_row(set=names[j])
        for j in range(arr.shape[1])
    ]
    rows.append(
        binary_metrics(labels, arr.mean(axis=1), threshold=threshold, where="ensemble").as_row(
            set="ensemble"
        )
    )
    return rows
