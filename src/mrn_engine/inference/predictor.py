"""Fold-ensemble + TTA predictor, in the spirit of nnU-Net's ``nnUNetPredictor``.

One network is built; each fold's weights are read once, kept in memory and swapped in with
``load_state_dict``. Per-fold probabilities are kept and averaged. TTA = mirror: every ROI
stack is flipped along the in-plane X axis (``H`` of ``(B, S, H, W)``), both views go through
the network as one batch, their softmax is averaged and the DPT logits of the flipped view are
flipped back. ROI tokens are cached per fold so that ROI masking (paper Table 4) costs only
head passes (``classify_tokens``), never another backbone pass.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mrn_engine.config import RunConfig
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import InputDataError, WeightsError
from mrn_engine.inference.bundle import ModelBundle, open_bundle
from mrn_engine.inference.device import resolve_device

#: progress callback: (fraction done in [0, 1], message)
ProgressFn = Callable[[float, str], None]


class Segmenter(Protocol):
    """What the predictor needs from a segmenter (e.g. ``mrn_engine.segmentation.NNUNetSegmenter``)."""

    def predict(self, case: Any) -> tuple[Any, Any]:
        """``(nm_mask, qsm_mask)`` Volumes on the case's NM / QSM grids."""
        ...


@dataclass
class CasePrediction:
    """The prediction for one case.

    Attributes
    ----------
    case_id: the case.
    p_pd_folds: P(PD) of each fold model (TTA-averaged if TTA is on).
    p_pd, p_pd_std: ensemble mean and standard deviation over folds.
    call: 1 = PD (``p_pd >= 0.5``), 0 = HC.
    roi_tokens: per fold, ROI name -> tokens ``(V, D)`` on CPU (``V`` = 2 with TTA: original,
        mirrored), cached for masking.
    nuclei: ``(X, Y, Z)`` uint8 QSM labels 1-16 on the QSM grid (DPT, mean over folds).
    nm_nuclei: ``(X, Y, Z)`` uint8 NM labels 1-2 on the NM grid.
    boxes: ROI name -> ``CropBox`` in source voxels.
    folds: fold indices, in the order of ``p_pd_folds``.
    label: the truth if the case carried one.
    seg_source: ``"dpt"`` (model segmentation) or ``"input-masks"`` (model without DPT: the
        masks used for cropping, restricted to the ROIs).
    mask_source: where the cropping masks came from (``"case"``, ``"given"``, ``"segmenter"``).
    nm_mask, qsm_mask: ``(X, Y, Z)`` uint8 masks the ROIs were cropped with when they came from
        the segmenter (nnU-Net), else None (the user's own masks are not copied).
    zeroed: ROIs whose input was replaced by zeros (only for checks / ablations).
    calibrated: whether ``p_pd_folds`` / ``p_pd`` are calibrated (``fold_k/calibration.json``).
    p_pd_folds_raw, p_pd_raw: the uncalibrated per-fold probabilities and their mean.
    tta_spread: per fold, |P(PD) original - P(PD) mirrored| (empty without TTA).
    slice_tokens: per fold, ROI name -> SFA input ``(V, S, D)`` on CPU, when asked for
        (``keep_slice_tokens``): per-slice evidence (``inference/evidence.py``) without a new pass.
    crops: ROI name -> ``RoiCrop`` (with ``keep_slice_tokens``): maps slices back to source z.
    """

    case_id: str
    p_pd_folds: list[float]
    p_pd: float
    p_pd_std: float
    call: int
    roi_tokens: list[dict[str, torch.Tensor]]
    nuclei: np.ndarray
    nm_nuclei: np.ndarray
    boxes: dict[str, Any]
    folds: list[int] = field(default_factory=list)
    label: int | None = None
    seg_source: str = "dpt"
    mask_source: str = "case"
    nm_mask: np.ndarray | None = None
    qsm_mask: np.ndarray | None = None
    zeroed: frozenset[str] = frozenset()
    calibrated: bool = False
    p_pd_folds_raw: list[float] = field(default_factory=list)
    p_pd_raw: float | None = None
    tta_spread: list[float] = field(default_factory=list)
    slice_tokens: list[dict[str, torch.Tensor]] | None = None
    crops: dict[str, Any] | None = None

    def summary(self) -> dict[str, object]:
        """Flat row for CSV/JSON (no arrays)."""
        row: dict[str, object] = {"case_id": self.case_id}
        for k, p in zip(self.folds, self.p_pd_folds, strict=True):
            row[f"p_pd_fold{k}"] = p
        row.update(p_pd=self.p_pd, p_pd_std=self.p_pd_std, call=self.call)
        row.update(p_pd_raw=self.p_pd_raw, calibrated=self.calibrated)
        row["tta_spread"] = max(self.tta_spread) if self.tta_spread else None
        row["mask_source"] = self.mask_source
        return row


def _default_model_factory(cfg: RunConfig) -> nn.Module:
    from mrn_engine.models import build_model

    return build_model(cfg, pretrained=False)  # the weights come from the fold checkpoints


def _volume_array(v: Any) -> np.ndarray:
    return v.array if hasattr(v, "array") else np.asarray(v)


def _mask_array(v: Any) -> np.ndarray | None:
    return None if v is None else np.asarray(_volume_array(v), dtype=np.uint8)


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
    segmenter_factory: builds the segmenter on first need (how :meth:`from_bundle` hooks in
        the bundle's nnU-Net models without loading them for cases that have masks).
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
        calibration: Mapping[int, Any] | None = None,
    ) -> None:
        if not fold_states:
            raise WeightsError("predictor: no fold weights given")
        self.config = config
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.fold_states = {int(k): dict(v) for k, v in sorted(fold_states.items())}
        self.folds = list(self.fold_states)
        self.tta = tta
        self.segmenter = segmenter
        self.segmenter_factory = segmenter_factory
        self.ignore_masks = ignore_masks
        self.bundle = bundle
        self._loaded: int | None = None
        #: fold -> ``training.calibration.Calibration`` (all folds, or empty = uncalibrated)
        self.calibration = dict(calibration or {})
        if self.calibration and set(self.calibration) != set(self.folds):
            raise WeightsError(
                f"predictor: calibration for folds {sorted(self.calibration)}, weights for {self.folds}"
            )
        self._empty: dict[
            int, dict[str, torch.Tensor]
        ] = {}  # fold -> ROI -> empty-volume token (1, D)
        for k in self.folds:  # fail early on weights of another model
            self._load_fold(k)

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
    ) -> MRNPredictor:
        """Build the network from ``BUNDLE/config.json`` and read the chosen folds' weights.

        Parameters
        ----------
        path: the model bundle folder.
        folds: fold indices to use (default: all folds with weights).
        model_factory: ``RunConfig -> nn.Module`` (default ``mrn_engine.models.build_model``).
        segmenter: mask provider for cases without masks; default: the bundle's ``nnunet/``
            models through ``mrn_engine.segmentation.NNUNetSegmenter`` when both exist.

        P(PD) is calibrated when every chosen fold has ``fold_k/calibration.json``; older
        bundles load uncalibrated (``predictor.calibrated`` is False).
        """
        bundle = open_bundle(path)
        chosen = bundle.folds if folds is None else sorted({int(k) for k in folds})
        missing = [k for k in chosen if k not in bundle.folds]
        if missing:
            raise InputDataError(
                f"{bundle.root}: fold(s) {missing} not in the bundle (has {bundle.folds})"
            )
        model = (model_factory or _default_model_factory)(bundle.config)
        states = {k: bundle.load_state(k) for k in chosen}
        factory = None
        if segmenter is None and bundle.nnunet_dir is not None:
            factory = _bundle_segmenter_factory(bundle, device)
        return cls(
            model,
            states,
            bundle.config,
            device=device,
            tta=tta,
            segmenter=segmenter,
            ignore_masks=ignore_masks,
            bundle=bundle,
            segmenter_factory=factory,
            calibration=_bundle_calibration(bundle.root, chosen),
        )

    # ------------------------------------------------------------------ internals
    def _load_fold(self, k: int) -> None:
        if self._loaded == k:
            return
        try:
            self.model.load_state_dict(self.fold_states[k])
        except RuntimeError as e:
            where = self.bundle.weights_path(k) if self.bundle else f"fold {k}"
            raise WeightsError(
                f"{where}: weights do not fit the configured model ({str(e).splitlines()[0]})"
            ) from e
        self.model.eval()
        self._loaded = k

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _masks_for(self, case: Any, nm_mask: Any, qsm_mask: Any) -> tuple[Any, Any, str]:
        """Masks to crop with: ``(nm_override, qsm_override, source)``; ``None`` = the case's own."""
        source = "given" if (nm_mask is not None or qsm_mask is not None) else "case"
        have_nm = nm_mask is not None or (
            not self.ignore_masks and getattr(case, "nm_mask", None) is not None
        )
        have_qsm = qsm_mask is not None or (
            not self.ignore_masks and getattr(case, "qsm_mask", None) is not None
        )
        if have_nm and have_qsm:
            if self.ignore_masks:  # explicit masks only; never fall back to the case's files
                source = "given"
            return nm_mask, qsm_mask, source
        if self.segmenter is None and self.segmenter_factory is not None:
            self.segmenter = self.segmenter_factory()  # e.g. nnU-Net models loaded on first need
        if self.segmenter is None:
            missing = " / ".join(
                n
                for n, ok in (("NM_mask.nii.gz", have_nm), ("QSM_mask.nii.gz", have_qsm))
                if not ok
            )
            why = " (mask files ignored)" if self.ignore_masks else ""
            raise InputDataError(
                f"{case.case_id}: case has no {missing}{why} and no nnU-Net models in the bundle "
                "(add the masks, or use a bundle with nnunet/ models)"
            )
        seg_nm, seg_qsm = self.segmenter.predict(case)
        if not have_nm:
            nm_mask = seg_nm
        if not have_qsm:
            qsm_mask = seg_qsm
        return nm_mask, qsm_mask, "segmenter"

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        """(1, S, H, W) -> (V, S, H, W): with TTA the mirrored view (in-plane X = H) is added."""
        if self.tta:
            x = torch.cat([x, torch.flip(x, dims=(-2,))], dim=0)
        return x.to(self.device)

    def _inputs(
        self, crops: Mapping[str, Any], zeroed: frozenset[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Model inputs (and merged-class masks for models that need them, e.g. SERes10)."""
        images: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] | None = (
            {} if getattr(self.model, "needs_masks", False) else None
        )
        for name in ROI_NAMES:
            crop = crops[name]
            x = torch.as_tensor(np.asarray(crop.image), dtype=torch.float32)[None]  # (1, S, H, W)
            if name in zeroed:
                x = torch.zeros_like(x)
            images[name] = self._views(x)
            if masks is not None:
                if crop.mask is None:
                    raise InputDataError(
                        f"{getattr(crop, 'case_id', '') or name}: the model needs masks for ROI {name}"
                    )
                m = torch.as_tensor(np.asarray(crop.mask), dtype=torch.long)[None]
                masks[name] = self._views(torch.zeros_like(m) if name in zeroed else m)
        return images, masks

    def _forward(
        self, images: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        with torch.inference_mode(), self._autocast():
            out = self.model(images) if masks is None else self.model(images, masks)
        probs = torch.softmax(out.logits.float(), dim=-1)[:, 1]  # (V,)
        tokens = {k: v.detach().float().cpu() for k, v in (out.roi_tokens or {}).items()}
        seg = None
        if getattr(out, "seg_logits", None):
            seg = {}
            for name, logits in out.seg_logits.items():
                p = torch.softmax(logits.float(), dim=1)  # (V, C, S, H, W)
                if self.tta:
                    p = torch.stack(
                        [p[0], torch.flip(p[1], dims=(-2,))]
                    )  # un-flip the mirrored view
                seg[name] = p.mean(dim=0).cpu()  # (C, S, H, W)
        return probs.cpu(), tokens, seg

    # ------------------------------------------------------------------ public API
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
    ) -> CasePrediction:
        """Predict one case with every fold (and TTA if on).

        Parameters
        ----------
        case: a ``mrn_engine.data.Case``.
        nm_mask, qsm_mask: masks (Volumes) to crop with, overriding the case's mask files.
        progress: ``callback(fraction, message)`` after each step.
        zero_rois: ROI names whose input is replaced by an all-zero volume (masking check).
        warm_masking: also compute each fold's empty-ROI tokens while that fold is loaded
            (see :meth:`warm_masking_cache`), so that later :meth:`masked_prediction` /
            :meth:`masking_table` calls are head passes only (what an interactive viewer wants).
        keep_slice_tokens: also keep each fold's SFA inputs (``CasePrediction.slice_tokens``)
            for per-slice evidence (MRN only).

        Raises
        ------
        InputDataError: no masks for cropping (and no segmenter), or unusable input.
        """
        from mrn_engine.rois import extract_rois, paste_back

        zeroed = frozenset(zero_rois)
        unknown = zeroed - set(ROI_NAMES)
        if unknown:
            raise InputDataError(
                f"{case.case_id}: unknown ROI name(s) {sorted(unknown)}; use {list(ROI_NAMES)}"
            )
        steps = len(self.folds) + 2
        if progress:
            progress(0.0, f"{case.case_id}: masks and ROI crops")
        nm_m, qsm_m, mask_source = self._masks_for(case, nm_mask, qsm_mask)
        crops = extract_rois(case, self.config.roi, nm_mask=nm_m, qsm_mask=qsm_m)
        missing = [n for n in ROI_NAMES if n not in crops]
        if missing:
            raise InputDataError(f"{case.case_id}: no ROI crop for {missing}")
        images, masks = self._inputs(crops, zeroed)

        p_folds: list[float] = []
        tokens: list[dict[str, torch.Tensor]] = []
        kept: list[dict[str, torch.Tensor]] | None = [] if keep_slice_tokens else None
        spread: list[float] = []
        seg_sum: dict[str, torch.Tensor] = {}
        for i, k in enumerate(self.folds):
            self._load_fold(k)
            if kept is not None:
                from mrn_engine.models.evidence import capture_slice_tokens

                with capture_slice_tokens(self.model) as store:
                    probs, toks, seg = self._forward(images, masks)
                kept.append({n: t.float().cpu() for n, t in store.items()})
            else:
                probs, toks, seg = self._forward(images, masks)
            if self.tta:
                spread.append(float((probs[0] - probs[1]).abs()))
            if warm_masking and toks and self.can_mask:
                self._empty_tokens(k)  # fold k is loaded: no extra weight swap
            p_folds.append(float(probs.mean()))
            tokens.append(toks)
            if seg is not None:
                for name, p in seg.items():
                    seg_sum[name] = seg_sum.get(name, 0) + p / len(self.folds)
            if progress:
                progress((i + 2) / steps, f"{case.case_id}: fold {k} P(PD)={p_folds[-1]:.3f}")

        qsm_shape = _volume_array(case.qsm).shape
        nm_shape = _volume_array(case.nm).shape
        nuclei = np.zeros(qsm_shape, dtype=np.uint8)
        nm_nuclei = np.zeros(nm_shape, dtype=np.uint8)
        seg_source = "dpt" if len(seg_sum) == len(ROI_NAMES) else "input-masks"
        for name in ROI_NAMES:
            crop = crops[name]
            if seg_source == "dpt":
                classes = seg_sum[name].argmax(dim=0).numpy().astype(np.int64)
            elif crop.mask is not None:
                classes = np.asarray(crop.mask, dtype=np.int64)
            else:
                continue
            nm_roi = ROI_BY_NAME[name].modality == "NM"
            labels = np.asarray(paste_back(crop, classes, nm_shape if nm_roi else qsm_shape))
            target = nm_nuclei if nm_roi else nuclei
            fill = (labels > 0) & (target == 0)
            target[fill] = labels[fill].astype(np.uint8)

        p_raw = list(p_folds)
        p_folds = self.calibrate_folds(p_raw)
        p = np.asarray(p_folds)
        p_pd = float(p.mean())
        if progress:
            progress(1.0, f"{case.case_id}: P(PD)={p_pd:.3f}")
        return CasePrediction(
            case_id=case.case_id,
            p_pd_folds=p_folds,
            p_pd=p_pd,
            p_pd_std=float(p.std()),
            call=int(p_pd >= 0.5),
            roi_tokens=tokens,
            nuclei=nuclei,
            nm_nuclei=nm_nuclei,
            boxes={n: crops[n].box for n in ROI_NAMES},
            folds=list(self.folds),
            label=getattr(case, "label", None),
            seg_source=seg_source,
            mask_source=mask_source,
            nm_mask=_mask_array(nm_m) if mask_source == "segmenter" else None,
            qsm_mask=_mask_array(qsm_m) if mask_source == "segmenter" else None,
            zeroed=zeroed,
            calibrated=self.calibrated,
            p_pd_folds_raw=p_raw,
            p_pd_raw=float(np.mean(p_raw)),
            tta_spread=spread,
            slice_tokens=kept,
            crops=dict(crops) if keep_slice_tokens else None,
        )

    @property
    def calibrated(self) -> bool:
        """Whether P(PD) is calibrated (every fold has a calibration); False for old bundles."""
        return bool(self.calibration)

    def calibrate_folds(self, p_folds: Iterable[float]) -> list[float]:
        """Per-fold P(PD) (in ``self.folds`` order) through each fold's calibration, if any."""
        from mrn_engine.training.calibration import apply_folds

        return apply_folds(self.calibration, self.folds, list(p_folds))

    @property
    def can_mask(self) -> bool:
        """Whether the model supports ROI masking from tokens (``classify_tokens`` + ``empty_token``)."""
        return hasattr(self.model, "classify_tokens") and hasattr(self.model, "empty_token")

    def warm_masking_cache(self, progress: ProgressFn | None = None) -> bool:
        """Compute every fold's empty-ROI tokens now (one ROI-encoder pass per ROI and fold).

        They are cached, so :meth:`masked_prediction` and :meth:`masking_table` afterwards run
        only the classification head, never the backbone. ``predict_case(..., warm_masking=True)``
        does the same while each fold is loaded. Returns False (and does nothing) for models
        that cannot mask ROIs.
        """
        if not self.can_mask:
            return False
        for i, k in enumerate(self.folds):
            self._empty_tokens(k)
            if progress:
                progress((i + 1) / len(self.folds), f"ROI masking: fold {k} ready")
        return True

    def masking_cache_ready(self) -> bool:
        """True when every fold's empty-ROI tokens are cached (masking needs no backbone pass)."""
        return all(k in self._empty for k in self.folds)

    def _masked_probs(self, pred: CasePrediction, subsets: list[frozenset[str]]) -> np.ndarray:
        """P(PD) per subset and fold, ``(n_subsets, n_folds)``, from the cached tokens only."""
        if not pred.roi_tokens or not pred.roi_tokens[0]:
            raise InputDataError(
                f"{pred.case_id}: the model gives no ROI tokens; masking needs MRN"
            )
        if not self.can_mask:
            raise InputDataError(
                f"{pred.case_id}: model {type(self.model).__name__} cannot classify ROI tokens"
            )
        if list(pred.folds) != self.folds:
            raise InputDataError(
                f"{pred.case_id}: prediction made with folds {pred.folds}, predictor has {self.folds}"
            )
        for s in subsets:
            if s - set(ROI_NAMES):
                raise InputDataError(
                    f"masking: unknown ROI name(s) {sorted(s - set(ROI_NAMES))}; use {list(ROI_NAMES)}"
                )
        out = np.zeros((len(subsets), len(self.folds)))
        for j, k in enumerate(self.folds):
            self._load_fold(k)
            base = {n: t.to(self.device) for n, t in pred.roi_tokens[j].items()}
            views = next(iter(base.values())).shape[0]
            empty = self._empty_tokens(k)
            with torch.inference_mode(), self._autocast():
                for i, s in enumerate(subsets):
                    toks = {
                        n: (empty[n].expand(views, -1).to(base[n].dtype) if n in s else base[n])
                        for n in ROI_NAMES
                    }
                    logits = self.model.classify_tokens(toks)  # masked tokens already swapped in
                    out[i, j] = float(torch.softmax(logits.float(), dim=-1)[:, 1].mean())
        for i in range(len(subsets)):
            out[i] = self.calibrate_folds(out[i])
        return out

    def _empty_tokens(self, k: int) -> dict[str, torch.Tensor]:
        """Fold ``k``'s tokens of empty (all-zero) ROI volumes, computed once and cached."""
        if k not in self._empty:
            self._load_fold(k)
            with torch.inference_mode(), self._autocast():
                self._empty[k] = {
                    n: self.model.empty_token(n, 1).detach().float() for n in ROI_NAMES
                }
        return self._empty[k]

    def masked_prediction(self, pred: CasePrediction, masked: Iterable[str]) -> dict[str, object]:
        """P(PD) with the ROIs in ``masked`` replaced by empty volumes — head passes only.

        Returns
        -------
        ``{"masked": sorted names, "p_pd_folds": [...], "p_pd": mean, "p_pd_std": std, "call": 0/1}``
        """
        subset = frozenset(masked)
        p = self._masked_probs(pred, [subset])[0]
        return {
            "masked": [n for n in ROI_NAMES if n in subset],
            "p_pd_folds": [float(x) for x in p],
            "p_pd": float(p.mean()),
            "p_pd_std": float(p.std()),
            "call": int(p.mean() >= 0.5),
        }

    def masking_table(self, pred: CasePrediction) -> list[dict[str, object]]:
        """:meth:`masked_prediction` for all 16 ROI subsets (Table 4 order)."""
        from mrn_engine.analysis.masking import MASK_SUBSETS, subset_key

        subsets = list(MASK_SUBSETS)
        probs = self._masked_probs(pred, subsets)
        return [
            {
                "case_id": pred.case_id,
                "masked": subset_key(s),
                "p_pd_folds": [float(x) for x in probs[i]],
                "p_pd": float(probs[i].mean()),
                "p_pd_std": float(probs[i].std()),
                "call": int(probs[i].mean() >= 0.5),
            }
            for i, s in enumerate(subsets)
        ]

    def predict_cases(
        self, cases_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs: Any
    ) -> Any:
        """Predict every case under ``cases_dir`` and write the submission (see ``write_submission``)."""
        from mrn_engine.inference.submission import predict_cases

        return predict_cases(self, cases_dir, out_dir, **kwargs)


def _bundle_calibration(root: Any, folds: list[int]) -> dict[int, Any]:
    """The bundle's per-fold calibrations (empty for bundles without ``calibration.json``)."""
    from mrn_engine.training.calibration import load_calibrations

    return load_calibrations(root, folds)


def _bundle_segmenter_factory(
    bundle: ModelBundle, device: str | torch.device
) -> Callable[[], Segmenter]:
    """Builds ``NNUNetSegmenter`` of ``BUNDLE/nnunet`` when first needed."""

    def make() -> Segmenter:
        from mrn_engine.segmentation import NNUNetSegmenter

        return NNUNetSegmenter.from_bundle(bundle.root, device=resolve_device(device))

    return make
