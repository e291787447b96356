"""Checks that turn a wrong answer that looks right (NaN probability) into a clear case error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrn_engine.errors import MRNError


class NonFiniteOutputError(MRNError):
    """The network produced a NaN/Inf logit or probability for a case (no call can be made)."""


def check_finite_probabilities(
    case_id: str, folds: Sequence[int], p_folds: Sequence[float]
) -> None:
    """Raise :class:`NonFiniteOutputError` naming the case and the folds with non-finite P(PD).

    A NaN probability would otherwise become ``p_pd >= 0.5 == False``, i.e. a confident HC call.
    """
    p = np.asarray(p_folds, dtype=np.float64)
    bad = [int(k) for k, v in zip(folds, p, strict=False) if not np.isfinite(v)]
    if bad or not np.isfinite(p).all():
        raise NonFiniteOutputError(
            f"{case_id}: the network output a non-finite logit/probability (NaN or Inf) for "
            f"fold(s) {bad or list(folds)}; no call is made for this case (corrupt weights or "
            "input values outside what the model can handle)"
        )
