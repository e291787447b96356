"""napari-mrn display mapping, reader, writer, ROI boxes and run helpers (no Qt window needed;
the viewer-level tests are in test_napari_gui.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrn_engine.data import load_volume
from mrn_engine.data.labels import NM_LABELS, QSM_LABELS
from mrn_engine.errors import InputDataError
from napari_mrn._display import DisplayMapping
from napari_mrn._layers import label_colour, roi_boxes_layer, roi_labels_layer
from napari_mrn._reader import napari_get_reader, read_case_folder
from napari_mrn._writer import layer_to_volume, write_labels

#: the challenge grid, scaled down: LAS, 0.667 x 0.667 x 2 mm
SPACING = (0.6667, 0.6667, 2.0)
SHAPE = (40, 36, 12)


def challenge_affine(spacing=SPACING, origin=(13.0, -110.0, -50.0)) -> np.ndarray:
    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return aff


def write_case(
    root: Path,
    case_id: str = "RJPD_900",
    *,
    shape=SHAPE,
    seed: int = 0,
    qsm_affine: np.ndarray | None = None,
    drop_labels: tuple[int, ...] = (),
) -> Path:
    """A small case folder in the challenge layout with distinct, checkable voxel values."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    aff = challenge_affine()
    nm = rng.uniform(5000, 9000, shape).astype(np.float32)
    qsm = rng.normal(0, 30, shape).astype(np.float32)
    qsm_mask = np.zeros(shape, np.uint8)
    nm_mask = np.zeros(shape, np.uint8)
    # one small block per structure (1/2 caudate ... 15/16 dentate): right side at low X
    # (= subject right), left side mirrored; basal ganglia high, midbrain middle, dentate low
    for i in range(8):
        y0 = 2 + 4 * i
        z0 = 7 if i < 4 else (3 if i < 7 else 0)
        qsm_mask[8:12, y0 : y0 + 3, z0 : z0 + 3] = 2 * i + 1
        qsm_mask[28:32, y0 : y0 + 3, z0 : z0 + 3] = 2 * i + 2
        if i == 5:  # SN: also the NM mask
            nm_mask[8:12, y0 : y0 + 3, z0 : z0 + 3] = 1
            nm_mask[28:32, y0 : y0 + 3, z0 : z0 + 3] = 2
    qsm_mask[np.isin(qsm_mask, drop_labels)] = 0
    for name, arr, a in (
        ("NM", nm, aff),
        ("QSM", qsm, qsm_affine if qsm_affine is not None else aff),
        ("QSM_mask", qsm_mask, aff),
        ("NM_mask", nm_mask, aff),
    ):
        img = nib.Nifti1Image(arr, a)
        img.set_qform(a, 1)
        img.set_sform(a, 1)
        nib.save(img, folder / f"{name}.nii.gz")
    return folder


# ----------------------------------------------------------------------------- display mapping
def test_las_mapping_is_axial_radiological_with_spacing_as_scale():
    m = DisplayMapping(challenge_affine(), SHAPE)
    a = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    d = m.to_display(a)
    # slider = Z (inferior -> superior), rows = Y flipped (anterior at the top), cols = X
    np.testing.assert_array_equal(d, a.transpose(2, 1, 0)[:, ::-1, :])
    assert m.display_shape == (12, 36, 40)
    assert m.scale == pytest.approx((2.0, 0.6667, 0.6667))
    # radiological: column 0 is the subject's right (lowest X), row 0 the most anterior voxel
    world_col0 = challenge_affine() @ [0, 0, 0, 1]
    world_col_last = challenge_affine() @ [SHAPE[0] - 1, 0, 0, 1]
    assert world_col0[0] > world_col_last[0]  # RAS: larger x = more right


@pytest.mark.parametrize(
    "axcodes", [("R", "A", "S"), ("L", "P", "S"), ("A", "S", "R"), ("L", "A", "I")]
)
def test_mapping_round_trip_and_index_mapping_for_any_orientation(axcodes):
    target = nib.orientations.axcodes2ornt(axcodes)
    aff = nib.orientations.inv_ornt_aff(
        nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), target),
        SHAPE,
    ) @ np.diag([0.7, 0.8, 2.0, 1.0])
    assert nib.aff2axcodes(aff) == axcodes
    m = DisplayMapping(aff, SHAPE)
    a = np.random.default_rng(1).random(SHAPE)
    d = m.to_display(a)
    np.testing.assert_array_equal(m.from_display(d), a)
    # every display array is shown S (slider) / P (rows) / L (cols) whatever the source order
    disp_aff = aff @ nib.orientations.inv_ornt_aff(m.transform, SHAPE)
    assert nib.aff2axcodes(disp_aff) == ("S", "P", "L")
    ijk = np.array([[3, 5, 7], [0, 0, 0], [39, 35, 11]])
    for src, dst in zip(ijk, m.index_to_display(ijk).astype(int), strict=True):
        assert d[tuple(dst)] == a[tuple(src)]


def test_from_display_rejects_wrong_shape():
    m = DisplayMapping(challenge_affine(), SHAPE)
    with pytest.raises(ValueError, match="display grid"):
        m.from_display(np.zeros(SHAPE))


# ----------------------------------------------------------------------------- reader
def test_reader_claims_case_folders_and_nifti_only(tmp_path):
    folder = write_case(tmp_path)
    assert napari_get_reader(str(folder)) is not None
    assert napari_get_reader(str(folder / "QSM.nii.gz")) is not None
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    (tmp_path / "empty").mkdir()
    assert napari_get_reader(str(tmp_path / "empty")) is None


def test_read_case_folder_layers_geometry_and_labels(tmp_path):
    folder = write_case(tmp_path)
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in read_case_folder(folder)}
    assert list(layers) == ["NM", "QSM", "NM_mask", "QSM_mask"]
    qsm = load_volume(folder / "QSM.nii.gz")
    data, kw, kind = layers["QSM"]
    assert kind == "image" and data.shape == (12, 36, 40)
    assert kw["scale"] == pytest.approx((2.0, 0.6667, 0.6667), abs=1e-4)
    np.testing.assert_allclose(kw["metadata"]["affine"], qsm.affine)
    assert kw["metadata"]["header"] is not None and kw["metadata"]["case_id"] == "RJPD_900"
    np.testing.assert_array_equal(data, qsm.array.transpose(2, 1, 0)[:, ::-1, :])
    lo, hi = kw["contrast_limits"]
    assert lo == -hi and hi > 0  # QSM window symmetric around 0

    mdata, mkw, mkind = layers["QSM_mask"]
    assert mkind == "labels" and mdata.dtype == np.uint8
    names = dict(zip(mkw["features"]["index"], mkw["features"]["name"], strict=True))
    assert names[3] == QSM_LABELS[3] == "putamen_R" and names[11] == "SN_R"
    cmap = mkw["colormap"]
    np.testing.assert_allclose(cmap.color_dict[3][:3], label_colour("putamen_R")[:3])
    assert cmap.color_dict[0][3] == 0  # background transparent
    # right putamen (low X) is on the screen's left half; left putamen on the right half
    cols_r = np.nonzero(mdata == 3)[2]
    cols_l = np.nonzero(mdata == 4)[2]
    assert cols_r.max() < SHAPE[0] / 2 < cols_l.min()
    assert set(np.unique(mdata)) == set(range(17))
    nm_names = dict(
        zip(
            layers["NM_mask"][1]["features"]["index"],
            layers["NM_mask"][1]["features"]["name"],
            strict=True,
        )
    )
    assert nm_names[1] == NM_LABELS[1]


def test_reader_mismatched_grid_is_a_clear_error(tmp_path):
    folder = write_case(tmp_path, qsm_affine=challenge_affine(origin=(0.0, 0.0, 0.0)))
    with pytest.raises(InputDataError, match="QSM.nii.gz: not on the grid"):
        read_case_folder(folder)


def test_reader_refuses_a_cohort_root(tmp_path):
    write_case(tmp_path, "RJPD_001")
    write_case(tmp_path, "RJPD_002", seed=1)
    with pytest.raises(InputDataError, match="holds 2 cases"):
        read_case_folder(tmp_path)


# ----------------------------------------------------------------------------- writer
def test_writer_round_trip_restores_source_geometry(tmp_path):
    folder = write_case(tmp_path)
    ((data, kw, _),) = [t for t in read_case_folder(folder) if t[1]["name"] == "QSM_mask"]
    edited = data.copy()
    edited[0, 0, 0] = 16  # paint one voxel in display space: Z=0, most anterior row, col 0
    out = write_labels(
        str(tmp_path / "out" / "edited"), edited, {"metadata": kw["metadata"], "name": "QSM_mask"}
    )
    assert out == [str(tmp_path / "out" / "edited.nii.gz")]
    img = nib.load(out[0])
    src = nib.load(folder / "QSM_mask.nii.gz")
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    arr = np.asarray(img.dataobj)
    assert arr.dtype == np.uint8 and arr.shape == SHAPE
    expected = np.asarray(src.dataobj).copy()
    expected[0, SHAPE[1] - 1, 0] = 16  # X=0, Y=max (anterior), Z=0
    np.testing.assert_array_equal(arr, expected)


def test_writer_without_geometry_says_so():
    with pytest.raises(InputDataError, match="layer 'x': no NIfTI geometry"):
        layer_to_volume(np.zeros((2, 3, 4)), {}, name="layer 'x'")


# ----------------------------------------------------------------------------- ROI boxes
def test_roi_boxes_one_rectangle_per_slice_enclosing_the_box():
    from mrn_engine.rois import CropBox

    m = DisplayMapping(challenge_affine(), SHAPE)
    box = CropBox(x0=5, x1=9, y0=10, y1=14, z0=3, z1=6)
    shapes, kw, kind = roi_boxes_layer({"qsm_bg": box}, m)
    assert kind == "shapes" and len(shapes) == 3
    assert list(kw["features"]["title"]) == ["QSM basal ganglia"] * 3
    assert sorted(int(s[0, 0]) for s in shapes) == [3, 4, 5]
    rect = shapes[0]
    # display rows = flipped Y: rows 36-1-13 .. 36-1-10, cols = X 5..8, half a voxel outside
    assert rect[:, 1].min() == pytest.approx(22 - 0.5) and rect[:, 1].max() == pytest.approx(
        25 + 0.5
    )
    assert rect[:, 2].min() == pytest.approx(5 - 0.5) and rect[:, 2].max() == pytest.approx(8 + 0.5)


def test_roi_labels_readable_in_roi_colour_and_nested_labels_apart():
    from mrn_engine.rois import CropBox
    from napari_mrn._layers import ROI_COLOURS

    m = DisplayMapping(challenge_affine(), SHAPE)
    # like the real ROIs: the NM-SN box nested in the midbrain box, just below its top edge
    boxes = {
        "qsm_midbrain": CropBox(x0=5, x1=30, y0=4, y1=30, z0=3, z1=5),
        "nm_sn": CropBox(x0=8, x1=27, y0=6, y1=27, z0=3, z1=5),
    }
    points, kw, kind = roi_labels_layer(boxes, m)
    assert kind == "points" and points.shape == (4, 3)  # one label per ROI and slice
    assert list(kw["features"]["title"]) == ["QSM midbrain"] * 2 + ["NM-SN"] * 2
    text = kw["text"]
    assert text["size"] >= 12 and text["anchor"] == "upper_left"  # text grows up-right
    np.testing.assert_allclose(text["color"][0], (*ROI_COLOURS["qsm_midbrain"], 1.0))
    np.testing.assert_allclose(text["color"][2], (*ROI_COLOURS["nm_sn"], 1.0))
    rects, _, _ = roi_boxes_layer(boxes, m)
    (mid_r0, mid_r1), (sn_r0, sn_r1) = (
        (rects[i][:, 1].min(), rects[i][:, 1].max()) for i in (0, 2)
    )
    mid, sn = points[0], points[2]
    assert mid[1] < mid_r0  # above the midbrain box (outside it)
    assert mid[2] == pytest.approx(rects[0][:, 2].min())  # at its left edge
    # NM-SN: inside its own box, at the lower-left corner, far from the midbrain's top edge
    assert sn_r0 < sn[1] < sn_r1 and sn[1] > (sn_r0 + sn_r1) / 2
    assert rects[2][:, 2].min() < sn[2] < rects[2][:, 2].max()
    assert sorted(int(p[0]) for p in points) == [3, 3, 4, 4]
    assert kw["size"] == 0  # the points themselves are invisible


def test_pd_pred_writer_refuses_a_call_other_than_0_or_1(tmp_path):
    """The engine's one PD_pred.txt writer (used by the panel's Save) takes 0 or 1 only."""
    from mrn_engine.inference import write_pd_pred

    assert write_pd_pred(tmp_path, 1).read_bytes() == b"1"
    with pytest.raises(InputDataError, match="must be 0"):
        write_pd_pred(tmp_path / "two", 2)
    assert not (tmp_path / "two").exists()
