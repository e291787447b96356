"""``model.nuclei_pool``: slice tokens + the projected mean of their patch tokens inside the
nuclei masks (models/res.py); masks are then a model input, and per-slice evidence still
equals a forward with the slice deleted."""

from __future__ import annotations

import pytest
import torch

from mrn_engine.errors import InputDataError
from mrn_engine.models.evidence import capture_slice_tokens, slice_evidence
from mrn_engine.models.res import nuclei_mean
from test_models_evidence import SLICES, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.roi.image_size
    rois = {n: torch.rand(batch, k, s, s, generator=g) * 255 for n, k in cfg.roi.slices.items()}
    masks = {n: torch.zeros(batch, k, s, s, dtype=torch.long) for n, k in cfg.roi.slices.items()}
    for m in masks.values():
        m[:, :, 8:20, 4:14] = 1
        m[:, :, 8:20, 14:24] = 2
    return rois, masks


def test_nuclei_mean_weights_patches_by_their_nucleus_share():
    torch.manual_seed(1)
    tokens = torch.randn(1, 2, 4, 3)  # B=1, S=2, 2 x 2 patch grid, D=3
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    masks[0, 0, :2, :2] = 3  # slice 0: all of patch (0, 0), any class counts
    masks[0, 0, 2, 2:] = 1  # and half of patch (1, 1)
    out = nuclei_mean(tokens, masks, (2, 2))
    expected = (tokens[0, 0, 0] * 1.0 + tokens[0, 0, 3] * 0.5) / 1.5
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], torch.zeros(3))  # slice 1 has no nucleus voxel


def test_nuclei_pool_reads_the_masks_and_needs_them():
    cfg, model = tiny_model(nuclei_pool=True)
    assert model.needs_masks
    rois, masks = inputs(cfg)
    with torch.no_grad():
        a = model(rois, masks).logits
        moved = {n: torch.roll(m, shifts=6, dims=-1) for n, m in masks.items()}
        b = model(rois, moved).logits
    assert (a - b).abs().max() > 1e-4  # where the nuclei are changes the call
    with pytest.raises(InputDataError, match="'nm_sn'.*nuclei_pool needs nuclei masks"):
        model(rois)
    _, plain = tiny_model()  # the paper's MRN ignores masks
    assert not plain.needs_masks and plain.res.nuclei_proj is None
    with torch.no_grad():
        torch.testing.assert_close(plain(rois, masks).logits, plain(rois, moved).logits)


def test_leave_one_slice_out_with_nuclei_pool_equals_deleting_the_slice():
    cfg, model = tiny_model(nuclei_pool=True)
    rois, masks = inputs(cfg)
    with torch.no_grad(), capture_slice_tokens(model) as store:
        out = model(rois, masks)
    ev = slice_evidence(model, dict(store))
    torch.testing.assert_close(ev.p_full, torch.softmax(out.logits, -1)[:, 1], atol=1e-6, rtol=0)
    current = {"roi": None}

    def res_pre(module, args, kwargs):
        current["roi"] = args[1]

    for roi, k in SLICES.items():
        for s in range(k):

            def drop(module, args, roi=roi, s=s):
                x = args[0]
                if current["roi"] != roi:
                    return None
                return (torch.cat([x[:, :s], x[:, s + 1 :]], 1),)

            h1 = model.res.sfa.register_forward_pre_hook(drop)
            h2 = model.res.register_forward_pre_hook(res_pre, with_kwargs=True)
            try:
                with torch.no_grad():
                    ref = torch.softmax(model(rois, masks).logits, -1)[:, 1]
            finally:
                h1.remove()
                h2.remove()
            torch.testing.assert_close(ev.p_without[roi][:, s], ref, atol=1e-5, rtol=0)


def test_predictor_feeds_the_case_masks_and_masks_rois_consistently(tmp_path):
    """Through MRNPredictor (folds, TTA): the nuclei-pool model gets the case's masks, and an
    ROI masked by head passes equals a full forward with that ROI's volume and masks zeroed."""
    from mrn_engine.data import load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.models import build_model
    from test_inference_predictor import write_case

    cfg, _ = tiny_model(nuclei_pool=True)
    states = {k: tiny_model(nuclei_pool=True)[1].state_dict() for k in (0, 1)}
    for k, state in states.items():  # two different folds
        state["res.nuclei_proj.1.bias"] = state["res.nuclei_proj.1.bias"] + k
    predictor = MRNPredictor(build_model(cfg), states, cfg, device="cpu", tta=True)
    case = load_case(write_case(tmp_path / "c", pd=1))
    pred = predictor.predict_case(case)
    assert 0.0 < pred.p_pd < 1.0
    masked = predictor.masked_prediction(pred, {"nm_sn"}).p_pd
    zeroed = predictor.predict_case(case, zero_rois={"nm_sn"}).p_pd
    assert masked == pytest.approx(zeroed, abs=1e-5)
    assert abs(masked - pred.p_pd) > 1e-5  # masking moved the call: the check can fail
