"""The ``--controls`` of ``docs/scripts/evidence_localisation.py`` (issue 15): the content-free
control is leave-one-out on a neutral-tissue volume, and occlusion is a real forward with one
slice's image set to neutral tissue."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from docs_scripts import load_docs_script
from mrn_engine.models.evidence import capture_slice_tokens, slice_evidence
from test_models_evidence import images, tiny_model


def p_pd(model, rois):
    with torch.no_grad():
        return torch.softmax(model(rois, with_seg=False).logits.float(), dim=-1)[:, 1]


def test_control_is_neutral_volume_leave_one_out_and_occlusion_a_real_forward():
    torch.set_num_threads(1)
    script = load_docs_script("evidence_localisation")
    cfg, model = tiny_model()
    rois = images(cfg, batch=1, seed=7)
    pad = 40.0
    loads = []
    predictor = SimpleNamespace(
        model=model,
        folds=[0],
        ensemble=SimpleNamespace(load=loads.append),
        calibration=None,
    )
    crops = {n: SimpleNamespace(pad_value=pad) for n in rois}
    cache: dict = {}
    out = script.control_evidence(predictor, rois, crops, "nm_sn", cache)
    n = rois["nm_sn"].shape[1]
    assert loads == [0] and list(cache) == [(0, "nm_sn", pad)]
    # occlusion: P(PD) - P(PD with slice s's image := pad), each a from-scratch forward
    p_full = p_pd(model, rois)
    for s in range(n):
        x = rois["nm_sn"].clone()
        x[:, s] = pad
        ref = (p_full - p_pd(model, {**rois, "nm_sn": x})).item()
        assert abs(out["occlusion"][s] - ref) < 1e-5, s
    assert np.ptp(out["occlusion"]) > 1e-5  # the image content does move P(PD)
    # control: leave-one-out with the ROI's image replaced by neutral tissue everywhere
    neutral = {**rois, "nm_sn": torch.full_like(rois["nm_sn"], pad)}
    with torch.no_grad(), capture_slice_tokens(model) as store:
        model(neutral, with_seg=False)
    expect = slice_evidence(model, dict(store)).evidence["nm_sn"][0].numpy()
    np.testing.assert_allclose(out["control"], expect, atol=1e-6)
    assert np.abs(out["control"]).min() > 1e-5  # no content, yet evidence: removal + position
    # the neutral volume's tokens are cached (ROI branches are independent until the head):
    # a second case reuses them and still gets its own context's control
    other = images(cfg, batch=1, seed=8)
    again = script.control_evidence(predictor, other, crops, "nm_sn", cache)
    assert len(cache) == 1
    with torch.no_grad(), capture_slice_tokens(model) as store:
        model({**other, "nm_sn": neutral["nm_sn"]}, with_seg=False)
    expect = slice_evidence(model, dict(store)).evidence["nm_sn"][0].numpy()
    np.testing.assert_allclose(again["control"], expect, atol=1e-6)
    assert np.abs(again["control"] - out["control"]).max() > 1e-6  # the context does matter
