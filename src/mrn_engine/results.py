"""Typed prediction records shared by the engine, the CLI and the napari panel.

One decision rule lives here: :data:`THRESHOLD` (P(PD) at or above it = PD). Every P(PD)
summary - a case's ensemble, a masked ROI subset, a table row - is a :class:`Probabilities`
built by :meth:`Probabilities.from_folds` from the per-fold probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mrn_engine.data.labels import ROI_NAMES

#: P(PD) at or above this is called PD (1), below it HC (0)
THRESHOLD: float = 0.5

#: the two calls, by value
CALL_NAMES: dict[int, str] = {0: "HC", 1: "PD"}


def call_of(p_pd: float, threshold: float = THRESHOLD) -> int:
    """1 (PD) when ``p_pd >= threshold``, else 0 (HC)."""
    return int(p_pd >= threshold)


@dataclass(frozen=True)
class Probabilities:
    """P(PD) of one case under one input condition (all ROIs, or some ROIs masked).

    Attributes
    ----------
    folds: fold indices, in the order of ``p_pd_folds``.
    p_pd_folds: P(PD) of each fold model (TTA-averaged when TTA is on).
    p_pd: ensemble P(PD): the mean over folds, or an ensemble calibration's combination.
    p_pd_std: standard deviation over folds (0 for one fold).
    call: 1 = PD, 0 = HC (``p_pd >= THRESHOLD``).
    masked: ROI names whose input was replaced by an empty volume (empty = none).
    """

    folds: tuple[int, ...]
    p_pd_folds: tuple[float, ...]
    p_pd: float
    p_pd_std: float
    call: int
    masked: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_folds(
        cls,
        folds: Sequence[int],
        p_pd_folds: Sequence[float] | np.ndarray,
        masked: Iterable[str] = (),
        p_pd: float | None = None,
    ) -> Probabilities:
        """The one constructor: mean, spread and call from the per-fold probabilities.

        ``p_pd``: the ensemble P(PD) when it is not the plain mean (an ensemble calibration,
        ``training.ensemble_calibration``); the spread is still that of the folds.
        """
        p = np.asarray(p_pd_folds, dtype=np.float64).reshape(-1)
        if len(folds) != p.size or p.size == 0:
            raise ValueError(f"{len(folds)} fold indices for {p.size} fold probabilities")
        masked = frozenset(masked)
        unknown = masked - set(ROI_NAMES)
        if unknown:
            raise ValueError(f"unknown ROI name(s) {sorted(unknown)}; use {list(ROI_NAMES)}")
        mean = float(p.mean()) if p_pd is None else float(p_pd)
        return cls(
            folds=tuple(int(k) for k in folds),
            p_pd_folds=tuple(float(x) for x in p),
            p_pd=mean,
            p_pd_std=float(p.std()),
            call=call_of(mean),
            masked=masked,
        )

    @property
    def call_name(self) -> str:
        """``"PD"`` or ``"HC"``."""
        return CALL_NAMES[self.call]

    @property
    def masked_names(self) -> list[str]:
        """The masked ROI names in ROI order."""
        return [n for n in ROI_NAMES if n in self.masked]

    def row(self) -> dict[str, object]:
        """Flat columns for CSV/JSON: ``p_pd_fold{k}``, ``p_pd``, ``p_pd_std``, ``call``."""
        out: dict[str, object] = {
            f"p_pd_fold{k}": p for k, p in zip(self.folds, self.p_pd_folds, strict=True)
        }
        out.update(p_pd=self.p_pd, p_pd_std=self.p_pd_std, call=self.call)
        return out
