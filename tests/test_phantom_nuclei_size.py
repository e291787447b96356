"""Atlas nuclei eroded to the challenge masks' sizes (``mrn phantom --nuclei challenge``)."""

from __future__ import annotations

import numpy as np
import pytest

from mrn_engine.data.labels import QSM_LABELS
from mrn_engine.phantom import make_phantom_case
from mrn_engine.phantom.geometry import VOXEL_MM
from mrn_engine.phantom.nuclei_size import (
    CHALLENGE_VOLUME_MM3,
    draw_target_volumes,
    erode_to_volumes,
    nucleus_type,
)

VOXEL_MM3 = float(np.prod(VOXEL_MM))


def test_erosion_keeps_the_exact_volume_and_the_deepest_voxels():
    labels = np.zeros((40, 40, 12), np.uint8)
    labels[5:25, 5:25, 2:10] = 3  # a box: its core is its centre
    labels[28:34, 28:34, 4:8] = 7  # smaller than its target: kept whole
    target = {3: 600 * VOXEL_MM3, 7: 10_000.0}
    out = erode_to_volumes(labels, target, VOXEL_MM)
    assert (out == 3).sum() == 600
    assert (out == 7).sum() == (labels == 7).sum()
    assert np.all(labels[out == 3] == 3)  # never grows, never relabels
    kept = np.argwhere(out == 3)
    assert kept[:, 0].min() > 5 and kept[:, 0].max() < 24  # the outer shell went first
    assert np.array_equal(labels, erode_to_volumes(labels, {}, VOXEL_MM))  # no target: no change


def test_target_volumes_follow_the_challenge_masks():
    draws = [draw_target_volumes(np.random.default_rng(s)) for s in range(400)]
    assert set(draws[0]) == set(QSM_LABELS)
    for kind, (mean, cv) in CHALLENGE_VOLUME_MM3.items():
        labs = [lab for lab in QSM_LABELS if nucleus_type(lab) == kind]
        v = np.array([[d[lab] for lab in labs] for d in draws])
        assert v.mean() == pytest.approx(mean, rel=0.04), kind
        assert np.std(np.log(v)) == pytest.approx(cv, rel=0.2), kind
        assert 0.3 < np.corrcoef(np.log(v).T)[0, 1] < 0.7, kind  # left and right correlate


def test_phantom_nuclei_have_the_challenge_sizes():
    hc = make_phantom_case(0, 11, "RJPD_900", nuclei="challenge")
    for lab in QSM_LABELS:
        mean, cv = CHALLENGE_VOLUME_MM3[nucleus_type(lab)]
        vol = float((hc.qsm_mask == lab).sum()) * VOXEL_MM3
        # the globus pallidus of the atlas is already about the challenge's size
        lo = mean * np.exp(-3 * cv) if nucleus_type(lab) != "globus_pallidus" else 0.5 * mean
        assert lo <= vol <= mean * np.exp(3 * cv), (QSM_LABELS[lab], vol, mean)


def test_cli_nuclei_option(tmp_path):
    import json

    from click.testing import CliRunner

    from mrn_engine.cli import cli

    out = tmp_path / "cohort"
    args = ["phantom", "--out", str(out), "--n", "2", "--workers", "1", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--nuclei", "challenge"])
    assert result.exit_code == 0, result.output
    assert "nuclei: challenge" in result.output
    assert json.loads((out / "phantom.json").read_text())["nuclei"] == "challenge"
    bad = CliRunner().invoke(cli, [*args, "--nuclei", "big"])
    assert bad.exit_code == 2 and "'big' is not one of" in bad.output
