"""Diagnosis only (``predict_case(nuclei=False)``): the DPT head is skipped, P(PD) is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from mrn_engine.data import load_case
from test_inference_explain import tiny_predictor
from test_inference_predictor import write_case


@pytest.mark.parametrize("tta", [False, True])
def test_without_the_dpt_p_pd_is_identical_and_no_nuclei_are_made(tmp_path, tta):
    predictor = tiny_predictor(tta=tta)
    case = load_case(write_case(tmp_path / "c", seed=3, pd=1))
    calls = []
    handle = predictor.model.res.dpt.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = predictor.predict_case(case)
        n_full = len(calls)
        fast = predictor.predict_case(case, nuclei=False)
    finally:
        handle.remove()
    assert n_full > 0 and len(calls) == n_full  # the diagnosis-only pass ran no DPT
    assert fast.p_pd_folds == pytest.approx(full.p_pd_folds, abs=1e-6)
    assert fast.p_pd == pytest.approx(full.p_pd, abs=1e-6) and fast.call == full.call
    for name in full.roi_tokens[0]:  # masking from the fast pass works the same
        np.testing.assert_allclose(fast.roi_tokens[0][name], full.roi_tokens[0][name], atol=1e-6)
    assert predictor.masked_prediction(fast, ["nm_sn"]).p_pd == pytest.approx(
        predictor.masked_prediction(full, ["nm_sn"]).p_pd, abs=1e-6
    )
    assert fast.seg_source == "none" and full.seg_source == "dpt"
    assert not fast.nuclei.any() and not fast.nm_nuclei.any() and full.nuclei.any()
    assert fast.nuclei.shape == full.nuclei.shape
