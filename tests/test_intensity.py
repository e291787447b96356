"""Scanner-robust intensity mapping (issue 13): invariance of the ROI stacks to a global NM
gain and offset, to QSM in ppm vs ppb, and to whatever lies outside the ROIs."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from mrn_engine.config import RoiConfig, RunConfig, get_preset
from mrn_engine.data.cases import Case
from mrn_engine.data.nifti import Volume
from mrn_engine.errors import ConfigError, InputDataError, MRNWarning
from mrn_engine.phantom import make_phantom_case
from mrn_engine.phantom.geometry import VOXEL_MM
from mrn_engine.rois import extract_rois, nm_reference_region, roi_box
from mrn_engine.rois.intensity import QSM_PPB_THRESHOLD, qsm_to_ppm_factor

CFG = get_preset("cpu-tiny").roi
LEGACY = dataclasses.replace(CFG, intensity="percentile")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_case(1, seed=11, case_id="RJPD_011")


def as_case(p, nm=None, qsm=None, nm_mask=None, qsm_mask=None, affine=None) -> Case:
    aff = p.affine if affine is None else affine

    def vol(a, kind):
        return Volume(np.asarray(a), aff.copy(), None, None, kind)

    return Case(
        p.case_id,
        vol(p.nm if nm is None else nm, "image"),
        vol(p.qsm if qsm is None else qsm, "image"),
        nm_mask=vol(p.nm_mask if nm_mask is None else nm_mask, "mask"),
        qsm_mask=vol(p.qsm_mask if qsm_mask is None else qsm_mask, "mask"),
    )


def crops(case: Case, cfg: RoiConfig = CFG) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MRNWarning)
        return {k: c.image for k, c in extract_rois(case, cfg).items()}


@pytest.mark.parametrize(("gain", "offset"), [(0.6, 2000.0), (2.5, -1500.0), (0.01, 0.0)])
def test_nm_gain_and_offset_invariance(phantom, gain, offset):
    ref = crops(as_case(phantom))
    new = crops(as_case(phantom, nm=gain * phantom.nm.astype(np.float64) + offset))
    np.testing.assert_allclose(new["nm_sn"], ref["nm_sn"], atol=0.05)
    for name in ("qsm_bg", "qsm_midbrain", "qsm_dentate"):
        np.testing.assert_array_equal(new[name], ref[name])


def test_legacy_percentile_mapping_is_not_gain_offset_invariant(phantom):
    """The failure of issue 13, measured: the old mapping moves the SN under 0.6 x NM + 2000."""
    ref = crops(as_case(phantom), LEGACY)["nm_sn"]
    new = crops(as_case(phantom, nm=0.6 * phantom.nm + 2000.0), LEGACY)["nm_sn"]
    assert np.abs(new - ref).mean() > 5.0


def test_qsm_ppm_and_ppb_give_the_same_stacks(phantom):
    ppb = as_case(phantom)  # the phantom, like the challenge data, is in ppb
    ppm = as_case(phantom, qsm=phantom.qsm / 1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MRNWarning)  # clear ppb or ppm: no unit warning
        extract_rois(ppb, CFG, rois=("qsm_midbrain",))
        extract_rois(ppm, CFG, rois=("qsm_midbrain",))
    a, b = crops(ppb), crops(ppm)
    for name in ("qsm_bg", "qsm_midbrain", "qsm_dentate"):
        np.testing.assert_allclose(b[name], a[name], atol=1e-3)
    np.testing.assert_array_equal(b["nm_sn"], a["nm_sn"])
    # an explicit unit is obeyed without guessing
    assert qsm_to_ppm_factor(phantom.qsm, "ppm") == 1.0
    assert qsm_to_ppm_factor(phantom.qsm / 1000.0, "ppb") == 1e-3


def test_qsm_unit_detection_threshold():
    x = np.zeros((20, 20, 5), np.float32)
    x[5:15, 5:15] = np.linspace(-0.2, 0.25, 500).reshape(10, 10, 5)
    assert qsm_to_ppm_factor(x) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", MRNWarning)
        assert qsm_to_ppm_factor(x * 1000.0, source="QSM_x") == 1e-3  # clearly ppb: silent
    with pytest.warns(MRNWarning, match="QSM_x: QSM unit unclear"):
        assert qsm_to_ppm_factor(x * 40.0, source="QSM_x") == 1e-3  # spread 10: a guess
    assert QSM_PPB_THRESHOLD < 0.05 * 1000


def _far_from_rois(case: Case, grow_mm: float = 10.0) -> np.ndarray:
    """Voxels outside every ROI box grown by ``grow_mm`` (boxes with the config's margin)."""
    near = np.zeros(case.shape, bool)
    for mask, labels in (
        (case.nm_mask.array, (1, 2)),
        (case.qsm_mask.array, tuple(range(1, 17))),
    ):
        box = roi_box(mask, labels, case.spacing, CFG.margin_mm + grow_mm)
        near[box.slices] = True
    return ~near


def test_what_lies_outside_the_rois_does_not_matter(phantom):
    ref = crops(as_case(phantom))
    far = _far_from_rois(as_case(phantom))
    assert far.mean() > 0.5
    rng = np.random.default_rng(0)
    nm, qsm = phantom.nm.copy(), phantom.qsm.copy()
    nm[far] = rng.uniform(0, 90000, int(far.sum()))  # another scanner's background / vessels
    qsm[far] = rng.uniform(-300, 2800, int(far.sum()))  # streaks, calcifications
    new = crops(as_case(phantom, nm=nm, qsm=qsm))
    for name in ref:
        np.testing.assert_array_equal(new[name], ref[name], err_msg=name)
    # the legacy whole-volume window is not: that is what issue 13 measured
    old = crops(as_case(phantom), LEGACY)["nm_sn"]
    assert np.abs(crops(as_case(phantom, nm=nm), LEGACY)["nm_sn"] - old).mean() > 5.0


def test_smaller_field_of_view_gives_the_same_stacks(phantom):
    """Cutting 30 voxels off every in-plane side (another FOV) changes no stack."""
    cut = (slice(30, -30), slice(30, -30), slice(None))
    aff = phantom.affine.copy()
    aff[:3, 3] += aff[:3, :3] @ np.array([30, 30, 0])
    small = as_case(
        phantom,
        nm=phantom.nm[cut],
        qsm=phantom.qsm[cut],
        nm_mask=phantom.nm_mask[cut],
        qsm_mask=phantom.qsm_mask[cut],
        affine=aff,
    )
    ref, new = crops(as_case(phantom)), crops(small)
    for name in ref:
        np.testing.assert_allclose(new[name], ref[name], atol=1e-3, err_msg=name)


def test_padding_is_neutral_tissue(phantom):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MRNWarning)
        c = extract_rois(as_case(phantom), CFG)
    qsm_zero = 255 * (0 - CFG.qsm_window_ppm[0]) / (CFG.qsm_window_ppm[1] - CFG.qsm_window_ppm[0])
    nm_ref = 255 * (0 - CFG.nm_cnr_window[0]) / (CFG.nm_cnr_window[1] - CFG.nm_cnr_window[0])
    assert c["qsm_bg"].pad_value == pytest.approx(qsm_zero)
    assert c["nm_sn"].pad_value == pytest.approx(nm_ref, abs=1e-3)
    # the reference tissue itself maps there: its median in the stack is the pad value
    ref = nm_reference_region(phantom.nm_mask, VOXEL_MM, phantom.qsm_mask)
    lo, hi = c["nm_sn"].window
    mapped = 255 * (np.median(phantom.nm[ref]) - lo) / (hi - lo)
    assert mapped == pytest.approx(nm_ref, abs=0.5)


def test_reference_region_sits_beside_the_sn(phantom):
    ref = nm_reference_region(phantom.nm_mask, VOXEL_MM, phantom.qsm_mask)
    sn = phantom.nm_mask > 0
    assert ref.sum() > 200 and not (ref & sn).any() and not (ref & (phantom.qsm_mask > 0)).any()
    # on the SN's slices, anterior (higher y in LAS) of the SN centroid
    assert set(np.nonzero(ref)[2]) <= set(np.nonzero(sn)[2])
    assert np.nonzero(ref)[1].mean() > np.nonzero(sn)[1].mean()
    # the SN is far brighter than its reference (CNR > 10 on the phantom)
    sd = 1.4826 * np.median(np.abs(phantom.nm[ref] - np.median(phantom.nm[ref])))
    assert (np.median(phantom.nm[sn]) - np.median(phantom.nm[ref])) / sd > 10


def test_no_sn_in_mask_is_a_clear_error(phantom):
    empty = np.zeros_like(phantom.nm_mask)
    empty[0, 0, 0] = 1  # one SN voxel in a corner: no reference tissue around it
    with pytest.raises(InputDataError, match="reference region next to the SN has"):
        extract_rois(as_case(phantom, nm_mask=empty), CFG, rois=("nm_sn",), strict=False)


def test_config_intensity_field_and_legacy_bundles(tmp_path):
    assert RoiConfig().intensity == "reference"
    with pytest.raises(ConfigError, match="roi.intensity must be one of"):
        RoiConfig(intensity="zscore")
    with pytest.raises(ConfigError, match="roi.qsm_unit"):
        RoiConfig(qsm_unit="Hz")
    with pytest.raises(ConfigError, match="high > low"):
        RoiConfig(qsm_window_ppm=(0.3, -0.1))
    # a config.json written before the field existed keeps its (percentile) mapping
    data = get_preset("cpu-tiny").to_dict()
    for key in ("intensity", "nm_cnr_window", "qsm_window_ppm", "qsm_unit"):
        del data["roi"][key]
    assert RunConfig.from_dict(data).roi.intensity == "percentile"
    cfg = get_preset("cpu-tiny")
    cfg.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json").roi.intensity == "reference"
