"""ROI masking (paper Table 4) from cached ROI tokens: head passes only, never the backbone.

A masked ROI's input is replaced by an empty (all-zero) volume. ROI branches are independent
until the head, so the masked logits equal ``classify_tokens`` with the masked ROIs' tokens
replaced by the fold's *empty token* (the token of an all-zero volume), computed once per fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError
from mrn_engine.models.ensemble import FoldEnsemble, p_pd_of
from mrn_engine.results import Probabilities

#: progress callback: (fraction done in [0, 1], message)
ProgressFn = Callable[[float, str], None]


def check_subset(subset: frozenset[str], where: str = "masking") -> None:
    """``InputDataError`` for ROI names that are not in ``ROI_NAMES``."""
    unknown = subset - set(ROI_NAMES)
    if unknown:
        raise InputDataError(
            f"{where}: unknown ROI name(s) {sorted(unknown)}; use {list(ROI_NAMES)}"
        )


class RoiMasker:
    """Masked P(PD) of a predicted case for any ROI subset, from its per-fold ROI tokens."""

    def __init__(self, ensemble: FoldEnsemble) -> None:
        self.ensemble = ensemble
        self._empty: dict[int, dict[str, torch.Tensor]] = {}  # fold -> ROI -> token (1, D)

    @property
    def can_mask(self) -> bool:
        """Whether the model classifies ROI tokens (``classify_tokens`` + ``empty_token``)."""
        model = self.ensemble.model
        return hasattr(model, "classify_tokens") and hasattr(model, "empty_token")

    def empty_tokens(self, k: int) -> dict[str, torch.Tensor]:
        """Fold ``k``'s tokens of empty ROI volumes, computed once and cached."""
        if k not in self._empty:
            self.ensemble.load(k)
            model = self.ensemble.model
            self._empty[k] = self.ensemble.step(
                lambda names: {n: model.empty_token(n, 1).detach().float() for n in names},
                ROI_NAMES,
            )
        return self._empty[k]

    def warm(self, progress: ProgressFn | None = None) -> bool:
        """Compute every fold's empty tokens now; False (nothing done) when the model cannot mask."""
        if not self.can_mask:
            return False
        folds = self.ensemble.folds
        for i, k in enumerate(folds):
            self.empty_tokens(k)
            if progress:
                progress((i + 1) / len(folds), f"ROI masking: fold {k} ready")
        return True

    def ready(self) -> bool:
        """True when every fold's empty tokens are cached."""
        return all(k in self._empty for k in self.ensemble.folds)

    def probabilities(
        self,
        case_id: str,
        roi_tokens: Sequence[dict[str, torch.Tensor]],
        folds: Sequence[int],
        subsets: Sequence[frozenset[str]],
    ) -> list[Probabilities]:
        """One :class:`Probabilities` per subset, from the case's per-fold ROI tokens.

        Raises
        ------
        InputDataError: no tokens (not an MRN model), a model without a token head, tokens
            of other folds than the ensemble's, or an unknown ROI name.
        """
        if not roi_tokens or not roi_tokens[0]:
            raise InputDataError(f"{case_id}: the model gives no ROI tokens; masking needs MRN")
        if not self.can_mask:
            name = type(self.ensemble.model).__name__
            raise InputDataError(f"{case_id}: model {name} cannot classify ROI tokens")
        if list(folds) != self.ensemble.folds:
            raise InputDataError(
                f"{case_id}: prediction made with folds {list(folds)}, "
                f"predictor has {self.ensemble.folds}"
            )
        for s in subsets:
            check_subset(s)
        p = np.zeros((len(subsets), len(folds)))
        device = self.ensemble.device
        for j, k in enumerate(self.ensemble.folds):
            self.ensemble.load(k)
            base = {n: t.to(device) for n, t in roi_tokens[j].items()}
            views = next(iter(base.values())).shape[0]
            empty = self.empty_tokens(k)
            for i, s in enumerate(subsets):
                toks = {
                    n: (empty[n].expand(views, -1).to(base[n].dtype) if n in s else base[n])
                    for n in ROI_NAMES
                }
                logits = self.ensemble.step(self.ensemble.model.classify_tokens, toks)
                p[i, j] = float(p_pd_of(logits).mean())
        return [Probabilities.from_folds(folds, p[i], masked=s) for i, s in enumerate(subsets)]
