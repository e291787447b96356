"""MRNPredictor with a small, fully controlled model: fold ensemble, TTA, masks, ROI masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mrn_engine.badinput import cases as badinput_cases
from mrn_engine.config import get_preset
from mrn_engine.data import load_case
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.data.roi_subsets import MASK_SUBSETS
from mrn_engine.errors import InputDataError, WeightsError
from mrn_engine.inference import MRNPredictor
from mrn_engine.models import MRNOutput
from mrn_engine.results import THRESHOLD
from mrn_engine.rois import extract_rois

# ---------------------------------------------------------------------------- shared helpers
#: a tiny co-registered case in the challenge layout (NM, QSM and optionally both masks); the
#: same writer the bad-input corpus starts from
write_case = badinput_cases.write_case


class FakeMRN(nn.Module):
    """Tiny stand-in with MRN's interface: tokens from image statistics, 1x1x1-conv DPT."""

    needs_masks = False

    def __init__(self, seed: int, with_seg: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.ModuleDict({n: nn.Linear(3, 4) for n in ROI_NAMES})
        self.seg = nn.ModuleDict(
            {n: nn.Conv3d(1, ROI_BY_NAME[n].num_classes, 1) for n in ROI_NAMES}
        )
        self.head = nn.Linear(16, 2)
        self.with_seg = with_seg
        self.backbone_calls = 0

    def _token(self, name: str, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-2], device=x.device)[:, None]  # not mirror-invariant
        f = (
            torch.stack([x.mean((1, 2, 3)), (x * ramp).mean((1, 2, 3)) * 4, x.amax((1, 2, 3))], -1)
            / 255
        )
        return torch.tanh(self.enc[name](f))

    def forward(self, rois):
        self.backbone_calls += 1
        tokens = {n: self._token(n, rois[n]) for n in ROI_NAMES}
        seg = (
            {n: self.seg[n](rois[n][:, None] / 255 - 0.3) for n in ROI_NAMES}
            if self.with_seg
            else None
        )
        patient = torch.cat([tokens[n] for n in ROI_NAMES], 1)
        return MRNOutput(
            logits=self.classify_tokens(tokens), roi_tokens=tokens, seg_logits=seg, patient=patient
        )

    def classify_tokens(self, tokens, masked=frozenset()):
        batch = next(iter(tokens.values())).shape[0]
        return self.head(
            torch.cat(
                [self.empty_token(n, batch) if n in masked else tokens[n] for n in ROI_NAMES], 1
            )
        )

    def empty_token(self, name, batch=1):
        return torch.tanh(self.enc[name](torch.zeros(batch, 3)))


# "pad": paste-back is exact; cpu-tiny's own "resample" is approximate in z when a box is
# longer than its stack (docs/data.md), which the paste-back test below would not tolerate
CFG = get_preset("cpu-tiny").replace(roi={"slice_policy": "pad"})


def fake_predictor(*, folds=(0, 1), tta=False, with_seg=True, **kw) -> MRNPredictor:
    states = {k: FakeMRN(k, with_seg).state_dict() for k in folds}
    return MRNPredictor(FakeMRN(99, with_seg), states, CFG, device="cpu", tta=tta, **kw)


def _manual_p(case, seed, tta):
    """P(PD) of one fold computed by hand from the same crops."""
    model = FakeMRN(seed).eval()
    crops = extract_rois(case, CFG.roi)
    x = {n: torch.as_tensor(crops[n].image)[None] for n in ROI_NAMES}
    with torch.no_grad():
        p = torch.softmax(model(x).logits, -1)[0, 1]
        if tta:
            xf = {n: torch.flip(v, dims=(-2,)) for n, v in x.items()}
            p = (p + torch.softmax(model(xf).logits, -1)[0, 1]) / 2
    return float(p)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    return load_case(write_case(root / "RJPD_001", seed=1, pd=1), label=1)


# ---------------------------------------------------------------------------- tests
def test_fold_ensemble_matches_each_fold_by_hand(case):
    pred = fake_predictor().predict_case(case)
    expected = [_manual_p(case, k, False) for k in (0, 1)]
    assert pred.p_pd_folds == pytest.approx(expected, abs=1e-6)
    assert pred.p_pd == pytest.approx(np.mean(expected), abs=1e-6)
    assert pred.p_pd_std == pytest.approx(np.std(expected), abs=1e-6)
    assert pred.call == int(pred.p_pd >= THRESHOLD)
    assert pred.folds == [0, 1] and pred.label == 1 and pred.mask_source == "case"
    assert set(pred.boxes) == set(ROI_NAMES)
    assert [set(t) for t in pred.roi_tokens] == [set(ROI_NAMES)] * 2
    assert pred.roi_tokens[0]["nm_sn"].shape == (1, 4)
    assert pred.nuclei.shape == case.qsm.shape and pred.nm_nuclei.shape == case.nm.shape
    assert pred.nuclei.dtype == np.uint8
    assert set(np.unique(pred.nm_nuclei)) <= {0, 1, 2}
    assert set(np.unique(pred.nuclei)) <= set(range(17))
    assert pred.summary()["p_pd_fold1"] == pred.p_pd_folds[1]


def test_fold_subset_and_progress(case):
    seen = []
    pred = fake_predictor(folds=(1,)).predict_case(
        case, progress=lambda f, msg: seen.append((f, msg))
    )
    assert pred.p_pd_folds == pytest.approx([_manual_p(case, 1, False)], abs=1e-6)
    assert seen[0][0] == 0.0 and seen[-1][0] == 1.0
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
    assert "RJPD_001" in seen[-1][1]


def test_tta_averages_mirrored_views_and_unflips_segmentation(case):
    plain = fake_predictor().predict_case(case)
    tta = fake_predictor(tta=True).predict_case(case)
    expected = [_manual_p(case, k, True) for k in (0, 1)]
    assert tta.p_pd_folds == pytest.approx(expected, abs=1e-6)
    assert abs(tta.p_pd - plain.p_pd) > 1e-6  # the model is not mirror-invariant
    assert tta.roi_tokens[0]["qsm_bg"].shape == (2, 4)
    # the DPT stand-in is a 1x1x1 conv (mirror-equivariant): un-flipped TTA masks == plain masks
    np.testing.assert_array_equal(tta.nuclei, plain.nuclei)
    np.testing.assert_array_equal(tta.nm_nuclei, plain.nm_nuclei)


def test_without_dpt_the_cropping_masks_are_pasted_back(case):
    pred = fake_predictor(with_seg=False).predict_case(case)  # CFG pads: exact paste-back
    assert pred.seg_source == "input-masks"
    gt, nm_gt = case.qsm_mask.array, case.nm_mask.array
    for lab in range(1, 17):  # every label back in place, right/left kept
        inter = np.sum((pred.nuclei == lab) & (gt == lab))
        assert 2 * inter / (np.sum(pred.nuclei == lab) + np.sum(gt == lab)) > 0.9, lab
    for lab in (1, 2):
        inter = np.sum((pred.nm_nuclei == lab) & (nm_gt == lab))
        assert 2 * inter / (np.sum(pred.nm_nuclei == lab) + np.sum(nm_gt == lab)) > 0.9


def test_masked_prediction_equals_zeroed_input_without_backbone_pass(case):
    predictor = fake_predictor(tta=True)
    pred = predictor.predict_case(case)
    calls = predictor.model.backbone_calls
    for masked in ({"nm_sn"}, {"qsm_bg", "qsm_dentate"}, set(ROI_NAMES)):
        m = predictor.masked_prediction(pred, masked)
        assert predictor.model.backbone_calls == calls  # head passes only
        ref = predictor.predict_case(case, zero_rois=masked)
        calls = predictor.model.backbone_calls
        assert m.p_pd_folds == pytest.approx(ref.p_pd_folds, abs=1e-6)
        assert m.p_pd == pytest.approx(ref.p_pd, abs=1e-6)
        assert m.masked == frozenset(masked) and m.folds == (0, 1)
    table = predictor.masking_table(pred)
    assert predictor.model.backbone_calls == calls
    assert [r.masked for r in table] == list(MASK_SUBSETS)
    assert table[0].p_pd == pytest.approx(pred.p_pd, abs=1e-6)
    assert table[0].p_pd_folds == pytest.approx(pred.p_pd_folds, abs=1e-6)
    assert all(r.call == int(r.p_pd >= THRESHOLD) for r in table)
    with pytest.raises(InputDataError, match="unknown ROI"):
        predictor.masked_prediction(pred, {"putamen"})


def _count_empty_token_calls(predictor) -> dict[str, int]:
    """Spy on the model's empty-ROI encoder pass (``empty_token``)."""
    calls = {"n": 0}
    empty = predictor.model.empty_token

    def counting(*a, **k):
        calls["n"] += 1
        return empty(*a, **k)

    predictor.model.empty_token = counting
    return calls


def test_warm_masking_caches_empty_roi_tokens_during_predict_case(case):
    cold = fake_predictor()
    cold_calls = _count_empty_token_calls(cold)
    ref = cold.predict_case(case)
    assert cold_calls["n"] == 0 and not cold.masking_cache_ready()
    expect = cold.masked_prediction(ref, {"qsm_bg"})
    assert cold_calls["n"] == 2 * len(ROI_NAMES)  # computed lazily, at the first masking

    warm = fake_predictor()
    calls = _count_empty_token_calls(warm)
    seen = []
    pred = warm.predict_case(case, warm_masking=True, progress=lambda f, m: seen.append(f))
    assert calls["n"] == 2 * len(ROI_NAMES) and warm.masking_cache_ready()
    assert len(seen) == len(warm.folds) + 2  # same progress reports as without warming
    assert pred.p_pd_folds == pytest.approx(ref.p_pd_folds, abs=1e-7)
    backbone = warm.model.backbone_calls
    m = warm.masked_prediction(pred, {"qsm_bg"})
    warm.masking_table(pred)
    assert calls["n"] == 2 * len(ROI_NAMES) and warm.model.backbone_calls == backbone
    assert m.p_pd_folds == pytest.approx(expect.p_pd_folds, abs=1e-7)

    later = fake_predictor()
    later_calls = _count_empty_token_calls(later)
    assert later.warm_masking_cache() is True and later.masking_cache_ready()
    assert later_calls["n"] == 2 * len(ROI_NAMES)
    assert later.warm_masking_cache() is True and later_calls["n"] == 2 * len(ROI_NAMES)


class NoMaskingModel(nn.Module):
    """A classifier without ``classify_tokens`` / ``empty_token`` (e.g. a plain baseline)."""

    needs_masks = False

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.inner = FakeMRN(seed)

    def forward(self, rois):
        return self.inner(rois)


def test_warm_masking_is_a_no_op_for_models_that_cannot_mask(case):
    states = {k: NoMaskingModel(k).state_dict() for k in (0, 1)}
    predictor = MRNPredictor(NoMaskingModel(99), states, CFG, device="cpu")
    assert not predictor.can_mask and predictor.warm_masking_cache() is False
    pred = predictor.predict_case(case, warm_masking=True)  # nothing to warm, no error
    assert pred.p_pd_folds == pytest.approx([_manual_p(case, k, False) for k in (0, 1)], abs=1e-6)
    with pytest.raises(InputDataError, match="cannot classify ROI tokens"):
        predictor.masked_prediction(pred, {"nm_sn"})


def test_missing_masks_error_and_segmenter_hook(tmp_path, case):
    bare = load_case(write_case(tmp_path / "RJPD_007", seed=7, masks=False))
    with pytest.raises(
        InputDataError,
        match=r"^RJPD_007: case has no NM_mask.nii.gz / QSM_mask.nii.gz "
        r"and no nnU-Net models",
    ):
        fake_predictor().predict_case(bare)

    class Segmenter:
        calls = 0

        def predict(self, c):
            Segmenter.calls += 1
            return case.nm_mask, case.qsm_mask  # same grid: stands in for nnU-Net

    seg = Segmenter()
    pred = fake_predictor(segmenter=seg).predict_case(bare)
    assert pred.mask_source == "segmenter" and Segmenter.calls == 1
    np.testing.assert_array_equal(pred.nm_mask, case.nm_mask.array)  # kept for the viewer
    np.testing.assert_array_equal(pred.qsm_mask, case.qsm_mask.array)
    assert fake_predictor().predict_case(case).nm_mask is None  # the case's own: not copied
    assert pred.boxes == fake_predictor().predict_case(case).boxes
    # explicit masks override, and ignore_masks refuses the case's own files
    assert (
        fake_predictor()
        .predict_case(bare, nm_mask=case.nm_mask, qsm_mask=case.qsm_mask)
        .mask_source
        == "given"
    )
    with pytest.raises(InputDataError, match=r"RJPD_001: .*\(mask files ignored\)"):
        fake_predictor(ignore_masks=True).predict_case(case)
    assert (
        fake_predictor(ignore_masks=True, segmenter=seg).predict_case(case).mask_source
        == "segmenter"
    )


def test_weights_that_do_not_fit_raise_weights_error():
    bad = {0: {"head.weight": torch.zeros(3, 3)}}
    with pytest.raises(WeightsError, match="fold 0: weights do not fit"):
        MRNPredictor(FakeMRN(0), bad, CFG, device="cpu")
    with pytest.raises(WeightsError, match="no fold weights"):
        MRNPredictor(FakeMRN(0), {}, CFG, device="cpu")
