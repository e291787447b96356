"""In-process nnU-Net v2 prediction of NM and QSM nucleus masks (the mask-free pipeline).

:class:`NNUNetSegmenter` wraps one ``nnUNetPredictor`` per modality, built once from
``BUNDLE/nnunet/{NM,QSM}/`` and reused for every case (no subprocess per case). Volumes are
handed to nnU-Net in the axis order of the reader it was trained with: nnU-Net's
``SimpleITKIO`` and ``NibabelIO`` both present a NIfTI voxel array ``(X, Y, Z)`` as
``(Z, Y, X)`` with spacing reversed, so the array is transposed on the way in and back on the
way out; the mask lands on the source grid with the challenge label values.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mrn_engine.bundle import NNUNET_DIR
from mrn_engine.data import Case, CaseFiles, Volume, load_case
from mrn_engine.data.labels import NM_LABELS, QSM_LABELS, ROIS
from mrn_engine.errors import InputDataError, MRNWarning, WeightsError
from mrn_engine.runtime import resolve_device
from mrn_engine.segmentation.env import nnunet_environment
from mrn_engine.segmentation.export import MODALITIES
from mrn_engine.segmentation.safe_model import (
    SAFE_WEIGHTS,
    initialize_predictor,
    trust_pickled_default,
)
from mrn_engine.segmentation.settings import NNUNET_DEFAULT, SegInferenceSettings

#: nnU-Net readers whose array order is the NIfTI voxel order reversed, (Z, Y, X)
REVERSED_AXIS_READERS = ("SimpleITKIO", "NibabelIO")
CHECKPOINT_NAME = "checkpoint_final.pth"


class SegmentationError(InputDataError):
    """A predicted mask is unusable for a case (e.g. a whole ROI's nuclei are missing)."""


@dataclass(frozen=True)
class MaskProblem:
    """One problem of a predicted mask pair for cropping an MRN ROI.

    ``fatal``: none of the ROI's labels is present (the ROI cannot be located); otherwise one
    nucleus type is missing from a present ROI (the crop may be misplaced).
    """

    roi: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        return self.message


def mask_pair_problems(
    nm_mask: Volume | np.ndarray, qsm_mask: Volume | np.ndarray
) -> list[MaskProblem]:
    """Problems of a mask pair for cropping the four MRN ROIs (empty list = usable)."""
    arrays = {
        "NM": np.asarray(nm_mask.array if isinstance(nm_mask, Volume) else nm_mask),
        "QSM": np.asarray(qsm_mask.array if isinstance(qsm_mask, Volume) else qsm_mask),
    }
    present = {mod: set(np.unique(a).tolist()) for mod, a in arrays.items()}
    problems = []
    for roi in ROIS:
        have = present[roi.modality]
        if not have.intersection(roi.labels):
            problems.append(
                MaskProblem(
                    roi.name,
                    f"ROI {roi.name} ({roi.title}): none of its labels {list(roi.labels)} is "
                    f"present in the {roi.modality} mask, so the ROI cannot be located",
                    fatal=True,
                )
            )
            continue
        for cls_name, labels in zip(roi.classes, roi.source_labels, strict=True):
            if not have.intersection(labels):
                problems.append(
                    MaskProblem(
                        roi.name,
                        f"ROI {roi.name} ({roi.title}): nucleus {cls_name} (labels "
                        f"{list(labels)}) is missing from the {roi.modality} mask",
                        fatal=False,
                    )
                )
    return problems


def find_nnunet_dir(path: str | os.PathLike) -> Path:
    """``BUNDLE`` or ``BUNDLE/nnunet`` -> the folder holding ``NM/`` and ``QSM/``."""
    path = Path(path)
    for cand in (path / NNUNET_DIR, path):
        if all((cand / m).is_dir() for m in MODALITIES):
            return cand
    raise WeightsError(
        f"{path}: no nnU-Net models found (expected {path}/nnunet/NM and {path}/nnunet/QSM, "
        "each with plans.json, dataset.json and fold_k/checkpoint_final.pth)"
    )


def available_folds(model_dir: Path, checkpoint_name: str = CHECKPOINT_NAME) -> list[int | str]:
    """Folds of a model folder that hold weights (safetensors or checkpoint), ``all`` last."""
    folds: list[int | str] = []
    for d in sorted(model_dir.glob("fold_*")):
        if (d / SAFE_WEIGHTS).is_file() or (d / checkpoint_name).is_file():
            tag = d.name[len("fold_") :]
            folds.append(int(tag) if tag.isdigit() else tag)
    return sorted(folds, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


def _check_model_dir(model_dir: Path, folds: list[int | str], checkpoint_name: str) -> None:
    for name in ("plans.json", "dataset.json"):
        if not (model_dir / name).is_file():
            raise WeightsError(f"{model_dir}: {name} missing (not an nnU-Net model folder)")
    for f in folds:
        fold_dir = model_dir / f"fold_{f}"
        if not (fold_dir / SAFE_WEIGHTS).is_file() and not (fold_dir / checkpoint_name).is_file():
            raise WeightsError(f"{fold_dir}: weights of fold {f} not found ({SAFE_WEIGHTS})")


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class NNUNetSegmenter:
    """NM + QSM nucleus segmentation with trained nnU-Net v2 models, in this process.

    Build with :meth:`from_bundle`; call :meth:`predict` per case. Networks are loaded on first
    use (or by :meth:`load`) and kept for all later cases. ``settings``
    (:class:`~mrn_engine.segmentation.settings.SegInferenceSettings`; default nnU-Net's own:
    mirroring, step 0.5, whole volume) choose mirroring, tile step and localisation;
    ``use_mirroring`` / ``tile_step_size`` override them. :attr:`last_figures` holds the
    seconds, tiles and window of the last prediction per modality.
    """

    def __init__(
        self,
        model_dirs: dict[str, Path],
        *,
        device: Any = "auto",
        folds: list[int | str] | dict[str, list[int | str]] | None = None,
        use_mirroring: bool | None = None,
        tile_step_size: float | None = None,
        checkpoint_name: str = CHECKPOINT_NAME,
        progress: bool = False,
        trust_pickled: bool | None = None,
        settings: SegInferenceSettings | None = None,
    ) -> None:
        if tile_step_size is not None and not 0 < tile_step_size <= 1:
            raise WeightsError(f"tile_step_size must lie in (0, 1], got {tile_step_size}")
        base = settings or NNUNET_DEFAULT
        over = {
            k: v
            for k, v in (("use_mirroring", use_mirroring), ("tile_step_size", tile_step_size))
            if v is not None
        }
        #: how masks are predicted (mirroring, tile step, localisation); default nnU-Net's own
        self.settings = replace(base, **over) if over else base
        #: figures of the last :meth:`predict_volume` per modality (seconds, tiles, window)
        self.last_figures: dict[str, dict] = {}
        self.model_dirs = {m: Path(p) for m, p in model_dirs.items()}
        self.device = resolve_device("auto" if device is None else device)
        self.checkpoint_name = checkpoint_name
        self.progress = progress
        #: full unpickling of legacy checkpoints (opt-in; default from MRN_TRUST_PICKLED_NNUNET)
        self.trust_pickled = trust_pickled_default() if trust_pickled is None else trust_pickled
        self.folds: dict[str, list[int | str]] = {}
        self.readers: dict[str, str] = {}
        self.label_values: dict[str, dict[str, int]] = {}
        for mod, d in self.model_dirs.items():
            wanted = folds.get(mod) if isinstance(folds, dict) else folds
            use = list(wanted) if wanted is not None else available_folds(d, checkpoint_name)
            if not use:
                raise WeightsError(f"{d}: no fold_k/{checkpoint_name} found")
            _check_model_dir(d, use, checkpoint_name)
            self.folds[mod] = use
            plans = _load_json(d / "plans.json")
            self.readers[mod] = str(plans.get("image_reader_writer", "SimpleITKIO"))
            if self.readers[mod] not in REVERSED_AXIS_READERS:
                raise WeightsError(
                    f"{d}: model trained with nnU-Net reader {self.readers[mod]!r}; only "
                    f"{REVERSED_AXIS_READERS} are supported"
                )
            ds = _load_json(d / "dataset.json")
            self.label_values[mod] = {
                k: int(v) for k, v in ds.get("labels", {}).items() if isinstance(v, int)
            }
            expected = NM_LABELS if mod == "NM" else QSM_LABELS
            unknown = sorted(set(self.label_values[mod].values()) - {0, *expected})
            if unknown:
                raise WeightsError(
                    f"{d}/dataset.json: label values {unknown} are not {mod} challenge labels"
                )
        self._predictors: dict[str, Any] = {}

    @classmethod
    def from_bundle(
        cls,
        bundle_or_nnunet_dir: str | os.PathLike,
        device: Any = "auto",
        folds: list[int | str] | None = None,
        use_mirroring: bool | None = None,
        tile_step_size: float | None = None,
        **kwargs: Any,
    ) -> NNUNetSegmenter:
        """Segmenter of ``BUNDLE/nnunet/{NM,QSM}`` (or of an ``nnunet`` folder directly).

        Raises
        ------
        WeightsError
            Missing models, folds or files.
        """
        root = find_nnunet_dir(bundle_or_nnunet_dir)
        return cls(
            {m: root / m for m in MODALITIES},
            device=device,
            folds=folds,
            use_mirroring=use_mirroring,
            tile_step_size=tile_step_size,
            **kwargs,
        )

    @property
    def use_mirroring(self) -> bool:
        return self.settings.use_mirroring

    @property
    def tile_step_size(self) -> float:
        return self.settings.tile_step_size

    # -- loading ---------------------------------------------------------------------------
    def _predictor(self, modality: str):
        if modality not in self._predictors:
            from mrn_engine.segmentation.windowed import WindowedPredictor

            d = self.model_dirs[modality]
            with nnunet_environment(None):
                pred = WindowedPredictor(
                    tile_step_size=self.tile_step_size,
                    use_gaussian=True,
                    use_mirroring=self.use_mirroring,
                    perform_everything_on_device=self.device.type == "cuda",
                    device=self.device,
                    verbose=False,
                    verbose_preprocessing=False,
                    allow_tqdm=self.progress,
                )
                try:
                    initialize_predictor(
                        pred, d, list(self.folds[modality]), trust_pickled=self.trust_pickled
                    )
                except (OSError, RuntimeError, KeyError, EOFError) as e:
                    raise WeightsError(
                        f"{d}: cannot load nnU-Net model ({type(e).__name__}: {e})"
                    ) from e
            self._predictors[modality] = pred
        return self._predictors[modality]

    def load(self) -> NNUNetSegmenter:
        """Load both networks now (otherwise on first use)."""
        for m in self.model_dirs:
            self._predictor(m)
        return self

    # -- prediction ------------------------------------------------------------------------
    def predict_volume(
        self, image: Volume, modality: str, *, oracle: Volume | None = None
    ) -> Volume:
        """Mask of one image (challenge labels, uint8) on the image's own grid.

        ``oracle``: benchmarks of random-weight models only -- a reference mask whose nuclei
        box stands in for the coarse pass's (see ``WindowedPredictor.predict_case``).
        """
        if modality not in self.model_dirs:
            raise WeightsError(f"no nnU-Net {modality} model loaded")
        pred = self._predictor(modality)
        data = np.ascontiguousarray(np.asarray(image.array, dtype=np.float32).transpose(2, 1, 0))[
            None
        ]
        props = {"spacing": [float(s) for s in image.spacing[::-1]]}
        if hasattr(pred, "predict_case"):  # our WindowedPredictor (a stand-in may lack it)
            ref = None if oracle is None else np.asarray(oracle.array).transpose(2, 1, 0)
            seg, figures = pred.predict_case(
                data, props, self.settings, name=image.name, oracle=ref
            )
            self.last_figures[modality] = figures
        else:
            seg = pred.predict_single_npy_array(data, props, None, None, False)
        seg = np.asarray(seg).transpose(2, 1, 0)
        if seg.shape != image.shape:
            raise SegmentationError(
                f"{image.name}: nnU-Net returned a mask of shape {seg.shape} for an image of shape {image.shape}"
            )
        return image.like(seg.astype(np.uint8), kind="mask")

    def predict(
        self, case: Case | CaseFiles | str | os.PathLike, *, strict: bool = True
    ) -> tuple[Volume, Volume]:
        """``(nm_mask, qsm_mask)`` of a case, on its NM and QSM grids, challenge label values.

        Parameters
        ----------
        strict
            Raise when a ROI cannot be located in the predicted masks (what the diagnosis
            pipeline needs); with ``False`` every problem is only a warning (mask export).

        Raises
        ------
        SegmentationError
            ``strict`` and a ROI's nuclei are entirely missing from the predicted masks (message
            names the case and the ROI). Missing single nuclei only warn (:class:`MRNWarning`).
        """
        if not isinstance(case, Case):
            case = load_case(case)
        nm_mask = self.predict_volume(case.nm, "NM")
        qsm_mask = self.predict_volume(case.qsm, "QSM")
        problems = mask_pair_problems(nm_mask, qsm_mask)
        fatal = [p.message for p in problems if p.fatal]
        if fatal and strict:
            raise SegmentationError(
                f"{case.case_id}: predicted masks unusable: " + "; ".join(fatal)
            )
        for p in problems:
            warnings.warn(f"{case.case_id}: {p}", MRNWarning, stacklevel=2)
        return nm_mask, qsm_mask

    __call__ = predict
