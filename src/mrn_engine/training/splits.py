"""Stratified k-fold splits of the labelled cases (paper 4.1: 5 folds, seed 1)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from mrn_engine.errors import InputDataError, MRNWarning


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: the cases it trains on and its out-of-fold cases."""

    index: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train_ids), "val": list(self.val_ids)}


def make_folds(labels: Mapping[str, int], n_folds: int = 5, seed: int = 1) -> list[Fold]:
    """Split labelled cases into ``n_folds`` stratified folds (scikit-learn ``StratifiedKFold``).

    Parameters
    ----------
    labels : case id -> 0 (HC) / 1 (PD).
    n_folds : number of folds (>= 2).
    seed : shuffling seed; the same labels and seed always give the same folds.

    Returns
    -------
    list of Fold, each case in exactly one fold's ``val_ids``.
    """
    if n_folds < 2:
        raise InputDataError(f"folds={n_folds}: cross-validation needs at least 2 folds")
    ids = sorted(labels)
    y = np.asarray([int(labels[c]) for c in ids])
    counts = np.bincount(y, minlength=2)
    if counts.min() < n_folds:
        raise InputDataError(
            f"labelled cases: {n_folds} stratified folds need at least {n_folds} cases per class, "
            f"got {int(counts[0])} HC and {int(counts[1])} PD"
        )
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (tr, va) in enumerate(skf.split(np.zeros(len(ids)), y)):
        folds.append(Fold(k, tuple(ids[i] for i in tr), tuple(ids[i] for i in va)))
    return folds


def warn_split_duplicates(
    folds: list[Fold], duplicates: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Warn (``MRNWarning``) about duplicate pairs whose cases sit in different folds' val sets.

    Returns the offending pairs.
    """
    fold_of = {c: f.index for f in folds for c in f.val_ids}
    split = [
        (a, b) for a, b in duplicates if a in fold_of and b in fold_of and fold_of[a] != fold_of[b]
    ]
    for a, b in split:
        warnings.warn(
            f"{a} and {b} have byte-identical NM images but fall into different folds "
            f"({fold_of[a]} and {fold_of[b]}): out-of-fold scores may be optimistic",
            MRNWarning,
            stacklevel=2,
        )
    return split
