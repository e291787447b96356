"""Fold-ensemble + TTA predictor, split after nnU-Net's ``nnUNetPredictor``.

- masks to crop with: :mod:`mrn_engine.inference.mask_source` (given masks, the case's files or
  the bundle's nnU-Net models);
- the fold loop, TTA and autocast: :class:`mrn_engine.models.ensemble.FoldEnsemble` (the trainer's
  out-of-fold prediction goes through the same inference step);
- the segmentation back on the source grids: ``rois.paste_back_all``;
- ROI masking from cached tokens: :mod:`mrn_engine.inference.masking`;
- every P(PD) summary: :class:`mrn_engine.results.Probabilities`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mrn_engine.bundle import ModelBundle, open_bundle
from mrn_engine.config import RunConfig
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.data.roi_subsets import MASK_SUBSETS
from mrn_engine.errors import InputDataError, MRNWarning, WeightsError
from mrn_engine.inference.mask_source import (
    MaskSource,
    Segmenter,
    bundle_segmenter_factory,
    mask_array,
    volume_array,
)
from mrn_engine.inference.masking import ProgressFn, RoiMasker
from mrn_engine.inference.prepare import PreparedCase, prepare_case
from mrn_engine.inference.sanity import check_finite_probabilities
from mrn_engine.inference.site_adaptation import SiteAdaptation, load_site_adaptation
from mrn_engine.inference.submission import SubmissionResult, predict_cases
from mrn_engine.inference.timing import timed
from mrn_engine.models import build_model
from mrn_engine.models.checkpoint import check_state_fits
from mrn_engine.models.ensemble import FoldEnsemble
from mrn_engine.models.evidence import capture_slice_tokens
from mrn_engine.results import Probabilities
from mrn_engine.rois import CropBox, RoiCrop, paste_back_all
from mrn_engine.runtime import resolve_device
from mrn_engine.training.calibration import Calibration, apply_folds, load_calibrations
from mrn_engine.training.ensemble_calibration import (
    EnsembleCalibration,
    bundle_ensemble_calibration,
)
from mrn_engine.training.reference_slices import load_reference_slices

__all__ = ["CasePrediction", "MRNPredictor", "ProgressFn", "Segmenter"]


@dataclass
class CasePrediction:
    """The prediction for one case.

    Attributes
    ----------
    case_id: the case.
    probabilities: per-fold P(PD) (TTA-averaged if TTA is on), ensemble mean, spread, call.
    roi_tokens: per fold, ROI name -> tokens ``(V, D)`` on CPU (``V`` = 2 with TTA: original,
        mirrored), cached for masking.
    nuclei: ``(X, Y, Z)`` uint8 QSM labels 1-16 on the QSM grid (DPT, mean over folds).
    nm_nuclei: ``(X, Y, Z)`` uint8 NM labels 1-2 on the NM grid.
    boxes: ROI name -> ``CropBox`` in source voxels.
    label: the truth if the case carried one.
    seg_source: ``"dpt"`` (model segmentation) or ``"input-masks"`` (model without DPT: the
        masks used for cropping, restricted to the ROIs) or ``"none"`` (``nuclei=False``).
    mask_source: where the cropping masks came from (``"case"``, ``"given"``, ``"segmenter"``).
    nm_mask, qsm_mask: ``(X, Y, Z)`` uint8 masks the ROIs were cropped with when they came from
        the segmenter (nnU-Net), else None (the user's own masks are not copied).
    zeroed: ROIs whose input was replaced by zeros (only for checks / ablations).
    calibrated: whether ``probabilities`` are calibrated (``fold_k/calibration.json``).
    raw: the uncalibrated per-fold probabilities (equal to ``probabilities`` when uncalibrated).
    tta_spread: per fold, |P(PD) original - P(PD) mirrored| (empty without TTA).
    slice_tokens: per fold, ROI name -> SFA input ``(V, S, D)`` on CPU, when asked for
        (``keep_slice_tokens``): per-slice evidence (``inference/evidence.py``) without a new pass.
    crops: ROI name -> ``RoiCrop`` (with ``keep_slice_tokens``): maps slices back to source z.
    timings: stage -> wall seconds for this case (``masks``, ``crop``, ``model``, ``paste``;
        ``read`` / ``write`` / ``wait`` when ``mrn predict`` streamed it), see
        :mod:`mrn_engine.inference.timing`.
    site: the site harmonisation the prediction went through (its site name), None if none.
    """

    case_id: str
    probabilities: Probabilities
    roi_tokens: list[dict[str, torch.Tensor]]
    nuclei: np.ndarray
    nm_nuclei: np.ndarray
    boxes: dict[str, CropBox]
    label: int | None = None
    seg_source: str = "dpt"
    mask_source: str = "case"
    nm_mask: np.ndarray | None = None
    qsm_mask: np.ndarray | None = None
    zeroed: frozenset[str] = field(default_factory=frozenset)
    calibrated: bool = False
    raw: Probabilities | None = None
    tta_spread: list[float] = field(default_factory=list)
    slice_tokens: list[dict[str, torch.Tensor]] | None = None
    crops: dict[str, RoiCrop] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    site: str | None = None

    @property
    def p_pd_raw(self) -> float:
        """Uncalibrated ensemble P(PD)."""
        return (self.raw or self.probabilities).p_pd

    @property
    def p_pd_folds_raw(self) -> list[float]:
        return list((self.raw or self.probabilities).p_pd_folds)

    @property
    def folds(self) -> list[int]:
        return list(self.probabilities.folds)

    @property
    def p_pd_folds(self) -> list[float]:
        return list(self.probabilities.p_pd_folds)

    @property
    def p_pd(self) -> float:
        return self.probabilities.p_pd

    @property
    def p_pd_std(self) -> float:
        return self.probabilities.p_pd_std

    @property
    def call(self) -> int:
        return self.probabilities.call

    def summary(self) -> dict[str, object]:
        """Flat row for CSV/JSON (no arrays)."""
        return {
            "case_id": self.case_id,
            **self.probabilities.row(),
            "p_pd_raw": self.p_pd_raw,
            "calibrated": self.calibrated,
            "tta_spread": max(self.tta_spread) if self.tta_spread else None,
            "mask_source": self.mask_source,
            "site_adaptation": self.site,
        }


def _pasted(
    crops: Mapping[str, RoiCrop], classes: Mapping[str, np.ndarray], modality: str, shape: tuple
) -> np.ndarray:
    """One modality's ROI classes pasted back onto its grid as uint8 labels (zeros if none)."""
    if not any(ROI_BY_NAME[n].modality == modality for n in classes):
        return np.zeros(shape, dtype=np.uint8)
    return paste_back_all(dict(crops), dict(classes), modality, shape).astype(np.uint8)


def _segmentation(
    case: Any, crops: Mapping[str, RoiCrop], seg_mean: Mapping[str, torch.Tensor]
) -> tuple[str, np.ndarray, np.ndarray]:
    """``(seg_source, QSM labels, NM labels)``: the fold-mean DPT classes pasted back, or (for
    models without DPT) the cropping masks restricted to the ROIs."""
    if len(seg_mean) == len(ROI_NAMES):
        source = "dpt"
        classes = {n: seg_mean[n].argmax(dim=0).numpy().astype(np.int64) for n in ROI_NAMES}
    else:
        source = "input-masks"
        classes = {
            n: np.asarray(c.mask, dtype=np.int64) for n, c in crops.items() if c.mask is not None
        }
    qsm = _pasted(crops, classes, "QSM", volume_array(case.qsm).shape)
    nm = _pasted(crops, classes, "NM", volume_array(case.nm).shape)
    return source, qsm, nm


class MRNPredictor:
    """Fold ensemble of one MRN (or baseline) network with optional mirror TTA.

    Parameters
    ----------
    model: the network (``forward(rois) -> MRNOutput``; ``classify_tokens`` / ``empty_token``
        for masking).
    fold_states: fold index -> ``state_dict`` (kept in memory, swapped in per fold).
    config: the bundle's ``RunConfig``.
    device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda`` ...
    tta: mirror test-time augmentation.
    segmenter: optional object with ``predict(case) -> (nm_mask, qsm_mask)`` used when a case
        has no mask files (or when ``ignore_masks``).
    ignore_masks: do not use the case's mask files (use the segmenter instead).
    bundle: the bundle the weights came from (for provenance).
    segmenter_factory: builds the segmenter on first need.
    """

    def __init__(
        self,
        model: nn.Module,
        fold_states: Mapping[int, Mapping[str, torch.Tensor]],
        config: RunConfig,
        *,
        device: str | torch.device = "auto",
        tta: bool = False,
        segmenter: Segmenter | None = None,
        ignore_masks: bool = False,
        bundle: ModelBundle | None = None,
        segmenter_factory: Callable[[], Segmenter] | None = None,
        calibration: Mapping[int, Calibration] | None = None,
        site_adaptation: SiteAdaptation | str | os.PathLike | None = None,
        ensemble_calibration: EnsembleCalibration | None = None,
        reference_slices: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.device = resolve_device(device)
        if site_adaptation is not None and not isinstance(site_adaptation, SiteAdaptation):
            site_adaptation = load_site_adaptation(site_adaptation)
        #: the site harmonisation folded into each fold's head (None: the bundle as trained)
        self.site_adaptation: SiteAdaptation | None = site_adaptation
        if site_adaptation is not None:
            site_adaptation.check_bundle(bundle, fold_states)
            fold_states = {k: site_adaptation.adapt_state(k, s) for k, s in fold_states.items()}
        self.ensemble = FoldEnsemble(
            model,
            fold_states,
            device=self.device,
            amp=bool(config.train.amp),
            tta=tta,
            describe=(lambda k: str(bundle.weights_path(k))) if bundle else (lambda k: f"fold {k}"),
        )
        self.masks = MaskSource(segmenter, segmenter_factory, ignore_masks)
        self.masker = RoiMasker(self.ensemble)
        #: fold -> ``training.calibration.Calibration`` (all folds, or empty = uncalibrated)
        self.calibration = dict(calibration or {})
        if self.calibration and set(self.calibration) != set(self.folds):
            raise WeightsError(
                f"predictor: calibration for folds {sorted(self.calibration)}, "
                f"weights for {self.folds}"
            )
        #: the fold agreement that sharpens the ensemble P(PD) (None: plain mean); used only
        #: with the per-fold calibration it was measured on
        self.ensemble_calibration = ensemble_calibration if self.calibration else None
        #: fold -> ROI -> (S, D) healthy reference slice tokens (``training/reference_slices``),
        #: the baseline of per-slice evidence; empty: evidence leaves slices out instead
        self.reference_slices = {int(k): dict(v) for k, v in (reference_slices or {}).items()}
        if self.reference_slices and set(self.reference_slices) != set(self.folds):
            raise WeightsError(
                f"predictor: healthy reference for folds {sorted(self.reference_slices)}, "
                f"weights for {self.folds}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        folds: Iterable[int] | None = None,
        tta: bool = False,
        segmenter: Segmenter | None = None,
        ignore_masks: bool = False,
        model_factory: Callable[[RunConfig], nn.Module] | None = None,
        site_adaptation: SiteAdaptation | str | os.PathLike | None = None,
    ) -> MRNPredictor:
        """Build the network from ``BUNDLE/config.json`` and read the chosen folds' weights.

        Parameters
        ----------
        path: the model bundle folder.
        folds: fold indices to use (default: all folds with weights).
        model_factory: ``RunConfig -> nn.Module`` (default ``build_model`` without pretrained
            weights: the weights come from the fold checkpoints).
        segmenter: mask provider for cases without masks; default: the bundle's ``nnunet/``
            models through ``mrn_engine.segmentation.NNUNetSegmenter`` when both exist.

        site_adaptation: a site harmonisation (``mrn site-adapt`` file or object) fitted
            for this bundle's weights, folded into each fold's head
            (:mod:`mrn_engine.inference.site_adaptation`).

        P(PD) is calibrated when every chosen fold has ``fold_k/calibration.json``; older
        bundles load uncalibrated (``predictor.calibrated`` is False). With
        ``ensemble_calibration.json`` too, the folds' calibrated P(PD) are combined by
        ``training.ensemble_calibration`` instead of their plain mean. With
        ``fold_k/reference_slices.safetensors`` in every chosen fold, per-slice evidence is
        measured against the healthy reference (``inference/evidence.py``).
        """
        bundle = open_bundle(path)
        chosen = bundle.folds if folds is None else sorted({int(k) for k in folds})
        missing = [k for k in chosen if k not in bundle.folds]
        if missing:
            raise InputDataError(
                f"{bundle.root}: fold(s) {missing} not in the bundle (has {bundle.folds})"
            )
        ensemble, why = bundle_ensemble_calibration(bundle.root, chosen)
        if why:
            warnings.warn(
                f"{bundle.root}: ensemble_calibration.json ignored ({why}); re-run "
                "`mrn calibrate --unlabeled`",
                MRNWarning,
                stacklevel=2,
            )
        factory = model_factory or (lambda cfg: build_model(cfg, pretrained=False))
        model = factory(bundle.config)
        states = {k: bundle.load_state(k) for k in chosen}
        for k, state in states.items():  # wrong-shape weights: name the file, keys and shapes
            check_state_fits(model, state, bundle.weights_path(k))
        return cls(
            model,
            states,
            bundle.config,
            device=device,
            tta=tta,
            segmenter=segmenter,
            ignore_masks=ignore_masks,
            bundle=bundle,
            segmenter_factory=None if segmenter else bundle_segmenter_factory(bundle, device),
            calibration=load_calibrations(bundle.root, chosen),
            site_adaptation=site_adaptation,
            ensemble_calibration=ensemble,
            reference_slices=load_reference_slices(bundle.root, chosen),
        )

    # ------------------------------------------------------------------ read-only views
    @property
    def model(self) -> nn.Module:
        return self.ensemble.model

    @property
    def folds(self) -> list[int]:
        return self.ensemble.folds

    @property
    def tta(self) -> bool:
        return self.ensemble.tta

    @property
    def segmenter(self) -> Segmenter | None:
        return self.masks.segmenter

    @property
    def segmenter_factory(self) -> Callable[[], Segmenter] | None:
        return self.masks.segmenter_factory

    @property
    def calibrated(self) -> bool:
        """Whether P(PD) is calibrated (every fold has a calibration); False for old bundles."""
        return bool(self.calibration)

    def calibrate(self, raw: Probabilities) -> Probabilities:
        """``raw`` with each fold's P(PD) through that fold's calibration (unchanged if none)."""
        if not self.calibration:
            return raw
        p = apply_folds(self.calibration, raw.folds, raw.p_pd_folds)
        ens = self.ensemble_calibration
        combined = ens.combine(p) if ens is not None and len(p) > 1 else None
        return Probabilities.from_folds(raw.folds, p, masked=raw.masked, p_pd=combined)

    @property
    def can_mask(self) -> bool:
        """Whether the model supports ROI masking from tokens (``classify_tokens`` + ``empty_token``)."""
        return self.masker.can_mask

    # ------------------------------------------------------------------ prediction
    def predict_case(
        self,
        case: Any,
        *,
        nm_mask: Any = None,
        qsm_mask: Any = None,
        progress: ProgressFn | None = None,
        zero_rois: Iterable[str] = (),
        warm_masking: bool = False,
        keep_slice_tokens: bool = False,
        nuclei: bool = True,
    ) -> CasePrediction:
        """Predict one case with every fold (and TTA if on): :meth:`prepare` + :meth:`predict_prepared`.

        Parameters
        ----------
        case: a ``mrn_engine.data.Case``.
        nm_mask, qsm_mask: masks (Volumes) to crop with, overriding the case's mask files.
        progress: ``callback(fraction, message)`` after each step.
        zero_rois: ROI names whose input is replaced by an all-zero volume (masking check).
        warm_masking: also compute each fold's empty-ROI tokens while that fold is loaded, so
            that later :meth:`masked_prediction` / :meth:`masking_table` calls are head passes
            only (what an interactive viewer wants).
        keep_slice_tokens: also keep each fold's SFA inputs (``CasePrediction.slice_tokens``)
            for per-slice evidence (MRN only).
        nuclei: False = diagnosis only: the DPT segmentation head is skipped (same P(PD));
            ``nuclei`` / ``nm_nuclei`` are empty and ``seg_source`` is ``"none"``.

        Raises
        ------
        InputDataError: no masks for cropping (and no segmenter), or unusable input.
        """
        if progress:
            progress(0.0, f"{case.case_id}: masks and ROI crops")
        prepared = self.prepare(case, nm_mask=nm_mask, qsm_mask=qsm_mask, zero_rois=zero_rois)
        return self.predict_prepared(
            prepared,
            progress=progress,
            warm_masking=warm_masking,
            keep_slice_tokens=keep_slice_tokens,
            nuclei=nuclei,
        )

    def prepare(
        self,
        case: Any,
        *,
        nm_mask: Any = None,
        qsm_mask: Any = None,
        zero_rois: Iterable[str] = (),
    ) -> PreparedCase:
        """Cropping masks (nnU-Net if needed), ROI crops and model inputs of one case."""
        return prepare_case(
            case,
            self.config.roi,
            self.masks,
            needs_masks=bool(getattr(self.model, "needs_masks", False)),
            nm_mask=nm_mask,
            qsm_mask=qsm_mask,
            zero_rois=frozenset(zero_rois),
        )

    def predict_prepared(
        self,
        prepared: PreparedCase,
        *,
        progress: ProgressFn | None = None,
        warm_masking: bool = False,
        keep_slice_tokens: bool = False,
        nuclei: bool = True,
    ) -> CasePrediction:
        """The fold ensemble on a :class:`PreparedCase` (options as in :meth:`predict_case`)."""
        case, crops, zeroed = prepared.case, prepared.crops, prepared.zeroed
        timings = dict(prepared.timings)
        steps = len(self.folds) + 2
        p_folds: list[float] = []
        tokens: list[dict[str, torch.Tensor]] = []
        kept: list[dict[str, torch.Tensor]] | None = [] if keep_slice_tokens else None
        spread: list[float] = []
        seg_mean: dict[str, torch.Tensor] = {}
        capture = capture_slice_tokens(self.model) if keep_slice_tokens else nullcontext({})
        with timed(timings, "model"), capture as store:
            for i, out in enumerate(
                self.ensemble.run(prepared.images, prepared.masks, with_seg=nuclei)
            ):
                if kept is not None:  # this fold's SFA inputs, caught by the forward hook
                    kept.append({n: t.float().cpu() for n, t in store.items()})
                if len(out.p_views) == 2:
                    spread.append(abs(out.p_views[0] - out.p_views[1]))
                if warm_masking and out.tokens and self.can_mask:
                    self.masker.empty_tokens(out.fold)  # fold is loaded: no extra weight swap
                p_folds.append(out.p_pd)
                tokens.append(out.tokens)
                for name, p in (out.seg or {}).items():
                    seg_mean[name] = seg_mean.get(name, 0) + p / len(self.folds)
                if progress:
                    progress(
                        (i + 2) / steps, f"{case.case_id}: fold {out.fold} P(PD)={out.p_pd:.3f}"
                    )

        with timed(timings, "paste"):
            if nuclei:
                seg_source, qsm_labels, nm_labels = _segmentation(case, crops, seg_mean)
            else:
                seg_source = "none"
                qsm_labels = np.zeros(volume_array(case.qsm).shape, np.uint8)
                nm_labels = np.zeros(volume_array(case.nm).shape, np.uint8)
        check_finite_probabilities(case.case_id, self.folds, p_folds)
        raw = Probabilities.from_folds(self.folds, p_folds)
        probs = self.calibrate(raw)
        if progress:
            progress(1.0, f"{case.case_id}: P(PD)={probs.p_pd:.3f}")
        from_segmenter = prepared.mask_source == "segmenter"
        return CasePrediction(
            case_id=case.case_id,
            probabilities=probs,
            roi_tokens=tokens,
            nuclei=qsm_labels,
            nm_nuclei=nm_labels,
            boxes={n: crops[n].box for n in ROI_NAMES},
            label=getattr(case, "label", None),
            seg_source=seg_source,
            mask_source=prepared.mask_source,
            nm_mask=mask_array(prepared.nm_mask) if from_segmenter else None,
            qsm_mask=mask_array(prepared.qsm_mask) if from_segmenter else None,
            zeroed=zeroed,
            calibrated=self.calibrated,
            raw=raw,
            tta_spread=spread,
            slice_tokens=kept,
            crops=dict(crops) if keep_slice_tokens else None,
            timings=timings,
            site=self.site_adaptation.site if self.site_adaptation else None,
        )

    def predict_cases(
        self, cases_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs: Any
    ) -> SubmissionResult:
        """Predict every case under ``cases_dir`` and write the submission (``submission.predict_cases``)."""
        return predict_cases(self, cases_dir, out_dir, **kwargs)

    # ------------------------------------------------------------------ ROI masking
    def warm_masking_cache(self, progress: ProgressFn | None = None) -> bool:
        """Compute every fold's empty-ROI tokens now (one ROI-encoder pass per ROI and fold).

        Afterwards :meth:`masked_prediction` and :meth:`masking_table` run only the
        classification head. Returns False (and does nothing) for models that cannot mask.
        """
        return self.masker.warm(progress)

    def masking_cache_ready(self) -> bool:
        """True when every fold's empty-ROI tokens are cached (masking needs no backbone pass)."""
        return self.masker.ready()

    def masked_prediction(self, pred: CasePrediction, masked: Iterable[str]) -> Probabilities:
        """P(PD) with the ROIs in ``masked`` replaced by empty volumes — head passes only."""
        (probs,) = self.masker.probabilities(
            pred.case_id, pred.roi_tokens, pred.folds, [frozenset(masked)]
        )
        return self.calibrate(probs)

    def masking_table(self, pred: CasePrediction) -> list[Probabilities]:
        """:meth:`masked_prediction` for all 16 ROI subsets (Table 4 order)."""
        table = self.masker.probabilities(pred.case_id, pred.roi_tokens, pred.folds, MASK_SUBSETS)
        return [self.calibrate(p) for p in table]
