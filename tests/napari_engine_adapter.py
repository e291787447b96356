"""TEMPORARY (delete when the arch branch of issue 11 is merged): the redesigned engine API that
napari_mrn codes against, laid over main's predictor for the napari tests only.

- ``CasePrediction.probabilities``: a ``Probabilities`` record;
- ``MRNPredictor.masked_prediction`` -> ``Probabilities``;
- ``MRNPredictor.masking_table`` -> 16 ``Probabilities`` (``MASK_SUBSETS`` order).

:func:`install` does nothing once the engine has these itself.
"""

from __future__ import annotations

import dataclasses

import pytest

from mrn_engine.inference import predictor as engine
from mrn_engine.results import Probabilities


def engine_has_new_api() -> bool:
    return "probabilities" in {f.name for f in dataclasses.fields(engine.CasePrediction)}


def install(mp: pytest.MonkeyPatch) -> None:
    if engine_has_new_api():
        return
    from mrn_engine.analysis.masking import MASK_SUBSETS

    def probabilities(self: engine.CasePrediction) -> Probabilities:
        return Probabilities.from_folds(self.folds, self.p_pd_folds, self.zeroed)

    def masked_prediction(self, pred, masked):  # noqa: ANN001, ANN202
        subset = frozenset(masked)
        return Probabilities.from_folds(pred.folds, self._masked_probs(pred, [subset])[0], subset)

    def masking_table(self, pred):  # noqa: ANN001, ANN202
        probs = self._masked_probs(pred, list(MASK_SUBSETS))
        rows = zip(probs, MASK_SUBSETS, strict=True)
        return [Probabilities.from_folds(pred.folds, p, s) for p, s in rows]

    mp.setattr(engine.CasePrediction, "probabilities", property(probabilities), raising=False)
    mp.setattr(engine.MRNPredictor, "masked_prediction", masked_prediction)
    mp.setattr(engine.MRNPredictor, "masking_table", masking_table)


@pytest.fixture(scope="module", autouse=True)
def new_engine_api():
    """Module-wide :func:`install` (import this fixture into a test module to use it)."""
    with pytest.MonkeyPatch.context() as mp:
        install(mp)
        yield
