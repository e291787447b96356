"""Tests of the challenge-format data layer (mrn_engine.data): I/O, discovery, labels, validation."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrn_engine.data import (
    CaseFiles,
    Volume,
    case_table,
    check_duplicates,
    discover_cases,
    find_label_splits,
    find_labels,
    load_case,
    load_volume,
    read_labels_csv,
    save_volume,
)
from mrn_engine.errors import InputDataError, MRNWarning

# ----------------------------------------------------------------------------------------------
# shared synthetic-case helpers (also imported by test_rois.py)

SHAPE = (60, 60, 20)
SPACING = (0.6667, 0.6667, 2.0)

#: right-side (odd) QSM label -> box (x0, x1, y0, y1, z0, z1); left side = mirror in x
RIGHT_BOXES = {
    1: (22, 26, 36, 42, 12, 17),  # caudate
    3: (16, 20, 28, 36, 11, 16),  # putamen
    5: (21, 24, 28, 33, 11, 15),  # globus pallidus
    7: (24, 29, 18, 26, 11, 16),  # thalamus
    9: (24, 26, 27, 29, 8, 10),  # STN
    11: (22, 27, 21, 25, 6, 9),  # SN
    13: (25, 28, 25, 27, 6, 9),  # RN
    15: (18, 23, 6, 11, 2, 5),  # dentate
}
#: mean QSM value per right label (ppb-like, as in the real data)
QSM_VALUES = {1: 50, 3: 45, 5: 125, 7: -10, 9: 100, 11: 140, 13: 112, 15: 105}


def affine_las(spacing=SPACING) -> np.ndarray:
    """An LAS affine like the challenge's (x flipped)."""
    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [100.0, -100.0, -20.0]
    return aff


def synthetic_arrays(shape=SHAPE, seed: int = 0) -> dict[str, np.ndarray]:
    """NM, QSM, T1 and masks with cubes of every label (right at low x, left mirrored)."""
    rng = np.random.default_rng(seed)
    right = np.zeros(shape, np.uint8)
    for lab, (x0, x1, y0, y1, z0, z1) in RIGHT_BOXES.items():
        right[x0:x1, y0:y1, z0:z1] = lab
    left = np.flip(right, axis=0)
    qsm_mask = np.where(right > 0, right, np.where(left > 0, left + 1, 0)).astype(np.uint8)
    nm_mask = np.zeros(shape, np.uint8)
    nm_mask[qsm_mask == 11] = 1
    nm_mask[qsm_mask == 12] = 2
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    brain2d = ((xx - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + (
        (yy - shape[1] / 2) / (shape[1] * 0.45)
    ) ** 2 < 1
    brain = np.repeat(brain2d[:, :, None], shape[2], axis=2)
    qsm = rng.normal(0, 15, shape).astype(np.float32)
    for lab, val in QSM_VALUES.items():
        qsm[(qsm_mask == lab) | (qsm_mask == lab + 1)] += val
    qsm[~brain] = 0.0
    nm = rng.normal(6500, 500, shape).astype(np.float32)
    nm[nm_mask > 0] += 14000
    t1 = rng.normal(1000, 50, shape).astype(np.float32)
    return {"NM": nm, "QSM": qsm, "T1": t1, "NM_mask": nm_mask, "QSM_mask": qsm_mask}


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save an array as NIfTI with the synthetic geometry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine if affine is not None else affine_las())
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def write_case(
    folder: Path,
    *,
    seed: int = 0,
    masks: bool = True,
    t1: bool = True,
    overrides: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a synthetic case folder in the challenge layout; ``overrides`` replace arrays."""
    arrays = synthetic_arrays(seed=seed)
    arrays.update(overrides or {})
    for stem, arr in arrays.items():
        if (not masks and stem.endswith("_mask")) or (not t1 and stem == "T1"):
            continue
        write_nifti(folder / f"{stem}.nii.gz", arr)
    return folder


def make_cohort(root: Path, n: int = 4) -> Path:
    """n cases in nested release folders + train/val CSVs (balanced labels)."""
    ids = [f"RJPD_{i:03d}" for i in range(n)]
    for i, cid in enumerate(ids):
        parent = root / "release" / ("train" if i < n // 2 else "val") / "nested"
        write_case(parent / cid, seed=i)
    half = n // 2
    (root / "train_cases.csv").write_text(
        "".join(f"{c},{i % 2}\n" for i, c in enumerate(ids[:half]))
    )
    (root / "release" / "val_cases.csv").write_text(
        "".join(f"{c},{i % 2}\n" for i, c in enumerate(ids[half:]))
    )
    return root


def anatomical_path() -> Path:
    return Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


# ----------------------------------------------------------------------------------------------
# I/O


def test_anatomical_roundtrip_keeps_geometry(tmp_path):
    vol = load_volume(anatomical_path())
    assert vol.shape == (33, 41, 25) and vol.array.dtype == np.float32
    assert vol.spacing == (2.0, 2.0, 2.0)
    out = save_volume(vol.like(vol.array * 2), tmp_path / "sub" / "x.nii.gz")
    back = load_volume(out)
    np.testing.assert_allclose(back.array, vol.array * 2)
    np.testing.assert_allclose(back.affine, vol.affine)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(vol.affine) == ("L", "A", "S")
    assert back.spacing == vol.spacing
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


def test_save_mask_uint8_and_refuse_overwrite(tmp_path):
    src = write_nifti(tmp_path / "img.nii", synthetic_arrays()["QSM"])  # plain .nii accepted
    vol = load_volume(src)
    mask = vol.like(np.arange(vol.array.size).reshape(vol.shape) % 17)
    assert mask.kind == "mask"
    out = save_volume(mask, tmp_path / "mask.nii.gz")
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), mask.array)
    np.testing.assert_allclose(img.affine, vol.affine)
    with pytest.raises(InputDataError, match="refusing to overwrite the input"):
        save_volume(vol.like(vol.array + 1), src)


def test_load_volume_missing_file(tmp_path):
    with pytest.raises(InputDataError, match=r"nope\.nii\.gz: file not found"):
        load_volume(tmp_path / "nope.nii.gz")


def test_truncated_gzip(tmp_path):
    good = write_nifti(tmp_path / "NM.nii.gz", synthetic_arrays()["NM"])
    data = good.read_bytes()
    bad = tmp_path / "RJPD_001" / "NM.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match=r"RJPD_001/NM\.nii\.gz: unreadable or truncated"):
        load_volume(bad)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(InputDataError, match=r"junk\.nii\.gz: unreadable or truncated"):
        load_volume(junk)


def test_fast_gzip_io_matches_nibabel(tmp_path):
    """ISA-L-written .nii.gz opens with plain gzip/nibabel; the fast read equals nibabel's."""
    arrays = synthetic_arrays()
    vol = load_volume(write_nifti(tmp_path / "src.nii", arrays["NM"]))
    out = save_volume(vol, tmp_path / "NM.nii.gz")
    assert out.read_bytes()[4:8] == b"\0\0\0\0"  # gzip time stamp 0: same image, same bytes
    raw = gzip.decompress(out.read_bytes())  # standard library reader
    img = nib.Nifti1Image.from_bytes(raw)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), arrays["NM"].astype(np.float32))
    fast = load_volume(out).array
    np.testing.assert_array_equal(load_volume(out, fast_gzip=False).array, fast)
    # bytes after the gzip stream: ISA-L refuses the whole file, nibabel reads it: same data
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(out.read_bytes() + b"\0" * 64)
    np.testing.assert_array_equal(load_volume(padded).array, fast)


def _scaled_int16(arr):
    img = nib.Nifti1Image(arr.astype(np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)  # as scanners write: int16 with a slope
    return img


def _big_endian(arr):
    hdr = nib.Nifti1Header().as_byteswapped(">")
    return nib.Nifti1Image(arr.astype(">f4"), np.eye(4), header=hdr)


def _with_extension(arr):
    img = nib.Nifti1Image(arr.astype(np.float32), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment"))
    return img


@pytest.mark.parametrize(
    "make",
    [
        _scaled_int16,
        _big_endian,
        _with_extension,
        lambda a: nib.Nifti2Image(a.astype(np.float32), np.eye(4)),
    ],
    ids=["int16-slope", "big-endian", "extension", "nifti2"],
)
def test_fast_gzip_read_of_other_writers_files(tmp_path, make):
    """Files nibabel (zlib) wrote, in the forms scanners and tools produce: ISA-L reads them
    itself (no fallback) and gets nibabel's voxels, scaling applied."""
    from mrn_engine.data import nifti as nifti_io

    arr = np.random.default_rng(0).integers(-2000, 3000, (20, 22, 9))
    path = tmp_path / "x.nii.gz"
    nib.save(make(arr), str(path))
    assert nifti_io._read_gz_whole(path, nib.load(str(path))) is not None
    expected = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    np.testing.assert_array_equal(load_volume(path).array, expected)
    np.testing.assert_array_equal(load_volume(path, fast_gzip=False).array, expected)


def test_non_3d_rejected(tmp_path):
    p = write_nifti(tmp_path / "QSM.nii.gz", np.zeros((10, 10, 4, 3), np.float32))
    with pytest.raises(InputDataError, match=r"QSM\.nii\.gz: expected a 3D volume, got 4D"):
        load_volume(p)
    p2 = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 10), np.float32))
    with pytest.raises(InputDataError, match="got 2D"):
        load_volume(p2)
    # a trailing singleton dimension is harmless
    p3 = write_nifti(tmp_path / "t.nii.gz", np.ones((10, 10, 4, 1), np.float32))
    assert load_volume(p3).shape == (10, 10, 4)


def test_nan_inf_rejected(tmp_path):
    arr = synthetic_arrays()["QSM"]
    arr[1, 2, 3] = np.nan
    arr[4, 5, 6] = np.inf
    arr[4, 5, 7] = -np.inf
    p = write_nifti(tmp_path / "QSM.nii.gz", arr)
    with pytest.raises(
        InputDataError, match=r"QSM\.nii\.gz: 3 non-finite voxel\(s\) \(1 NaN, 2 Inf\)"
    ):
        load_volume(p)


def test_mask_non_integer_rejected(tmp_path):
    p = write_nifti(tmp_path / "QSM_mask.nii.gz", np.full((5, 5, 5), 1.5, np.float32))
    with pytest.raises(InputDataError, match=r"QSM_mask\.nii\.gz: mask holds non-integer"):
        load_volume(p, kind="mask")


# ----------------------------------------------------------------------------------------------
# discovery, labels, table


def test_discover_nested_and_other_folders(tmp_path):
    make_cohort(tmp_path, n=4)
    write_case(tmp_path / "extra" / "subjectA", masks=False, t1=False)  # not RJPD_ but has NM/QSM
    (tmp_path / "RJPD_999").mkdir()  # named like a case, empty
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == [
        "RJPD_000",
        "RJPD_001",
        "RJPD_002",
        "RJPD_003",
        "RJPD_999",
        "subjectA",
    ]
    c0 = cases[0]
    assert c0.nm.name == "NM.nii.gz" and c0.qsm_mask.name == "QSM_mask.nii.gz" and c0.has_masks
    sa = cases[-1]
    assert sa.nm is not None and sa.t1 is None and sa.nm_mask is None and not sa.has_masks
    assert cases[4].nm is None


def test_discover_redundant_nesting(tmp_path):
    write_case(tmp_path / "RJPD_001" / "RJPD_001", masks=False)
    write_case(tmp_path / "RJPD_002" / "images", masks=False)
    (tmp_path / "RJPD_003" / "sub").mkdir(parents=True)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["RJPD_001", "RJPD_002", "RJPD_003"]
    assert cases[0].folder == tmp_path / "RJPD_001" / "RJPD_001" and cases[0].nm is not None
    assert cases[1].folder == tmp_path / "RJPD_002" / "images" and cases[1].qsm is not None
    assert cases[2].nm is None and cases[2].qsm is None
    assert discover_cases(tmp_path / "RJPD_002")[0].case_id == "RJPD_002"


def test_uncompressed_nii_case(tmp_path):
    arrays = synthetic_arrays()
    folder = tmp_path / "RJPD_020"
    for stem, arr in arrays.items():
        write_nifti(folder / f"{stem}.nii", arr)
    (cf,) = discover_cases(tmp_path)
    assert cf.nm.name == "NM.nii" and cf.qsm_mask.name == "QSM_mask.nii"
    case = load_case(cf, require_masks=True)
    np.testing.assert_array_equal(case.qsm_mask.array, arrays["QSM_mask"])


def test_discover_duplicate_case_id(tmp_path):
    write_case(tmp_path / "a" / "RJPD_005", masks=False)
    write_case(tmp_path / "b" / "RJPD_005", masks=False)
    with pytest.raises(InputDataError, match="RJPD_005: case found twice"):
        discover_cases(tmp_path)


def test_discover_not_a_folder(tmp_path):
    with pytest.raises(InputDataError, match="not a folder"):
        discover_cases(tmp_path / "missing")


def test_read_labels_csv(tmp_path):
    p = tmp_path / "train_cases.csv"
    p.write_text("RJPD_000,0\nRJPD_001,1\n\nRJPD_002,1\n")
    assert read_labels_csv(p) == {"RJPD_000": 0, "RJPD_001": 1, "RJPD_002": 1}
    p.write_text("case_id,label\nRJPD_000,0\n")  # a header written by mistake is tolerated
    assert read_labels_csv(p) == {"RJPD_000": 0}


def test_read_labels_csv_bad_values(tmp_path):
    p = tmp_path / "train_cases.csv"
    p.write_text("RJPD_000,0\nRJPD_001,2\nRJPD_002,PD\n")
    with pytest.raises(InputDataError) as ei:
        read_labels_csv(p)
    msg = str(ei.value)
    assert msg.startswith(str(p))
    assert "line 2: label '2' of RJPD_001 is not 0 (HC) or 1 (PD)" in msg
    assert "line 3: label 'PD' of RJPD_002" in msg
    p.write_text("RJPD_000,0,extra\n")
    with pytest.raises(InputDataError, match="expected 'case_id,label'"):
        read_labels_csv(p)
    p.write_text("RJPD_000,0\nRJPD_000,1\n")
    with pytest.raises(InputDataError, match="RJPD_000 labelled both 0 and 1"):
        read_labels_csv(p)


def test_labels_csv_unknown_cases(tmp_path):
    make_cohort(tmp_path, n=2)
    csv = tmp_path / "train_cases.csv"
    csv.write_text("RJPD_000,0\nRJPD_077,1\nRJPD_078,0\n")
    with pytest.raises(InputDataError) as ei:
        find_labels(tmp_path)
    assert str(ei.value).startswith(str(csv))
    assert "no case folder: RJPD_077, RJPD_078" in str(ei.value)
    assert find_labels(tmp_path, check_cases=False)["RJPD_077"] == 1


def test_find_labels_and_case_table(tmp_path):
    make_cohort(tmp_path, n=4)
    assert find_labels(tmp_path) == {"RJPD_000": 0, "RJPD_001": 1, "RJPD_002": 0, "RJPD_003": 1}
    splits = find_label_splits(tmp_path)
    assert splits["RJPD_001"] == (1, "train") and splits["RJPD_003"] == (1, "val")
    write_case(tmp_path / "RJPD_010", masks=False, t1=False)
    rows = {r["case_id"]: r for r in case_table(tmp_path)}
    assert len(rows) == 5
    assert rows["RJPD_002"]["label"] == 0 and rows["RJPD_002"]["split"] == "val"
    assert rows["RJPD_002"]["NM_mask"] and rows["RJPD_002"]["T1"]
    assert rows["RJPD_010"]["label"] is None and not rows["RJPD_010"]["QSM_mask"]
    assert rows["RJPD_010"]["NM"] and not rows["RJPD_010"]["T1"]


# ----------------------------------------------------------------------------------------------
# load_case validation


def test_load_case_ok(tmp_path):
    folder = write_case(tmp_path / "RJPD_001")
    case = load_case(folder, label=1, require_masks=True)
    assert case.case_id == "RJPD_001" and case.label == 1
    assert case.shape == SHAPE
    np.testing.assert_allclose(case.spacing, SPACING, rtol=1e-5)
    assert case.nm_mask.array.dtype == np.uint8
    assert set(np.unique(case.qsm_mask.array)) == set(range(17))
    assert case.t1 is not None and case.nm.path.name == "NM.nii.gz"
    case2 = load_case(CaseFiles.from_folder(folder))
    np.testing.assert_array_equal(case2.qsm.array, case.qsm.array)
    (folder / "T1.nii.gz").write_bytes(b"not a NIfTI")  # with_t1=False never opens it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lean = load_case(folder, with_t1=False)
    assert lean.t1 is None and lean.nm_mask is not None
    np.testing.assert_array_equal(lean.nm.array, case.nm.array)
    with pytest.warns(MRNWarning, match="T1"):
        assert load_case(folder).t1 is None  # read, reported, dropped


def test_nm_qsm_grid_shape_mismatch(tmp_path):
    folder = write_case(
        tmp_path / "RJPD_002",
        overrides={"QSM": np.random.default_rng(0).normal(0, 9, (60, 60, 18)).astype(np.float32)},
    )
    with pytest.raises(InputDataError) as ei:
        load_case(folder)
    msg = str(ei.value)
    assert msg.startswith(str(folder / "QSM.nii.gz"))
    assert "(60, 60, 18) vs (60, 60, 20)" in msg and "NM and QSM" in msg


def test_nm_qsm_grid_affine_mismatch(tmp_path):
    folder = write_case(tmp_path / "RJPD_003")
    aff = affine_las()
    aff[0, 3] += 5.0
    write_nifti(folder / "QSM.nii.gz", synthetic_arrays()["QSM"], aff)
    with pytest.raises(InputDataError) as ei:
        load_case(folder)
    msg = str(ei.value)
    assert "QSM.nii.gz: not on the grid of" in msg and "affine" in msg
    assert "105." in msg and "100." in msg  # both translations shown


def test_mask_grid_mismatch(tmp_path):
    folder = write_case(tmp_path / "RJPD_004")
    write_nifti(folder / "NM_mask.nii.gz", np.zeros((60, 60, 19), np.uint8))
    with pytest.raises(
        InputDataError,
        match=r"NM_mask\.nii\.gz: not on the grid of .*NM\.nii\.gz.*"
        r"mask must share its image's grid",
    ):
        load_case(folder)


def test_unknown_mask_labels(tmp_path):
    m = synthetic_arrays()["QSM_mask"]
    m[0, 0, 0] = 17
    m[0, 0, 1] = 40
    folder = write_case(tmp_path / "RJPD_005", overrides={"QSM_mask": m})
    with pytest.raises(
        InputDataError, match=r"QSM_mask\.nii\.gz: unknown QSM_mask label value\(s\) \[17, 40\]"
    ):
        load_case(folder)
    nm = synthetic_arrays()["NM_mask"]
    nm[0, 0, 0] = 3
    folder = write_case(tmp_path / "RJPD_006", overrides={"NM_mask": nm})
    with pytest.raises(
        InputDataError, match=r"NM_mask\.nii\.gz: unknown NM_mask label value\(s\) \[3\]"
    ):
        load_case(folder)


def test_missing_files(tmp_path):
    folder = write_case(tmp_path / "RJPD_007", masks=False)
    with pytest.raises(InputDataError, match=r"RJPD_007: NM_mask\.nii\.gz missing"):
        load_case(folder, require_masks=True)
    os.remove(folder / "QSM.nii.gz")
    with pytest.raises(InputDataError, match=r"RJPD_007: QSM\.nii\.gz missing"):
        load_case(folder)
    with pytest.raises(InputDataError, match="case folder not found"):
        load_case(tmp_path / "nothing")


def test_case_nan_names_file(tmp_path):
    nm = synthetic_arrays()["NM"]
    nm[3, 3, 3] = np.nan
    folder = write_case(tmp_path / "RJPD_008", overrides={"NM": nm})
    with pytest.raises(InputDataError, match=r"RJPD_008/NM\.nii\.gz: 1 non-finite"):
        load_case(folder)


def test_check_duplicates_warns(tmp_path):
    make_cohort(tmp_path, n=3)
    cases = discover_cases(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_duplicates(cases) == []
    src = cases[0].nm
    (cases[2].nm).write_bytes(src.read_bytes())
    with pytest.warns(MRNWarning, match="RJPD_000 and RJPD_002: byte-identical NM"):
        pairs = check_duplicates(discover_cases(tmp_path))
    assert pairs == [("RJPD_000", "RJPD_002")]


def test_volume_like_checks_shape():
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert vol.spacing == (1.0, 1.0, 1.0)
    with pytest.raises(InputDataError, match="does not fit the grid"):
        vol.like(np.zeros((4, 4, 3)))


# ----------------------------------------------------------------------------------------------
# headless import


def test_engine_imports_without_napari_or_qt():
    """Every module of mrn_engine imports with napari/Qt/magicgui made unimportable."""
    code = (
        "import sys, pkgutil, importlib; sys.modules['napari']=None; sys.modules['qtpy']=None; "
        "sys.modules['PyQt6']=None; sys.modules['PyQt5']=None; sys.modules['magicgui']=None; "
        "import mrn_engine; "
        "mods=[m.name for m in pkgutil.walk_packages(mrn_engine.__path__, 'mrn_engine.') "
        "]; [importlib.import_module(m) for m in mods]; "
        "assert len(mods) > 60, len(mods); "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('napari','qtpy','PyQt6','PyQt5','magicgui') "
        "and sys.modules[m] is not None]; assert not bad, bad; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
