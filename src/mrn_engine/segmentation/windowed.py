"""nnU-Net's own predictor, with its sliding window limited to the tiles around the nuclei.

:class:`WindowedPredictor` is ``nnUNetPredictor`` (same preprocessing, fold ensemble, Gaussian
tile weighting, mirroring and export) with one change: ``_internal_get_sliding_window_slicers``
can keep only the full-volume tiles that touch a window. :meth:`WindowedPredictor.predict_case`
runs the localised prediction:

1. nnU-Net preprocessing of the whole volume, once (crop to non-zero, resample, normalise: the
   normalisation statistics are the whole volume's, as in a full run);
2. coarse pass: tile step ``coarse_tile_step_size`` (1.0 = no overlap), no mirroring, first
   fold only, whole volume -> bounding box of the predicted nuclei, grown by
   ``margin_patches`` patches (the window);
3. fine pass with the requested step, mirroring and all folds over the full-volume tiles that
   touch the window: inside the window the logits are exactly those of a full-volume run (same
   tiles, weights and order); outside it the mask is background;
4. nnU-Net's export back to the original grid.

When the coarse pass finds no nucleus the fine pass covers the whole volume (with a warning).
This module imports nnunetv2 at import time; :mod:`.predict` imports it only when a model loads.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.inference.export_prediction import (
    convert_predicted_logits_to_segmentation_with_correct_shape,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from mrn_engine.errors import MRNWarning
from mrn_engine.segmentation.localize import (
    Box,
    box_fraction,
    foreground_box,
    grow_box,
    outside,
    resample_window,
    select_tiles,
)
from mrn_engine.segmentation.settings import SegInferenceSettings

#: logit given to the background class outside the window (others get minus this)
OUTSIDE_LOGIT = 1000.0


class WindowedPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose sliding window can be restricted to a window; counts tiles.

    ``window`` is in preprocessed (unpadded) coordinates, ``data_shape`` the unpadded spatial
    shape (nnU-Net pads volumes smaller than the patch symmetrically, low side = diff // 2).
    ``tiles_evaluated`` counts tiles x folds (network calls = that x the mirroring factor).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window: Box | None = None
        self.data_shape: tuple[int, ...] | None = None
        self.tiles_evaluated = 0

    def _internal_get_sliding_window_slicers(self, image_size: tuple[int, ...]):  # noqa: D401
        slicers = super()._internal_get_sliding_window_slicers(image_size)
        patch = self.configuration_manager.patch_size
        if self.window is not None and len(patch) == len(image_size) == 3:
            shape = self.data_shape or tuple(image_size)
            offset = [(p - s) // 2 for p, s in zip(image_size, shape, strict=True)]
            slicers = select_tiles(slicers, self.window, offset)
        self.tiles_evaluated += len(slicers)
        return slicers

    def count_tiles(self, spatial_shape: tuple[int, ...], step: float) -> int:
        """Tiles of one full-volume pass at tile step ``step`` (one fold, no counting)."""
        patch = self.configuration_manager.patch_size
        padded = tuple(max(int(s), int(p)) for s, p in zip(spatial_shape, patch, strict=True))
        saved = self.tile_step_size
        self.tile_step_size = step
        try:
            return len(nnUNetPredictor._internal_get_sliding_window_slicers(self, padded))
        finally:
            self.tile_step_size = saved

    def mirror_factor(self, use_mirroring: bool) -> int:
        """Network calls per tile: 2^(allowed mirroring axes) with mirroring, else 1."""
        axes = self.allowed_mirroring_axes if use_mirroring else None
        return 2 ** len(axes) if axes else 1

    def _logits(self, data: torch.Tensor, step: float, mirroring: bool, params: list, window):
        saved = (self.tile_step_size, self.use_mirroring, self.list_of_parameters, self.window)
        self.tile_step_size, self.use_mirroring = step, mirroring
        self.list_of_parameters, self.window = params, window
        self.data_shape = tuple(data.shape[1:])
        try:
            return self.predict_logits_from_preprocessed_data(data)
        finally:
            self.tile_step_size, self.use_mirroring, self.list_of_parameters, self.window = saved

    def _linear_export(self) -> bool:
        """Whether the model's probability resampling is nnU-Net's default linear one
        (order 1; along Z too, or Z nearest only where Z is resampled -- checked per case)."""
        conf = self.configuration_manager.configuration
        kwargs = conf.get("resampling_fn_probabilities_kwargs") or {}
        return (
            conf.get("resampling_fn_probabilities") == "resample_data_or_seg_to_shape"
            and kwargs.get("order") == 1
        )

    def _export_window(self, logits: torch.Tensor, window: Box, props: dict) -> np.ndarray:
        """The label map on the original grid, resampling only the window's logits.

        Same linear mapping as nnU-Net's export of the whole volume (whose outside-window
        voxels are background); used when Z keeps its size or the model resamples Z linearly.
        """
        crop_shape = [int(v) for v in props["shape_after_cropping_and_before_resampling"]]
        kwargs = self.configuration_manager.configuration.get(
            "resampling_fn_probabilities_kwargs", {}
        )
        if crop_shape[0] != logits.shape[1] and kwargs.get("order_z", 1) != 1:
            out = torch.from_numpy(outside(window, tuple(logits.shape[1:])))
            with torch.inference_mode():
                logits[:, out] = -OUTSIDE_LOGIT
                logits[0, out] = OUTSIDE_LOGIT
            return convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, self.plans_manager, self.configuration_manager, self.label_manager, props
            )
        out_box, block = resample_window(logits, window, crop_shape)
        labels = self.label_manager.convert_logits_to_segmentation(block)
        n_fg = len(self.label_manager.foreground_labels)
        dtype = np.uint8 if n_fg < 255 else np.uint16
        seg_crop = np.zeros(crop_shape, dtype=dtype)
        seg_crop[out_box] = np.asarray(labels, dtype=dtype)
        seg = np.zeros([int(v) for v in props["shape_before_cropping"]], dtype=dtype)
        seg = insert_crop_into_image(seg, seg_crop, props["bbox_used_for_cropping"])
        return np.asarray(seg).transpose(self.plans_manager.transpose_backward)

    def predict_case(
        self,
        image: np.ndarray,
        properties: dict,
        settings: SegInferenceSettings,
        name: str = "",
        oracle: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict]:
        """Label map ``(Z, Y, X)`` of one ``(1, Z, Y, X)`` image and the run's figures.

        Figures: seconds per step, tiles evaluated (coarse, fine), tiles of a full-volume run
        at the fine step, window fraction of the preprocessed volume, ``fallback``.
        ``oracle`` (benchmarks only): a reference label map on the image's grid whose nuclei
        box replaces the coarse pass's (which still runs and is timed) -- the window a
        trained coarse pass would find, for timing untrained (random-weight) models.
        """
        t0 = time.perf_counter()
        pre = self.configuration_manager.preprocessor_class(verbose=False)
        arr, _, props = pre.run_case_npy(
            image, None, dict(properties), self.plans_manager, self.configuration_manager,
            self.dataset_json,
        )  # fmt: skip
        data = torch.from_numpy(np.ascontiguousarray(arr))
        shape = tuple(data.shape[1:])
        params = list(self.list_of_parameters)
        fig: dict = {
            "preprocess_s": time.perf_counter() - t0,
            "tiles_full": self.count_tiles(shape, settings.tile_step_size) * len(params),
            "calls_per_tile": self.mirror_factor(settings.use_mirroring),
            "tiles_coarse": 0,
            "fallback": False,
        }
        window = coarse = None
        self.tiles_evaluated = 0
        if settings.localize:
            t = time.perf_counter()
            coarse = self._logits(data, settings.coarse_tile_step_size, False, params[:1], None)
            box = foreground_box(self.label_manager.convert_logits_to_segmentation(coarse))
            if oracle is not None:
                box = _to_preprocessed(foreground_box(oracle), props, shape)
            fig["tiles_coarse"], self.tiles_evaluated = self.tiles_evaluated, 0
            fig["coarse_s"] = time.perf_counter() - t
            if box is None:
                fig["fallback"] = True
                warnings.warn(
                    f"{name}: the coarse nnU-Net pass found no nucleus; predicting the whole "
                    "volume instead of a window around the nuclei",
                    MRNWarning,
                    stacklevel=3,
                )
            else:
                patch = self.configuration_manager.patch_size
                window = grow_box(box, patch, settings.margin_patches, shape)
        fig["window_fraction"] = box_fraction(window, shape)
        fig["preprocessed_shape"] = list(shape)
        fig["window"] = None if window is None else [[w.start, w.stop] for w in window]
        t = time.perf_counter()
        same_pass = (
            coarse is not None
            and settings.coarse_tile_step_size == settings.tile_step_size
            and not settings.use_mirroring
            and len(params) == 1
        )
        if same_pass:  # the coarse pass already is the fine pass (its tiles cover the window)
            logits = coarse
        else:
            logits = self._logits(
                data, settings.tile_step_size, settings.use_mirroring, params, window
            )
        fig["tiles_fine"] = self.tiles_evaluated
        fig["fine_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if window is not None and self._linear_export():
            seg = self._export_window(logits, window, props)
        else:
            if window is not None:
                out = torch.from_numpy(outside(window, shape))
                with torch.inference_mode():  # the logits are inference tensors
                    logits[:, out] = -OUTSIDE_LOGIT
                    logits[0, out] = OUTSIDE_LOGIT
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, self.plans_manager, self.configuration_manager, self.label_manager, props
            )
        fig["export_s"] = time.perf_counter() - t
        fig["tiles_evaluated"] = fig["tiles_coarse"] + fig["tiles_fine"]
        fig["total_s"] = time.perf_counter() - t0
        return np.asarray(seg), fig


def _to_preprocessed(box: Box | None, props: dict, shape: tuple[int, ...]) -> Box | None:
    """A box on the original (Z, Y, X) grid -> nnU-Net's cropped and resampled grid."""
    if box is None:
        return None
    crop = props["shape_after_cropping_and_before_resampling"]
    out = []
    for sl, (lo, _), c, n in zip(box, props["bbox_used_for_cropping"], crop, shape, strict=True):
        f = n / c
        start = int(np.clip(np.floor((sl.start - lo) * f), 0, n - 1))
        stop = int(np.clip(np.ceil((sl.stop - lo) * f), start + 1, n))
        out.append(slice(start, stop))
    return tuple(out)
