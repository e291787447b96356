"""Real nuclei geometry (issue 13): slice coverage of every preset on real patients' masks,
and phantoms built on those masks. Skipped when ``<repo>/../shared/data/real-geometry`` (the
organisers' example masks, never copied into this repository) is absent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mrn_engine.config import PRESETS, get_preset
from mrn_engine.data.labels import ROIS
from mrn_engine.errors import InputDataError
from mrn_engine.phantom.geometry import VOXEL_MM
from mrn_engine.rois import roi_box

GEOMETRY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-geometry"
needs_geometry = pytest.mark.skipif(
    not GEOMETRY.is_dir(), reason=f"{GEOMETRY} absent (real nuclei masks are not shipped)"
)


def seen_slices(z0: int, z1: int, n_stack: int, policy: str) -> set[int]:
    """Source slices of the box ``[z0, z1)`` that enter a stack of ``n_stack`` slices.

    ``"pad"``: the central ``n_stack`` (all if fewer). ``"resample"`` (linear in z,
    antialiased when shrinking, as ``torch.nn.functional.interpolate``): stack slice ``s``
    is centred at ``c = (s + 0.5) * n / S - 0.5`` and integrates source slices within
    ``max(1, n / S)`` of it.
    """
    n = z1 - z0
    if policy == "pad":
        if n <= n_stack:
            return set(range(z0, z1))
        start = z0 + (n - n_stack) // 2
        return set(range(start, start + n_stack))
    support = max(1.0, n / n_stack)
    out: set[int] = set()
    for s in range(n_stack):
        c = (s + 0.5) * n / n_stack - 0.5
        out |= {z0 + z for z in range(n) if abs(z - c) < support}
    return out


def test_seen_slices_model():
    assert seen_slices(0, 20, 8, "pad") == set(range(6, 14))
    assert seen_slices(0, 5, 8, "pad") == set(range(5))
    assert seen_slices(0, 20, 8, "resample") == set(range(20))
    assert seen_slices(3, 7, 8, "resample") == set(range(3, 7))


@needs_geometry
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_nucleus_slice_is_dropped_on_real_masks(preset):
    from mrn_engine.phantom.real_geometry import load_real_geometry

    rc = get_preset(preset).roi
    lost = []
    for subject in load_real_geometry(GEOMETRY):
        for spec in ROIS:
            mask = subject.nm if spec.modality == "NM" else subject.qsm
            box = roi_box(mask, spec.labels, VOXEL_MM, rc.margin_mm)
            seen = seen_slices(box.z0, box.z1, rc.slices[spec.name], rc.slice_policy)
            zs = set(np.nonzero(np.isin(mask, spec.labels).any(axis=(0, 1)))[0].tolist())
            if zs - seen:
                lost.append(f"{subject.name} {spec.name}: slices {sorted(zs - seen)}")
    assert not lost, f"{preset} drops nucleus slices: {lost}"


@needs_geometry
def test_the_old_cpu_tiny_policy_did_drop_slices():
    """What issue 13 measured: cpu-tiny with "pad" kept 8 of the ~18 basal-ganglia slices."""
    from mrn_engine.phantom.real_geometry import load_real_geometry

    subject = load_real_geometry(GEOMETRY)[0]
    spec = next(s for s in ROIS if s.name == "qsm_bg")
    box = roi_box(subject.qsm, spec.labels, VOXEL_MM, 4.0)
    zs = set(np.nonzero(np.isin(subject.qsm, spec.labels).any(axis=(0, 1)))[0].tolist())
    assert zs - seen_slices(box.z0, box.z1, 8, "pad")


@needs_geometry
def test_deformed_masks_keep_every_label_and_vary():
    from mrn_engine.phantom.real_geometry import deform_labels, load_real_geometry

    subject = load_real_geometry(GEOMETRY)[0]
    a = deform_labels(subject, np.random.default_rng(1))
    b = deform_labels(subject, np.random.default_rng(2))
    for (qsm, nm), other in ((a, b), (b, a)):
        assert set(np.unique(qsm)) == set(range(17)) and set(np.unique(nm)) == {0, 1, 2}
        for lab in range(1, 17):  # plausible sizes: within 35 % of the real nucleus
            ratio = (qsm == lab).sum() / (subject.qsm == lab).sum()
            assert 0.65 < ratio < 1.35, (lab, ratio)
        assert not np.array_equal(qsm, other[0])  # per-subject variation
        assert not np.array_equal(qsm, subject.qsm)


def test_bad_geometry_folder_is_a_clear_error(tmp_path):
    from mrn_engine.phantom.real_geometry import load_real_geometry

    with pytest.raises(InputDataError, match="no subject folder"):
        load_real_geometry(tmp_path)
    (tmp_path / "S1").mkdir()
    (tmp_path / "S1" / "QSM_pred.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputDataError, match="QSM_pred.nii.gz: unreadable"):
        load_real_geometry(str(tmp_path / "."))


@needs_geometry
def test_phantom_cohort_on_real_geometry(tmp_path):
    """``mrn phantom --geometry DIR --site B,C``: a valid cohort, real nuclei, same oracle."""
    from click.testing import CliRunner

    from mrn_engine.cli import cli
    from mrn_engine.data import discover_cases, find_labels, load_case
    from mrn_engine.phantom.model import oracle_accuracy

    out = tmp_path / "geo"
    args = ["phantom", "--out", str(out), "--n", "2", "--workers", "1", "--quiet"]
    res = CliRunner().invoke(cli, [*args, "--site", "B,C", "--geometry", str(GEOMETRY)])
    assert res.exit_code == 0, res.output
    assert "real nuclei of RJPD_002" in res.output and "sites: B 1, C 1" in res.output
    oracle = json.loads((out / "oracle.json").read_text())
    assert oracle["accuracy_analytic"] == pytest.approx(oracle_accuracy(1.0))
    with open(out / "phantom_latents.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["site"] for r in rows) == ["B", "C"]
    assert all(r["geometry"].startswith("RJPD_") for r in rows)
    labels = find_labels(out)
    for files in discover_cases(out):
        case = load_case(files, labels[files.case_id], require_masks=True)
        assert set(np.unique(case.qsm_mask.array)) == set(range(17))
        assert set(np.unique(case.nm_mask.array)) == {0, 1, 2}
    settings = json.loads((out / "phantom.json").read_text())
    assert set(settings["sites"]) == {"B", "C"} and settings["geometry"]["subjects"]
