"""Tests of ROI extraction (mrn_engine.rois): boxes, stacks, intensity, paste-back, batch, cache."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch

from mrn_engine.config import RoiConfig, RunConfig, get_preset
from mrn_engine.data import ROI_BY_NAME, ROI_NAMES, ROIS, discover_cases, load_case
from mrn_engine.errors import ConfigError, InputDataError, MRNWarning
from mrn_engine.rois import (
    CropBox,
    RoiCache,
    apply_window,
    config_hash,
    extract_rois,
    intensity_window,
    margin_voxels,
    paste_back,
    paste_back_all,
    roi_box,
    stack_rois,
)
from test_data import RIGHT_BOXES, SHAPE, SPACING, make_cohort, write_case

SMALL = RoiConfig(
    image_size=32, slices={"nm_sn": 4, "qsm_bg": 8, "qsm_midbrain": 4, "qsm_dentate": 4}
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return load_case(write_case(tmp_path_factory.mktemp("c") / "RJPD_001"), label=1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def roi_labels_only(mask: np.ndarray, name: str) -> np.ndarray:
    """Source mask restricted to the labels of one ROI."""
    return np.where(np.isin(mask, ROI_BY_NAME[name].labels), mask, 0)


def tight(mask, labels):
    idx = np.nonzero(np.isin(mask, labels))
    return [(int(i.min()), int(i.max()) + 1) for i in idx]


# ----------------------------------------------------------------------------------------------


def test_margin_is_anisotropic(case):
    assert margin_voxels(SPACING, 4.0) == (6, 6, 2)
    assert margin_voxels(SPACING, 0.0) == (0, 0, 0)
    spec = ROI_BY_NAME["qsm_midbrain"]
    (x0, x1), (y0, y1), (z0, z1) = tight(case.qsm_mask.array, spec.labels)
    box = roi_box(case.qsm_mask.array, spec.labels, case.spacing, 4.0)
    assert box == CropBox(x0 - 6, x1 + 6, y0 - 6, y1 + 6, z0 - 2, z1 + 2)
    # clipped at the volume border
    big = roi_box(case.qsm_mask.array, spec.labels, case.spacing, 100.0)
    assert big == CropBox(0, SHAPE[0], 0, SHAPE[1], 0, SHAPE[2])
    assert roi_box(case.qsm_mask.array, [99], case.spacing, 4.0) is None


def test_extract_shapes_content_and_range(case):
    crops = extract_rois(case, SMALL)
    assert list(crops) == list(ROI_NAMES)
    for name, c in crops.items():
        spec = ROI_BY_NAME[name]
        n = SMALL.slices[name]
        assert c.image.shape == (n, 32, 32) and c.image.dtype == np.float32
        assert c.mask.shape == (n, 32, 32) and c.mask.dtype == np.int64
        assert 0.0 <= c.image.min() and c.image.max() <= 255.0
        assert c.image.max() > 100  # real content, not all padding
        # every merged class present, nothing else
        assert set(np.unique(c.mask)) == set(range(spec.num_classes)), name
        assert all(v > 0 for v in c.label_counts().values())
        assert c.slice_index.shape == (n,)
        assert max(c.resized_hw) == 32
        assert c.case_id == "RJPD_001" and c.volume_shape == SHAPE
    # NM crop comes from the NM image: its SN (NM labels) is bright
    nm = crops["nm_sn"]
    assert nm.image[nm.mask == 1].mean() > nm.image[nm.mask == 0].mean() + 50


def test_slices_centre_crop_and_zero_pad(case):
    # qsm_bg: labels z 11..16 -> tight [11, 17), +-2 margin -> [9, 19): 10 slices
    cfg = dataclasses.replace(SMALL, slices={**SMALL.slices, "qsm_bg": 6, "qsm_dentate": 12})
    crops = extract_rois(case, cfg)
    bg = crops["qsm_bg"]
    assert (bg.box.z0, bg.box.z1) == (9, 19)
    np.testing.assert_array_equal(bg.slice_index, np.arange(11, 17))  # central 6 of 10
    # dentate: z 2..4 -> [2, 5) +-2 -> [0, 7): 7 slices in a stack of 12 -> 2 zero slices before
    dn = crops["qsm_dentate"]
    assert (dn.box.z0, dn.box.z1) == (0, 7)
    np.testing.assert_array_equal(dn.slice_index, [-1, -1, 0, 1, 2, 3, 4, 5, 6, -1, -1, -1])
    pad = dn.slice_index < 0
    # padding = neutral tissue (0 ppm on the QSM scale), not 0 (= "very diamagnetic")
    assert dn.pad_value == pytest.approx(255 * 0.1 / 0.4)
    assert np.all(dn.image[pad] == dn.pad_value) and np.all(dn.mask[pad] == 0)
    assert np.all(dn.image[~pad].reshape(7, -1).max(axis=1) > dn.pad_value)


def test_aspect_kept_and_padding_centred(case):
    c = extract_rois(case, SMALL)["qsm_midbrain"]
    nx, ny, _ = c.box.shape
    hx, hy = c.resized_hw
    assert nx > ny and hx == 32
    assert hy == round(ny * 32 / nx)
    px, py = c.pad
    assert px == 0 and py == (32 - hy) // 2
    # columns outside the resized box are neutral padding
    pv = c.pad_value
    assert np.all(c.image[:, :, :py] == pv) and np.all(c.image[:, :, py + hy :] == pv)


def test_intensity_window_qsm_ignores_background():
    arr = np.zeros((10, 10, 10), np.float32)
    arr[2:8, 2:8, 2:8] = np.linspace(-100, 100, 216).reshape(6, 6, 6)
    lo, hi = intensity_window(arr, (0.0, 100.0))
    assert lo == pytest.approx(-100) and hi == pytest.approx(100)
    mapped = apply_window(np.array([-200.0, -100.0, 0.0, 100.0, 300.0]), (lo, hi))
    np.testing.assert_allclose(mapped, [0, 0, 127.5, 255, 255], atol=1e-3)
    lo2, hi2 = intensity_window(arr, (10.0, 90.0))
    assert -100 < lo2 < -70 and 70 < hi2 < 100


def test_paste_back_exact_roundtrip(case):
    """With no resize (image_size = longest box side) and enough slices, paste-back is exact."""
    for name in ROI_NAMES:
        spec = ROI_BY_NAME[name]
        src = case.nm_mask.array if spec.modality == "NM" else case.qsm_mask.array
        box = roi_box(src, spec.labels, case.spacing, 4.0)
        cfg = RoiConfig(image_size=max(box.shape[:2]), slices={n: 20 for n in ROI_NAMES})
        crop = extract_rois(case, cfg, rois=(name,))[name]
        assert crop.scale == 1.0
        back = paste_back(crop, crop.mask, SHAPE)
        assert back.dtype == np.uint8 and back.shape == SHAPE
        expected = np.zeros(SHAPE, np.uint8)
        expected[box.slices] = roi_labels_only(src, name)[box.slices]
        np.testing.assert_array_equal(back, expected, err_msg=name)


@pytest.mark.parametrize("size", [224, 20])
def test_paste_back_roundtrip_with_resize(case, size):
    cfg = RoiConfig(image_size=size, slices={n: 20 for n in ROI_NAMES})
    crops = extract_rois(case, cfg)
    for name, crop in crops.items():
        spec = ROI_BY_NAME[name]
        src = case.nm_mask.array if spec.modality == "NM" else case.qsm_mask.array
        back = paste_back(crop, torch.from_numpy(crop.mask), SHAPE)
        # upsampling (224) keeps even 2-voxel nuclei; downsampling to 20 px loses detail of
        # the tiniest ones (RN is 3 x 2 voxels in-plane), so only the union is held to 0.8
        for lab in spec.labels:
            d = dice(back == lab, src == lab)
            assert d > (0.95 if size == 224 else 0.4), (name, lab, d)
        src_roi = np.isin(src, spec.labels)
        assert dice(back > 0, src_roi) > (0.97 if size == 224 else 0.8), name


def test_paste_back_sides_from_midline(case):
    crop = extract_rois(case, SMALL)["qsm_midbrain"]
    assert crop.midline_x == pytest.approx((SHAPE[0] - 1) / 2, abs=0.01)
    pred = np.zeros_like(crop.mask)
    pred[crop.mask > 0] = 2  # everything predicted as SN (merged class 2)
    back = paste_back(crop, pred)
    xs_right = np.nonzero(back == 11)[0]
    xs_left = np.nonzero(back == 12)[0]
    assert len(xs_right) and len(xs_left)
    assert xs_right.max() < crop.midline_x < xs_left.min()
    assert set(np.unique(back)) == {0, 11, 12}
    # without a known midline, the volume centre is used
    no_mid = dataclasses.replace(crop, midline_x=(SHAPE[0] - 1) / 2)
    np.testing.assert_array_equal(paste_back(no_mid, pred), back)


def test_paste_back_rejects_bad_classes(case):
    crop = extract_rois(case, SMALL)["qsm_dentate"]
    with pytest.raises(InputDataError, match="class values must lie in 0..1"):
        paste_back(crop, np.full(crop.mask.shape, 3))
    with pytest.raises(InputDataError, match="do not match the qsm_dentate stack"):
        paste_back(crop, np.zeros((2, 32, 32), np.int64))


def test_paste_back_all_combines_qsm_rois(case, tmp_path):
    from mrn_engine.data import load_volume, save_volume

    cfg = RoiConfig(image_size=64, slices={n: 20 for n in ROI_NAMES})
    crops = extract_rois(case, cfg)
    qsm = paste_back_all(crops, {n: c.mask for n, c in crops.items()}, "QSM")
    for lab in range(1, 17):
        assert dice(qsm == lab, case.qsm_mask.array == lab) > 0.9, lab
    nm = paste_back_all(crops, {"nm_sn": crops["nm_sn"].mask}, "NM")
    assert set(np.unique(nm)) == {0, 1, 2}
    # saved in the source geometry
    out = save_volume(case.qsm.like(qsm), tmp_path / "QSM_pred.nii.gz")
    back = load_volume(out, kind="mask")
    np.testing.assert_array_equal(back.array, qsm)
    np.testing.assert_allclose(back.affine, case.qsm.affine)
    assert back.spacing == pytest.approx(case.spacing)


# ----------------------------------------------------------------------------------------------
# slice policy ("pad" / "resample")


def merged_source(case, name: str, box: CropBox) -> np.ndarray:
    """The box of the ROI's modality mask in merged classes, ``(nx, ny, nz)``."""
    spec = ROI_BY_NAME[name]
    src = case.nm_mask.array if spec.modality == "NM" else case.qsm_mask.array
    lut = np.zeros(256, np.int64)
    for lab, cls in spec.merge_map().items():
        lut[lab] = cls
    return lut[src[box.slices]]


def test_slice_policy_resample_count_and_labels(case):
    # boxes: nm_sn 7 slices, qsm_bg 10, qsm_midbrain 8, qsm_dentate 7 (z 0..6)
    slices = {"nm_sn": 4, "qsm_bg": 5, "qsm_midbrain": 8, "qsm_dentate": 14}
    cfg = dataclasses.replace(SMALL, slices=slices, slice_policy="resample")
    crops = extract_rois(case, cfg)
    for name, c in crops.items():
        spec = ROI_BY_NAME[name]
        assert c.slice_policy == "resample"
        assert c.image.shape == (slices[name], 32, 32) and c.mask.shape == c.image.shape
        # no padding slice: every stack slice comes from the box, in z order
        assert np.all(c.slice_index >= c.box.z0) and np.all(c.slice_index < c.box.z1)
        assert np.all(np.diff(c.slice_index) >= 0)
        fg = c.mask.reshape(len(c.mask), -1).any(axis=1)
        assert fg.sum() >= 2 and np.all(c.image[fg].reshape(fg.sum(), -1).max(axis=1) > 0), name
        # masks stay integer with only valid merged classes, all of them present
        assert c.mask.dtype == np.int64
        assert set(np.unique(c.mask)) == set(range(spec.num_classes)), name
        # each mask slice holds exactly the classes of its (nearest) source slice
        src = merged_source(case, name, c.box)
        for s, z in enumerate(c.slice_index):
            expected = set(np.unique(src[:, :, z - c.box.z0]).tolist())
            assert set(np.unique(c.mask[s]).tolist()) == expected, (name, s, z)
    # shrinking 10 -> 5 takes every other slice; stretching 7 -> 14 repeats each slice twice
    np.testing.assert_array_equal(crops["qsm_bg"].slice_index, [10, 12, 14, 16, 18])
    np.testing.assert_array_equal(crops["qsm_dentate"].slice_index, np.arange(14) // 2)
    np.testing.assert_array_equal(crops["nm_sn"].slice_index, [4, 6, 8, 10])
    # same count as the box: resample == pad (identity)
    pad = extract_rois(case, dataclasses.replace(cfg, slice_policy="pad"), rois=("qsm_midbrain",))
    mid = crops["qsm_midbrain"]
    np.testing.assert_array_equal(mid.slice_index, np.arange(mid.box.z0, mid.box.z1))
    np.testing.assert_array_equal(mid.image, pad["qsm_midbrain"].image)
    np.testing.assert_array_equal(mid.mask, pad["qsm_midbrain"].mask)
    # the default is unchanged
    assert SMALL.slice_policy == "pad" and RoiConfig().slice_policy == "pad"
    assert extract_rois(case, SMALL)["qsm_bg"].slice_policy == "pad"


def test_slice_policy_resample_image_is_linear_in_z(case):
    """With no in-plane resize, a stretched stack slice blends its two source slices linearly."""
    spec = ROI_BY_NAME["qsm_dentate"]
    box = roi_box(case.qsm_mask.array, spec.labels, case.spacing, 4.0)
    assert box.shape[2] == 7
    cfg = RoiConfig(
        image_size=max(box.shape[:2]),
        slices={**SMALL.slices, "qsm_dentate": 14},
        slice_policy="resample",
    )
    c = extract_rois(case, cfg, rois=("qsm_dentate",))["qsm_dentate"]
    assert c.scale == 1.0
    (hx, hy), (px, py) = c.resized_hw, c.pad
    raw = case.qsm.array[box.slices]  # (nx, ny, 7)
    inner = c.image[:, px : px + hx, py : py + hy]
    # stack slice s sits at box z (s + 0.5) / 2 - 0.5 (clamped to the box)
    for s in range(14):
        zc = min(max((s + 0.5) / 2 - 0.5, 0.0), 6.0)
        lo = int(np.floor(zc))
        hi, w = min(lo + 1, 6), zc - lo
        blend = (1 - w) * raw[:, :, lo] + w * raw[:, :, hi]
        np.testing.assert_allclose(inner[s], apply_window(blend, c.window), atol=1e-3, err_msg=s)


@pytest.mark.parametrize("policy", ["pad", "resample"])
def test_slice_policy_paste_back_roundtrip(case, policy):
    """Exact when the stack has at least as many slices as the box (both policies)."""
    for name in ROI_NAMES:
        spec = ROI_BY_NAME[name]
        src = case.nm_mask.array if spec.modality == "NM" else case.qsm_mask.array
        box = roi_box(src, spec.labels, case.spacing, 4.0)
        for n in (box.shape[2], 20):
            cfg = RoiConfig(
                image_size=max(box.shape[:2]),
                slices={r: n for r in ROI_NAMES},
                slice_policy=policy,
            )
            crop = extract_rois(case, cfg, rois=(name,))[name]
            back = paste_back(crop, crop.mask, SHAPE)
            assert back.dtype == np.uint8 and back.shape == SHAPE
            expected = np.zeros(SHAPE, np.uint8)
            expected[box.slices] = roi_labels_only(src, name)[box.slices]
            np.testing.assert_array_equal(back, expected, err_msg=f"{policy} {name} {n}")


def test_slice_policy_paste_back_after_shrinking_z(case):
    """Fewer stack slices than box slices: "pad" leaves the dropped slices empty, "resample"
    fills every box slice from its nearest stack slice (approximate, nearest in z)."""
    slices = {n: 4 for n in ROI_NAMES}  # qsm_bg box has 10 slices
    results = {}
    for policy in ("pad", "resample"):
        cfg = RoiConfig(image_size=64, slices=slices, slice_policy=policy)
        crops = extract_rois(case, cfg)
        qsm = paste_back_all(crops, {n: c.mask for n, c in crops.items()}, "QSM")
        assert qsm.dtype == np.uint8 and set(np.unique(qsm)) <= set(range(17))
        bg = crops["qsm_bg"]
        ref = roi_labels_only(case.qsm_mask.array, "qsm_bg")
        back = paste_back(bg, torch.from_numpy(bg.mask))
        labelled_z = np.nonzero(ref.reshape(-1, SHAPE[2]).any(axis=0))[0]
        covered = np.nonzero(back.reshape(-1, SHAPE[2]).any(axis=0))[0]
        results[policy] = (set(covered.tolist()), dice(back > 0, ref > 0))
        # nothing outside the box
        outside = np.ones(SHAPE, bool)
        outside[bg.box.slices] = False
        assert not back[outside].any()
    assert results["pad"][0] == {12, 13, 14, 15}  # central 4 of box z 9..18
    # stack slices from box z 10, 12, 15, 17; box z 9..18 each take the nearest one: z 16
    # takes z 17's (unlabelled) slice, so labelled 11..16 come back as 11..15 (nearest in z)
    assert results["resample"][0] == {11, 12, 13, 14, 15} < set(labelled_z.tolist())
    assert results["resample"][1] > results["pad"][1] > 0.8


def test_slice_policy_rejected(case):
    msg = r"roi\.slice_policy must be one of 'pad', 'resample', not 'linear'"
    with pytest.raises(ConfigError, match=msg):
        RoiConfig(slice_policy="linear")
    with pytest.raises(ConfigError, match=msg):
        dataclasses.replace(SMALL, slice_policy="linear")
    with pytest.raises(ConfigError, match=msg):
        get_preset("cpu-tiny").replace(roi={"slice_policy": "linear"})
    with pytest.raises(ConfigError, match=r"roi\.slice_policy .* not None"):
        RunConfig.from_dict({"roi": {"slice_policy": None}})
    # set on a built config (bypassing __post_init__): caught when cropping
    cfg = dataclasses.replace(SMALL)
    cfg.slice_policy = "Resample"
    with pytest.raises(ConfigError, match="not 'Resample'"):
        extract_rois(case, cfg)
    crop = extract_rois(case, SMALL, rois=("nm_sn",))["nm_sn"]
    with pytest.raises(InputDataError, match="unknown slice_policy 'zoom'"):
        paste_back(dataclasses.replace(crop, slice_policy="zoom"), crop.mask)


def test_slice_policy_cache_key(tmp_path):
    import hashlib
    import json

    from mrn_engine.rois.cache import CACHE_VERSION

    # the default ("pad") leaves the key of caches written before the field unchanged
    old_roi = {k: v for k, v in dataclasses.asdict(SMALL).items() if k != "slice_policy"}
    old = json.dumps({"v": CACHE_VERSION, "roi": old_roi}, sort_keys=True)
    assert config_hash(SMALL) == hashlib.sha256(old.encode()).hexdigest()[:16]
    resample = dataclasses.replace(SMALL, slice_policy="resample")
    assert config_hash(resample) != config_hash(SMALL)
    root = make_cohort(tmp_path / "data", n=1)
    files = discover_cases(root)[0]
    cache = RoiCache(tmp_path / "cache")
    assert cache.path_for(files, resample) != cache.path_for(files, SMALL)
    first = cache.get_or_compute(files, resample)
    again = cache.get_or_compute(files, resample)
    assert (cache.hits, cache.misses) == (1, 1)
    for name in ROI_NAMES:
        assert again[name].slice_policy == "resample"
        np.testing.assert_array_equal(again[name].image, first[name].image)
        np.testing.assert_array_equal(again[name].slice_index, first[name].slice_index)
        np.testing.assert_array_equal(
            paste_back(again[name], again[name].mask), paste_back(first[name], first[name].mask)
        )
    assert cache.get_or_compute(files, SMALL)["qsm_bg"].slice_policy == "pad"
    assert cache.misses == 2


def test_missing_roi_labels(case):
    qsm = case.qsm_mask.array.copy()
    qsm[np.isin(qsm, [15, 16])] = 0  # no dentate at all
    with pytest.raises(
        InputDataError,
        match=r"ROI qsm_dentate \(QSM dentate\) needs labels \[15, 16\]; none is present",
    ):
        extract_rois(case, SMALL, qsm_mask=qsm)
    qsm = case.qsm_mask.array.copy()
    qsm[qsm == 10] = 0  # left STN missing
    with pytest.warns(MRNWarning, match=r"ROI qsm_midbrain .*missing label\(s\) 10 \(STN_L\)"):
        crops = extract_rois(case, SMALL, qsm_mask=qsm)  # predictions: lenient
    assert 1 in crops["qsm_midbrain"].mask
    with pytest.raises(
        InputDataError, match=r"RJPD_001: given QSM mask: ROI qsm_midbrain .* 10 \(STN_L\)"
    ):
        extract_rois(case, SMALL, qsm_mask=qsm, strict=True)


def test_missing_label_in_case_mask_is_error(tmp_path):
    from test_data import synthetic_arrays

    nm = synthetic_arrays()["NM_mask"]
    nm[nm == 2] = 0
    c = load_case(write_case(tmp_path / "RJPD_009", overrides={"NM_mask": nm}))
    with pytest.raises(InputDataError, match=r"RJPD_009/NM_mask\.nii\.gz: ROI nm_sn .* 2 \(SN_L\)"):
        extract_rois(c, SMALL)


def test_given_mask_validation(case):
    with pytest.raises(
        InputDataError,
        match=r"RJPD_001: given NM mask: NM mask of shape \(60, 60, 19\) is not on the image grid",
    ):
        extract_rois(case, SMALL, nm_mask=np.zeros((60, 60, 19), np.uint8))
    bad = case.nm_mask.array.copy()
    bad[0, 0, 0] = 5
    with pytest.raises(InputDataError, match=r"unknown NM mask label value\(s\) \[5\]"):
        extract_rois(case, SMALL, nm_mask=bad)
    no_masks = dataclasses.replace(case, nm_mask=None, qsm_mask=None)
    with pytest.raises(InputDataError, match="RJPD_001: no NM mask"):
        extract_rois(no_masks, SMALL)
    # a predicted mask (e.g. nnU-Net) replaces the missing ground truth
    crops = extract_rois(no_masks, SMALL, nm_mask=case.nm_mask, qsm_mask=case.qsm_mask.array)
    assert set(crops) == set(ROI_NAMES)


def test_stack_rois(case, tmp_path):
    c2 = load_case(write_case(tmp_path / "RJPD_002", seed=5))
    a, b = extract_rois(case, SMALL), extract_rois(c2, SMALL)
    batch = stack_rois([a, b])
    for name in ROI_NAMES:
        n = SMALL.slices[name]
        assert batch[name]["image"].shape == (2, n, 32, 32)
        assert batch[name]["image"].dtype == torch.float32
        assert batch[name]["mask"].dtype == torch.int64
        np.testing.assert_array_equal(batch[name]["mask"][1].numpy(), b[name].mask)
    single = stack_rois(a)
    assert single["qsm_bg"]["image"].shape == (1, 8, 32, 32)
    other = extract_rois(case, dataclasses.replace(SMALL, image_size=16))
    with pytest.raises(InputDataError, match="stacks differ in shape"):
        stack_rois([a, other])
    nomask = {k: dataclasses.replace(v, mask=None) for k, v in a.items()}
    assert "mask" not in stack_rois([a, nomask])["nm_sn"]


def test_roi_cache(tmp_path):
    root = make_cohort(tmp_path / "data", n=1)
    files = discover_cases(root)[0]
    cache = RoiCache(tmp_path / "cache")
    first = cache.get_or_compute(files, SMALL)
    assert (cache.hits, cache.misses) == (0, 1)
    path = cache.path_for(files, SMALL)
    assert path.is_file() and path.suffix == ".npz"
    again = cache.get_or_compute(files, SMALL)
    assert (cache.hits, cache.misses) == (1, 1)
    for name in ROI_NAMES:
        np.testing.assert_array_equal(again[name].image, first[name].image)
        np.testing.assert_array_equal(again[name].mask, first[name].mask)
        np.testing.assert_array_equal(again[name].slice_index, first[name].slice_index)
        assert again[name].box == first[name].box and again[name].pad == first[name].pad
        assert again[name].midline_x == first[name].midline_x
    # the cached crop pastes back like the fresh one
    np.testing.assert_array_equal(
        paste_back(again["qsm_bg"], again["qsm_bg"].mask),
        paste_back(first["qsm_bg"], first["qsm_bg"].mask),
    )
    # another config -> another key
    other = dataclasses.replace(SMALL, margin_mm=2.0)
    assert config_hash(other) != config_hash(SMALL)
    assert config_hash(get_preset("cpu-tiny")) == config_hash(get_preset("cpu-tiny").roi)
    cache.get_or_compute(files, other)
    assert cache.misses == 2
    # a changed input file -> recomputed
    st = files.qsm.stat()
    os.utime(files.qsm, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.path_for(files, SMALL) != path
    cache.get_or_compute(files, SMALL)
    assert cache.misses == 3


def test_roi_cache_corrupt_file_recomputed(tmp_path):
    root = make_cohort(tmp_path / "data", n=1)
    files = discover_cases(root)[0]
    cache = RoiCache(tmp_path / "cache")
    good = cache.get_or_compute(files, SMALL)
    path = cache.path_for(files, SMALL)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(
        MRNWarning, match="corrupt ROI cache file; recomputing|corrupt ROI cache file"
    ):
        crops = cache.get_or_compute(files, SMALL)
    np.testing.assert_array_equal(crops["nm_sn"].image, good["nm_sn"].image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_compute(files, SMALL)  # rewritten: clean hit
    assert cache.hits == 1
    assert not list(path.parent.glob(".*tmp*"))


def test_presets_fit(case):
    """Both shipped presets extract all ROIs with their image size and slice counts."""
    for preset in ("cpu-tiny", "paper-vitb"):
        cfg = get_preset(preset)
        crops = extract_rois(case, cfg)
        for spec in ROIS:
            assert crops[spec.name].image.shape == (
                cfg.roi.slices[spec.name],
                cfg.roi.image_size,
                cfg.roi.image_size,
            )


def test_synthetic_layout_sanity():
    """The helper's right-side boxes lie left of the midline (so mirroring cannot overlap)."""
    assert all(b[1] <= SHAPE[0] // 2 for b in RIGHT_BOXES.values())


# ----------------------------------------------------------------------------------------------
# montage and CLI


def test_montage_png(case, tmp_path):
    from mrn_engine.rois.montage import describe_crop, save_montage

    crops = extract_rois(case, SMALL)
    out = save_montage(crops, tmp_path / "m" / "montage.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(out.parent.glob(".*tmp*"))
    d = describe_crop(crops["qsm_midbrain"])
    b = crops["qsm_midbrain"].box
    assert d["x"] == f"{b.x0}:{b.x1}" and d["size_vox"] == "x".join(map(str, b.shape))
    assert d["size_mm"].endswith(f"x{b.shape[2] * 2.0:.1f}")
    assert "STN:" in d["labels"] and "RN:" in d["labels"]


def test_cli_rois(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mrn_engine.cli import cli

    folder = write_case(tmp_path / "RJPD_004")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    png = tmp_path / "montage.png"
    # paper-vitb crops with "pad" (cpu-tiny resamples: tests/test_real_geometry.py)
    res = CliRunner().invoke(
        cli, ["rois", str(folder), "--preset", "paper-vitb", "--out", str(png)]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("RJPD_004: grid (60, 60, 20)")
    assert lines[0].endswith("slice policy pad")
    for name in ROI_NAMES:
        row = next(line for line in lines if line.startswith(name))
        assert "slices" not in row and " pad" in row  # "<S> (z a-b, k pad)"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert lines[-1] == f"montage -> {png.resolve()}"
    assert not list(work.iterdir())  # --out given: nothing in the current directory
    # no --out: the montage goes to ./<case_id>_rois.png
    res = CliRunner().invoke(cli, ["rois", str(folder), "--preset", "cpu-tiny"])
    assert res.exit_code == 0, res.output
    default = work / "RJPD_004_rois.png"
    assert default.is_file() and default.read_bytes()[:4] == b"\x89PNG"
    assert res.output.splitlines()[-1] == f"montage -> {default.resolve()}"
    # a config with the resample policy
    cfg = get_preset("cpu-tiny").replace(roi={"slice_policy": "resample"})
    cfg_path = cfg.save(tmp_path / "config.json")
    res = CliRunner().invoke(cli, ["rois", str(folder), "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].endswith("slice policy resample")
    assert "0 pad)" in res.output
    # never overwrites an input file
    nm = folder / "NM.nii.gz"
    before = nm.read_bytes()
    for bad in (nm, cfg_path):
        res = CliRunner().invoke(
            cli, ["rois", str(folder), "--config", str(cfg_path), "--out", str(bad)]
        )
        assert res.exit_code == 2 and "is an input file" in res.output, res.output
    assert nm.read_bytes() == before
    res = CliRunner().invoke(cli, ["rois", str(tmp_path), "--preset", "cpu-tiny"])
    assert res.exit_code != 0 and isinstance(res.exception, InputDataError)


def test_cli_cases(tmp_path):
    from click.testing import CliRunner

    from mrn_engine.cli import cli

    root = make_cohort(tmp_path / "data", n=4)
    cases = discover_cases(root)
    cases[3].nm.write_bytes(cases[1].nm.read_bytes())  # duplicate NM
    table = tmp_path / "table.csv"
    res = CliRunner().invoke(cli, ["cases", str(root), "--quiet", "--csv", str(table)])
    assert res.exit_code == 0, res.output
    assert "4 case(s): 4 labelled (2 PD, 2 HC), 4 with both masks" in res.output
    assert "validation: 4 ok, 0 with errors" in res.output
    assert "RJPD_001 == RJPD_003" in res.output
    assert "byte-identical NM" in res.output
    rows = table.read_text().splitlines()
    assert rows[0].startswith("case_id,label,split") and len(rows) == 5
    # a broken case -> reported, exit code 2
    m = load_case(cases[0]).qsm_mask.array.copy()
    m[0, 0, 0] = 33
    from test_data import write_nifti

    write_nifti(cases[0].qsm_mask, m)
    res = CliRunner().invoke(cli, ["cases", str(root), "--quiet"])
    assert res.exit_code == 2
    assert "validation: 3 ok, 1 with errors" in res.output
    assert "unknown QSM_mask label value(s) [33]" in res.output


# ----------------------------------------------------------------------------------------------
# the shared phantom cohort (realistic geometry: 300 x 300 x 70, 0.67 x 0.67 x 2 mm)


def test_phantom_cases_and_labels(phantom_root):
    from conftest import TEST_COHORT_SIZE
    from mrn_engine.data import find_labels

    cases = discover_cases(phantom_root)
    assert len(cases) == TEST_COHORT_SIZE
    assert all(c.nm and c.qsm and c.t1 and c.has_masks for c in cases)
    labels = find_labels(phantom_root)
    assert set(labels) == {c.case_id for c in cases}
    assert set(labels.values()) == {0, 1}


def test_phantom_rois_and_paste_back(phantom_root, tmp_path):
    cfg = get_preset("cpu-tiny").roi
    for files in discover_cases(phantom_root):
        case = load_case(files, require_masks=True)
        crops = extract_rois(case, cfg)
        for name, crop in crops.items():
            spec = ROI_BY_NAME[name]
            assert crop.image.shape == (cfg.slices[name], cfg.image_size, cfg.image_size)
            assert set(np.unique(crop.mask)) == set(range(spec.num_classes)), (files.case_id, name)
            # the nuclei carry contrast and are not saturated by the intensity window
            fg = crop.image[crop.mask > 0]
            assert (fg >= 254.5).mean() < 0.05, (files.case_id, name)
            # right/left midline between the two sides' centroids, near the volume centre
            assert abs(crop.midline_x - (case.shape[0] - 1) / 2) < 30
            # paste-back of the crop's own mask agrees with the source labels on its slices
            src = case.nm_mask.array if spec.modality == "NM" else case.qsm_mask.array
            back = paste_back(crop, crop.mask)
            zs = crop.slice_index[crop.slice_index >= 0]
            ref = roi_labels_only(src, name)[:, :, zs]
            assert dice(back[:, :, zs] > 0, ref > 0) > 0.85, (files.case_id, name)
            for lab in spec.labels:
                assert dice(back[:, :, zs] == lab, ref == lab) > 0.7, (files.case_id, name, lab)
    # NM SN is brighter than its surroundings in the NM ROI
    nm = crops["nm_sn"]
    assert nm.image[nm.mask == 1].mean() > nm.image[(nm.mask == 0) & (nm.image > 0)].mean() + 40
    # the cache serves the whole cohort
    cache = RoiCache(tmp_path / "cache")
    batch = stack_rois([cache.get_or_compute(f, cfg) for f in discover_cases(phantom_root)[:3]])
    assert batch["qsm_bg"]["image"].shape == (
        3,
        cfg.slices["qsm_bg"],
        cfg.image_size,
        cfg.image_size,
    )
