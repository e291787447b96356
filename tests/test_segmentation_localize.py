"""Localised nnU-Net prediction: a coarse pass finds the nuclei, the full-setting sliding window
runs only over the tiles around them (``segmentation.windowed`` / ``segmentation.localize``).

Fast: nnU-Net's real ``nnUNetPredictor`` machinery (preprocessing, tiling, Gaussian weighting,
mirroring, export) with tiny networks on small volumes.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from mrn_engine.data import Volume
from mrn_engine.errors import ConfigError, MRNWarning
from mrn_engine.segmentation import NNUNetSegmenter
from mrn_engine.segmentation.localize import (
    foreground_box,
    grow_box,
    resample_window,
    select_tiles,
)
from mrn_engine.segmentation.settings import NNUNET_DEFAULT, SegInferenceSettings
from mrn_engine.segmentation.synthetic import write_random_bundle

#: small test networks: patch (Z, Y, X) and widths
PATCH = (8, 32, 32)
SPACING = (2.0, 1.0, 1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class BlobNet(torch.nn.Module):
    """Finds bright blobs: label 1 where the 3x3x3 mean of (x - tile mean) exceeds 1.

    Its output depends on the tile (the tile's mean, zero padding at tile borders), so a voxel
    only gets the full-volume logits if it receives exactly the full-volume tiles.
    """

    def __init__(self, n_out: int = 3) -> None:
        super().__init__()
        self.n_out = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=(2, 3, 4), keepdim=True)
        smooth = torch.nn.functional.avg_pool3d(centred, 3, stride=1, padding=1)
        out = torch.full((x.shape[0], self.n_out, *x.shape[2:]), -5.0, dtype=x.dtype)
        out[:, 0] = 0.0
        out[:, 1] = smooth[:, 0] - 1.0 + 0.01 * torch.arange(x.shape[-1], dtype=x.dtype)
        return out


def _volume(array: np.ndarray, zooms=(SPACING[2], SPACING[1], SPACING[0])) -> Volume:
    """A NIfTI-ordered (X, Y, Z) volume with the given voxel size."""
    img = nib.Nifti1Image(array.astype(np.float32), np.diag([-zooms[0], zooms[1], zooms[2], 1.0]))
    return Volume(img.get_fdata().astype(np.float32), img.affine, img.header)


def _blob_image(shape=(96, 96, 40), centre=(40, 55, 18), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.3, shape).astype(np.float32)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / 36 + (z - centre[2]) ** 2 / 4 <= 1
    img[blob] += 6.0
    return img


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("random_nnunet")
    write_random_bundle(
        root, folds=(0, 1), seed=3, patch=PATCH, spacing=SPACING, features=(4, 8, 16)
    )
    return root


def _segmenter(bundle, settings, net: torch.nn.Module | None = None) -> NNUNetSegmenter:
    """NM segmenter of the random bundle with the test patch/spacing (and ``net`` if given)."""
    seg = NNUNetSegmenter.from_bundle(bundle, device="cpu", settings=settings)
    pred = seg._predictor("NM")
    if net is not None:
        pred.network = net
        pred.list_of_parameters = [{}, {}]  # two "folds" (BlobNet has no weights)
    return seg


# -- pure helpers ------------------------------------------------------------------------
def test_boxes_and_tile_selection():
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:4, 5:9, 10:12] = 3
    box = foreground_box(labels)
    assert box == (slice(2, 4), slice(5, 9), slice(10, 12))
    assert foreground_box(np.zeros((3, 3, 3))) is None
    grown = grow_box(box, (8, 16, 16), 0.5, labels.shape)
    assert grown == (slice(0, 8), slice(0, 17), slice(2, 20))
    tiles = [
        (slice(None), slice(0, 8), slice(0, 16), slice(0, 16)),
        (slice(None), slice(0, 8), slice(0, 16), slice(14, 30)),
        (slice(None), slice(0, 8), slice(4, 20), slice(20, 36)),  # touches X 20 only beyond
    ]
    assert select_tiles(tiles, grown, (0, 0, 0)) == tiles[:2]
    # padding offset shifts the window into the padded frame
    assert select_tiles(tiles, grown, (0, 0, 1)) == tiles


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="tile_step_size"):
        SegInferenceSettings(tile_step_size=0.0)
    with pytest.raises(ConfigError, match="margin_patches"):
        SegInferenceSettings(margin_patches=-1)
    with pytest.raises(ConfigError, match="use_mirroring"):
        SegInferenceSettings(use_mirroring="yes")  # type: ignore[arg-type]
    assert SegInferenceSettings().to_dict()["localize"] is True


def test_window_resampling_matches_nnunet_export():
    """Resampling only the window gives nnU-Net's own linear resampling of the whole volume
    (float16 rounding of nnU-Net's output aside) on the output voxels fed by the window."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, 30, 26, generator=g)
    window = (slice(2, 9), slice(5, 21), slice(3, 20))
    out_shape = (12, 61, 53)
    ref = resample_data_or_seg_to_shape(
        logits.half(), out_shape, [2.0, 1.0, 1.0], [2.0, 0.49, 0.49], is_seg=False, order=1,
        order_z=0, force_separate_z=None,
    )  # fmt: skip
    box, block = resample_window(logits, window, out_shape)
    assert all(b.stop > b.start for b in box)
    np.testing.assert_allclose(
        block.numpy(), np.asarray(ref, np.float32)[(slice(None), *box)], atol=5e-3
    )


# -- the localised predictor -------------------------------------------------------------
def test_localised_masks_equal_the_full_volume_inside_the_window(bundle):
    """Same network, same step/mirroring/folds: the localised mask equals the full-volume mask
    exactly inside the window (the same full-volume tiles are summed in the same order) and is
    background outside; far fewer tiles are evaluated."""
    img = _volume(_blob_image())
    settings = SegInferenceSettings(use_mirroring=True, tile_step_size=0.5, localize=True)
    full_cfg = SegInferenceSettings(use_mirroring=True, tile_step_size=0.5, localize=False)
    full = _segmenter(bundle, full_cfg, BlobNet())
    loc = _segmenter(bundle, settings, BlobNet())
    m_full = full.predict_volume(img, "NM").array
    m_loc = loc.predict_volume(img, "NM").array
    f_full, f_loc = full.last_figures["NM"], loc.last_figures["NM"]
    assert (m_full == 1).sum() > 50  # the blob is found
    # the window on the source grid: no resampling here (image at the model spacing)
    pred = loc._predictor("NM")
    assert f_loc["fallback"] is False and f_loc["window_fraction"] < 0.5
    inside = np.zeros(img.shape, bool)
    win = f_loc["window"]
    inside[win[2][0] : win[2][1], win[1][0] : win[1][1], win[0][0] : win[0][1]] = True
    np.testing.assert_array_equal(m_loc[inside], m_full[inside])
    assert not m_loc[~inside].any()
    assert (m_full[~inside] != 0).sum() == 0  # the blob lies inside the window
    # tiles: coarse (no overlap, 1 fold) + fine (window only, 2 folds) < full (2 folds)
    assert f_full["tiles_evaluated"] == f_full["tiles_full"]
    assert f_loc["tiles_fine"] < 0.7 * f_full["tiles_fine"]  # measured 280 of 450
    assert f_loc["tiles_evaluated"] < 0.8 * f_full["tiles_evaluated"]  # 325 of 450
    assert f_loc["tiles_coarse"] == pred.count_tiles(f_loc["preprocessed_shape"], 1.0)


def test_localised_masks_after_resampling(bundle):
    """An image at twice the model's in-plane resolution: nnU-Net resamples to the model grid
    and back. Inside the window the localised mask matches the full run voxel for voxel except
    where the full run's float16 rounding breaks near-ties (>= 99.9 % agreement)."""
    coarse = _blob_image(shape=(48, 48, 40), centre=(20, 27, 18))
    fine = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    img = _volume(fine, zooms=(0.5, 0.5, 2.0))
    full = _segmenter(bundle, SegInferenceSettings(localize=False, tile_step_size=0.5), BlobNet())
    loc = _segmenter(bundle, SegInferenceSettings(localize=True, tile_step_size=0.5), BlobNet())
    m_full = full.predict_volume(img, "NM").array
    m_loc = loc.predict_volume(img, "NM").array
    assert m_full.shape == fine.shape and (m_full == 1).sum() > 100
    assert np.mean(m_full == m_loc) >= 0.999
    inter = np.logical_and(m_full == 1, m_loc == 1).sum()
    assert 2 * inter / ((m_full == 1).sum() + (m_loc == 1).sum()) >= 0.99


def test_no_nucleus_found_falls_back_to_the_whole_volume(bundle):
    img = _volume(np.zeros((64, 64, 24), np.float32) + 1.0)
    loc = _segmenter(bundle, SegInferenceSettings(localize=True), BlobNet())
    with pytest.warns(MRNWarning, match="coarse nnU-Net pass found no nucleus"):
        mask = loc.predict_volume(img, "NM")
    f = loc.last_figures["NM"]
    assert f["fallback"] is True and f["window_fraction"] == 1.0
    assert f["tiles_fine"] == f["tiles_full"] and not mask.array.any()


@pytest.mark.slow
def test_real_random_network_full_and_localised(bundle):
    """A real (random-weight) nnU-Net PlainConvUNet through the whole path, two folds with
    mirroring: the localised run's mask equals the full run inside its window."""
    img = _volume(_blob_image(shape=(40, 40, 16), centre=(20, 20, 8)))
    full = _segmenter(bundle, NNUNET_DEFAULT)
    loc = _segmenter(bundle, SegInferenceSettings(use_mirroring=True, tile_step_size=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MRNWarning)
        m_full = full.predict_volume(img, "QSM").array
        m_loc = loc.predict_volume(img, "QSM").array
    f = loc.last_figures["QSM"]
    win = f["window"]
    if win is None:  # a random net that predicts no foreground at all
        np.testing.assert_array_equal(m_loc, m_full)
        return
    inside = np.zeros(img.shape, bool)
    inside[win[2][0] : win[2][1], win[1][0] : win[1][1], win[0][0] : win[0][1]] = True
    assert np.mean(m_loc[inside] == m_full[inside]) >= 0.999
    assert f["calls_per_tile"] == 4  # mirroring along Z and Y, never left-right


# -- settings on the diagnosis path --------------------------------------------------------
def test_predict_options_reach_the_bundle_segmenter(tmp_path):
    """``mrn predict --no-seg-localize --seg-tile-step 1.0 --seg-mirroring`` -> the segmenter the
    predictor builds for mask-free cases runs with exactly those settings; without options it
    runs with the measured defaults (``SegInferenceSettings()``)."""
    from click.testing import CliRunner

    from mrn_engine.badinput.cases import write_bundle
    from mrn_engine.cli import predict as cli_predict

    bundle = write_bundle(tmp_path / "bundle", folds=(0,))
    write_random_bundle(bundle, patch=PATCH, spacing=SPACING, features=(4, 8, 16))
    seen = {}

    def fake_build(model, folds, tta, device, ignore_masks, seg=None, **kw):
        predictor = orig_build(model, folds, tta, device, ignore_masks, seg, **kw)
        seen["settings"] = predictor.segmenter_factory().settings
        raise SystemExit(0)

    orig_build = cli_predict.build_predictor
    cli_predict.build_predictor = fake_build
    try:
        args = [str(tmp_path), "--model", str(bundle), "--out", str(tmp_path / "o")]
        runner = CliRunner()
        runner.invoke(cli_predict.predict_cmd, args, catch_exceptions=False)
        assert seen["settings"] == SegInferenceSettings()
        more = ["--no-seg-localize", "--seg-tile-step", "1.0", "--seg-mirroring"]
        runner.invoke(cli_predict.predict_cmd, args + more, catch_exceptions=False)
        assert seen["settings"] == SegInferenceSettings(
            use_mirroring=True, tile_step_size=1.0, localize=False
        )
        bad = runner.invoke(cli_predict.predict_cmd, args + ["--seg-tile-step", "0.2"])
        assert bad.exit_code == 2 and "0.5<=x<=1.0" in bad.output
    finally:
        cli_predict.build_predictor = orig_build


def test_bench_setting_names_and_dice():
    from mrn_engine.segmentation.bench import mean_dice, parse_setting

    assert parse_setting("mirror-0.5-whole") == NNUNET_DEFAULT
    assert parse_setting("nomirror-0.75-local") == SegInferenceSettings(
        use_mirroring=False, tile_step_size=0.75, localize=True
    )
    for bad in ("mirror-0.5", "fast-0.5-local", "mirror-x-local", "mirror-2-local"):
        with pytest.raises(ConfigError):
            parse_setting(bad)
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    assert mean_dice(a, b) == 1.0
    a[0, :2], b[0, 1:3] = 1, 1  # label 1: overlap 1 of 2 + 2 -> 0.5
    a[3, 3] = 2  # label 2 only in a -> 0
    assert mean_dice(a, b) == pytest.approx(0.25)
