"""Extraction of the four MRN ROIs as fixed-size axial slice stacks (paper 3.3).

Per ROI (``ROIS`` in :mod:`mrn_engine.data.labels`):

1. box = union of the ROI's source labels in its modality's mask, grown by
   ``RoiConfig.margin_mm`` per side (in mm, so 2 mm slices get fewer margin voxels than
   0.67 mm in-plane voxels), clipped to the volume;
2. intensities mapped to ``[0, 255]`` by ``RoiConfig.intensity`` (:mod:`mrn_engine.rois.intensity`:
   NM contrast-to-noise against the reference region next to the SN, QSM in a fixed ppm
   window); everything that is not image (padding slices, the in-plane square) takes the
   mapped value of neutral tissue (``RoiCrop.pad_value``);
3. slices: a fixed count ``S = RoiConfig.slices[name]``, by ``RoiConfig.slice_policy``:

   - ``"pad"`` (default): a box with more slices keeps the central ``S`` (the extra ones are
     margin or thin nucleus tails); a box with fewer is centred in the stack and padded with
     neutral slices (``pad_value`` in the image, 0 in the mask; no data invented);
   - ``"resample"``: the box's ``n`` slices are resampled along z to exactly ``S``, slice
     centres spread evenly over the box (``align_corners=False``): linear for the image
     (antialiased when shrinking, like in-plane), nearest for the mask;

   ``RoiCrop.slice_index`` records the source z of each stack slice (-1 = padding; for
   ``"resample"`` the nearest source slice, the one the mask slice was taken from);
4. in-plane: the longest side of the box resized to ``image_size`` (voxel aspect kept),
   bilinear for the image and nearest for the mask (``torch.nn.functional.interpolate``),
   then zero-padded to a centred square;
5. the mask: left/right merged with ``RoiSpec.merge_map()`` (0 = background).

``paste_back`` inverts 3-5 for predicted classes and restores left/right from the subject's
midline. For ``"resample"`` every source slice of the box takes the nearest stack slice
(nearest resampling back along z): exact when ``S >= n``, an approximation when z was
shrunk (``S < n``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mrn_engine.config import RoiConfig, RunConfig
from mrn_engine.data.cases import Case
from mrn_engine.data.labels import NM_LABELS, QSM_LABELS, ROI_BY_NAME, ROIS, RoiSpec
from mrn_engine.data.nifti import Volume, check_mask_labels
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.rois.boxes import CropBox, roi_box
from mrn_engine.rois.intensity import (
    IntensityMapping,
    apply_window,
    nm_mapping,
    percentile_mapping,
    qsm_mapping,
)


@dataclass
class RoiCrop:
    """One ROI as a slice stack, with everything needed to paste predictions back.

    Attributes
    ----------
    name : str
        Key in ``ROI_NAMES``.
    image : np.ndarray
        ``(S, H, W)`` float32 in ``[0, 255]``; ``H`` = source X, ``W`` = source Y.
    mask : np.ndarray or None
        ``(S, H, W)`` int64 merged classes (0 = background).
    box : CropBox
        Source voxel box.
    slice_index : np.ndarray
        ``(S,)`` int64 source z of each stack slice; -1 for zero-padding slices. With
        ``slice_policy == "resample"``: the nearest source slice of each stack slice.
    resized_hw : tuple[int, int]
        Size of the resized box in the stack, before padding.
    pad : tuple[int, int]
        Offsets ``(top, left)`` of the resized box inside the square.
    scale : float
        Stack pixels per source voxel in-plane.
    midline_x : float
        Source x coordinate (voxel index) of the subject's midline; lower x = subject right.
    window : tuple[float, float]
        Intensity window ``(lo, hi)`` mapped to ``(0, 255)``.
    spacing : tuple[float, float, float]
        Source voxel size in mm.
    volume_shape : tuple[int, int, int]
        Source grid shape.
    case_id : str
    slice_policy : str
        ``RoiConfig.slice_policy`` the stack was made with (``"pad"`` or ``"resample"``);
        decides how :func:`paste_back` maps stack slices to source z.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    box: CropBox
    slice_index: np.ndarray
    resized_hw: tuple[int, int]
    pad: tuple[int, int]
    scale: float
    midline_x: float
    window: tuple[float, float] = (0.0, 255.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    volume_shape: tuple[int, int, int] = (0, 0, 0)
    case_id: str = ""
    meta: dict = field(default_factory=dict)
    slice_policy: str = "pad"
    #: mapped value (0..255) of neutral tissue: the image value of padding pixels and slices
    pad_value: float = 0.0

    @property
    def spec(self) -> RoiSpec:
        """The ROI definition."""
        return ROI_BY_NAME[self.name]

    def label_counts(self) -> dict[str, int]:
        """Pixels per merged class in the stack mask (empty dict without mask)."""
        if self.mask is None:
            return {}
        counts = np.bincount(self.mask.ravel(), minlength=self.spec.num_classes)
        return {c: int(counts[i + 1]) for i, c in enumerate(self.spec.classes)}


def _roi_config(cfg: RoiConfig | RunConfig) -> RoiConfig:
    return cfg.roi if isinstance(cfg, RunConfig) else cfg


def _resize(stack: np.ndarray, size: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """Resize ``(N, h, w)`` slices to ``(N, *size)`` with torch interpolate."""
    if stack.shape[1:] == tuple(size):
        return stack.copy()
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    if nearest:
        out = F.interpolate(t, size=size, mode="nearest-exact")
    else:
        down = size[0] < stack.shape[1] or size[1] < stack.shape[2]
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=down)
    return out[:, 0].numpy()


def _slice_plan(z0: int, z1: int, n: int) -> np.ndarray:
    """``"pad"`` policy: source z per stack slice, centred; -1 = padding."""
    nz = z1 - z0
    out = np.full(n, -1, dtype=np.int64)
    if nz >= n:
        start = z0 + (nz - n) // 2
        out[:] = np.arange(start, start + n)
    else:
        before = (n - nz) // 2
        out[before : before + nz] = np.arange(z0, z1)
    return out


def _resample_plan(z0: int, z1: int, n: int) -> np.ndarray:
    """``"resample"`` policy: nearest source z per stack slice.

    Stack slice ``s`` is centred at box z ``(s + 0.5) * nz / n - 0.5`` (``align_corners=False``,
    as ``torch.nn.functional.interpolate``); its nearest slice is ``floor((s + 0.5) * nz / n)``
    (``"nearest-exact"``).
    """
    nz = z1 - z0
    idx = np.floor((np.arange(n) + 0.5) * nz / n).astype(np.int64)
    return z0 + np.minimum(idx, nz - 1)


def _stack_to_source(crop: RoiCrop) -> tuple[np.ndarray, np.ndarray]:
    """``(stack slices, source z)`` pairs that paste-back writes.

    ``"pad"``: every non-padding stack slice to its own source z. ``"resample"``: every source
    slice of the box from its nearest stack slice (inverse of :func:`_resample_plan`: exact
    when the stack has at least as many slices as the box).
    """
    if crop.slice_policy == "resample":
        z0, z1 = crop.box.z0, crop.box.z1
        n = len(crop.slice_index)
        zs = np.arange(z0, z1, dtype=np.int64)
        ss = np.minimum(np.floor((zs - z0 + 0.5) * n / (z1 - z0)).astype(np.int64), n - 1)
        return ss, zs
    ss = np.nonzero(crop.slice_index >= 0)[0]
    return ss, crop.slice_index[ss]


def _resample_z(raw: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of ``(nz, h, w)`` to ``(n, h, w)`` along axis 0 (antialiased when shrinking)."""
    nz = raw.shape[0]
    if nz == n:
        return np.asarray(raw, dtype=np.float32).copy()
    t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).reshape(1, 1, nz, -1)
    out = F.interpolate(
        t, size=(n, t.shape[-1]), mode="bilinear", align_corners=False, antialias=n < nz
    )
    return out[0, 0].reshape(n, *raw.shape[1:]).numpy()


def _midline(mask: np.ndarray, box: CropBox, spec: RoiSpec, volume_x: int) -> float:
    """Midpoint of the right- and left-label centroids in x; volume centre if a side is absent."""
    sub = mask[box.slices]
    right = [g[0] for g in spec.source_labels]
    left = [g[1] for g in spec.source_labels if len(g) > 1]
    xs = []
    for side in (right, left):
        sel = np.isin(sub, side)
        if not sel.any():
            return (volume_x - 1) / 2.0
        xs.append(float(np.nonzero(sel)[0].mean()) + box.x0)
    return (xs[0] + xs[1]) / 2.0


def crop_roi(
    image: np.ndarray,
    mask: np.ndarray | None,
    spec: RoiSpec,
    box: CropBox,
    cfg: RoiConfig,
    *,
    window: tuple[float, float],
    midline_x: float,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    case_id: str = "",
    pad_value: float = 0.0,
) -> RoiCrop:
    """Cut one ROI stack from a raw image (and source-label mask) given its box.

    ``pad_value`` (0..255) fills what is not image: padding slices and the in-plane square.
    """
    size = int(cfg.image_size)
    n_slices = int(cfg.slices[spec.name])
    policy = cfg.check().slice_policy
    resample = policy == "resample"
    if resample:
        plan = _resample_plan(box.z0, box.z1, n_slices)
    else:
        plan = _slice_plan(box.z0, box.z1, n_slices)
    nx, ny, _ = box.shape
    scale = size / max(nx, ny)
    hx = min(size, max(1, int(round(nx * scale))))
    hy = min(size, max(1, int(round(ny * scale))))
    px, py = (size - hx) // 2, (size - hy) // 2
    valid = plan >= 0
    zs = plan[valid]

    if resample:  # linear in z over the whole box (raw intensities), then the window
        raw = np.moveaxis(image[box.slices], 2, 0)  # (nz, nx, ny)
        slices = apply_window(_resample_z(raw, n_slices), window)  # (n, nx, ny)
    else:
        raw = image[box.x0 : box.x1, box.y0 : box.y1][:, :, zs]  # (nx, ny, n)
        slices = apply_window(np.moveaxis(raw, 2, 0), window)  # (n, nx, ny)
    out = np.full((n_slices, size, size), float(pad_value), np.float32)
    out[valid, px : px + hx, py : py + hy] = np.clip(
        _resize(slices, (hx, hy), nearest=False), 0, 255
    )

    mask_out = None
    if mask is not None:
        lut = np.zeros(256, dtype=np.int64)
        for lab, cls in spec.merge_map().items():
            lut[lab] = cls
        msub = lut[np.moveaxis(mask[box.x0 : box.x1, box.y0 : box.y1][:, :, zs], 2, 0)]
        mask_out = np.zeros((n_slices, size, size), np.int64)
        resized = _resize(msub.astype(np.float32), (hx, hy), nearest=True)
        mask_out[valid, px : px + hx, py : py + hy] = np.rint(resized).astype(np.int64)
    return RoiCrop(
        name=spec.name,
        image=out,
        mask=mask_out,
        box=box,
        slice_index=plan,
        resized_hw=(hx, hy),
        pad=(px, py),
        scale=float(scale),
        midline_x=float(midline_x),
        window=(float(window[0]), float(window[1])),
        spacing=tuple(float(s) for s in spacing),
        volume_shape=tuple(int(s) for s in image.shape),
        case_id=case_id,
        slice_policy=policy,
        pad_value=float(pad_value),
    )


def modality_mapping(
    modality: str,
    image: Volume,
    cfg: RoiConfig,
    mask: np.ndarray | None = None,
    qsm_mask: np.ndarray | None = None,
    mask_source: str = "",
) -> IntensityMapping:
    """The intensity mapping of one modality's volume under ``cfg.intensity``.

    ``mask`` is the modality's label mask (the NM mask locates the NM reference region);
    ``qsm_mask`` (same grid) keeps nuclei out of that region.
    """
    name = image.name or modality
    if cfg.intensity == "percentile":
        if modality == "NM":
            return percentile_mapping(image.array, cfg.nm_clip_percentiles, cfg.nm_window_scale)
        return percentile_mapping(image.array, cfg.qsm_clip_percentiles, cfg.qsm_window_scale)
    if modality == "QSM":
        return qsm_mapping(image.array, cfg.qsm_window_ppm, cfg.qsm_unit, name)
    if mask is None:
        raise InputDataError(f"{name}: the NM mapping needs an NM mask to find the SN")
    if qsm_mask is not None and qsm_mask.shape != mask.shape:
        qsm_mask = None
    return nm_mapping(
        image.array, mask, image.spacing, cfg.nm_cnr_window, qsm_mask, mask_source or name
    )


def _as_mask(
    case: Case, given, own: Volume | None, image: Volume, what: str, allowed: dict[int, str]
) -> tuple[np.ndarray | None, str]:
    if given is None:
        if own is None:
            return None, ""
        return own.array, own.name
    if isinstance(given, Volume):
        arr, name = given.array, given.name
    else:
        arr, name = np.asarray(given), f"{case.case_id}: given {what}"
    if arr.shape != image.shape:
        raise InputDataError(
            f"{name}: {what} of shape {arr.shape} is not on the image grid {image.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise InputDataError(f"{name}: {what} holds non-integer values")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputDataError(f"{name}: {what} values must lie in 0..255")
    arr = arr.astype(np.uint8)
    check_mask_labels(Volume(arr, image.affine, None, None, "mask"), allowed, what)
    return arr, name


def check_roi_labels(counts: np.ndarray, spec: RoiSpec, source: str, *, strict: bool) -> None:
    """Raise if an ROI's labels are all absent; if some are, raise (strict) or warn."""
    names = QSM_LABELS if spec.modality == "QSM" else NM_LABELS
    missing = [lab for lab in spec.labels if counts[lab] == 0]
    if not missing:
        return
    desc = ", ".join(f"{lab} ({names[lab]})" for lab in missing)
    if len(missing) == len(spec.labels):
        raise InputDataError(
            f"{source}: ROI {spec.name} ({spec.title}) needs labels {list(spec.labels)}; "
            f"none is present, so the ROI cannot be placed"
        )
    msg = f"{source}: ROI {spec.name} ({spec.title}) has empty/missing label(s) {desc}"
    if strict:
        raise InputDataError(msg)
    warnings.warn(msg, MRNWarning, stacklevel=3)


def extract_rois(
    case: Case,
    cfg: RoiConfig | RunConfig,
    *,
    nm_mask: Volume | np.ndarray | None = None,
    qsm_mask: Volume | np.ndarray | None = None,
    strict: bool | None = None,
    rois: tuple[str, ...] | None = None,
) -> dict[str, RoiCrop]:
    """Crop the four ROIs of a case.

    Parameters
    ----------
    case : Case
        Loaded case (NM, QSM and, unless given here, its masks).
    cfg : RoiConfig or RunConfig
        Image size, slices per ROI and slice policy, margin, percentile windows.
    nm_mask, qsm_mask : Volume or array, optional
        Masks in challenge labels on the case grid (e.g. nnU-Net predictions); override the
        case's own masks.
    strict : bool, optional
        Missing individual labels of an ROI raise (True) or warn (False). Default: strict for
        the case's own (ground-truth) masks, lenient for masks passed in. An ROI with none of
        its labels always raises.
    rois : tuple of str, optional
        Subset of ROI names (default: all four).

    Returns
    -------
    dict
        ``name -> RoiCrop`` in ``ROI_NAMES`` order. ``mask`` is the merged class stack.
    """
    rc = _roi_config(cfg)
    masks = {
        "NM": _as_mask(case, nm_mask, case.nm_mask, case.nm, "NM mask", NM_LABELS),
        "QSM": _as_mask(case, qsm_mask, case.qsm_mask, case.qsm, "QSM mask", QSM_LABELS),
    }
    given = {"NM": nm_mask is not None, "QSM": qsm_mask is not None}
    images = {"NM": case.nm, "QSM": case.qsm}
    maps: dict[str, IntensityMapping] = {}
    counts: dict[str, np.ndarray] = {}
    wanted = [r for r in ROIS if rois is None or r.name in rois]
    out: dict[str, RoiCrop] = {}
    for spec in wanted:
        mod = spec.modality
        arr, source = masks[mod]
        if arr is None:
            raise InputDataError(
                f"{case.case_id}: no {mod} mask ({mod}_mask.nii.gz or a predicted mask) "
                f"to place ROI {spec.name}"
            )
        if spec.name not in rc.slices:
            raise InputDataError(f"RoiConfig.slices has no entry for ROI {spec.name}")
        if mod not in counts:
            counts[mod] = np.bincount(arr.ravel(order="K"), minlength=256)
        check_roi_labels(
            counts[mod], spec, source, strict=(not given[mod]) if strict is None else strict
        )
        image = images[mod]
        if mod not in maps:
            maps[mod] = modality_mapping(
                mod, image, rc, arr, masks["QSM"][0] if mod == "NM" else None, source
            )
        box = roi_box(arr, spec.labels, image.spacing, rc.margin_mm)
        assert box is not None  # checked above
        out[spec.name] = crop_roi(
            image.array,
            arr,
            spec,
            box,
            rc,
            window=maps[mod].window,
            midline_x=_midline(arr, box, spec, image.shape[0]),
            spacing=image.spacing,
            case_id=case.case_id,
            pad_value=maps[mod].pad_value,
        )
    return out


def paste_back(
    crop: RoiCrop,
    classes: np.ndarray | torch.Tensor,
    volume_shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Put predicted merged classes of one ROI back into a full volume of source labels.

    Parameters
    ----------
    crop : RoiCrop
        The crop the prediction belongs to.
    classes : array ``(S, H, W)``
        Merged class per stack pixel (0 = background), e.g. ``seg_logits.argmax(1)``.
    volume_shape : tuple, optional
        Source grid (default: ``crop.volume_shape``).

    Returns
    -------
    np.ndarray
        ``(X, Y, Z)`` uint8 in the challenge's label values: each merged class becomes its
        right label where ``x < midline_x`` (lower x = subject right) and its left label
        elsewhere. Voxels outside the box or on padding slices are 0. For a ``"resample"``
        crop every box slice takes its nearest stack slice (exact when the stack has at least
        as many slices as the box, nearest-neighbour in z otherwise).
    """
    if isinstance(classes, torch.Tensor):
        classes = classes.detach().cpu().numpy()
    classes = np.asarray(classes)
    shape = tuple(int(s) for s in (volume_shape or crop.volume_shape))
    s_expected = crop.image.shape if crop.image is not None else None
    if classes.ndim != 3 or (s_expected is not None and classes.shape != s_expected):
        raise InputDataError(
            f"{crop.case_id or crop.name}: classes of shape {classes.shape} do not match the "
            f"{crop.name} stack {s_expected}"
        )
    box = crop.box
    if box.x1 > shape[0] or box.y1 > shape[1] or box.z1 > shape[2]:
        raise InputDataError(f"{crop.name}: box {box} does not fit the volume {shape}")
    spec = crop.spec
    if classes.size and (classes.min() < 0 or classes.max() >= spec.num_classes):
        raise InputDataError(
            f"{crop.name}: class values must lie in 0..{spec.num_classes - 1}, "
            f"found {classes.min()}..{classes.max()}"
        )
    if crop.slice_policy not in RoiConfig.SLICE_POLICIES:
        raise InputDataError(f"{crop.name}: unknown slice_policy {crop.slice_policy!r}")
    out = np.zeros(shape, np.uint8)
    stack_idx, source_z = _stack_to_source(crop)
    if not len(stack_idx):
        return out
    hx, hy = crop.resized_hw
    px, py = crop.pad
    nx, ny, _ = box.shape
    sub = classes[stack_idx, px : px + hx, py : py + hy].astype(np.float32)
    back = np.rint(_resize(sub, (nx, ny), nearest=True)).astype(np.int64)  # (n, nx, ny)
    right = np.zeros(spec.num_classes, np.uint8)
    left = np.zeros(spec.num_classes, np.uint8)
    for i, group in enumerate(spec.source_labels):
        right[i + 1] = group[0]
        left[i + 1] = group[-1]
    is_right = (np.arange(box.x0, box.x1) < crop.midline_x)[None, :, None]
    labels = np.where(is_right, right[back], left[back])  # (n, nx, ny)
    out[box.x0 : box.x1, box.y0 : box.y1, source_z] = np.moveaxis(labels, 0, 2)
    return out


def paste_back_all(
    crops: dict[str, RoiCrop],
    classes: dict[str, np.ndarray | torch.Tensor],
    modality: str,
    volume_shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Combine the pasted-back ROIs of one modality (``"NM"`` / ``"QSM"``) into one label volume.

    Where boxes overlap, a voxel keeps the first non-zero label (ROI order of ``ROIS``).
    """
    out: np.ndarray | None = None
    for spec in ROIS:
        if spec.modality != modality or spec.name not in classes or spec.name not in crops:
            continue
        part = paste_back(crops[spec.name], classes[spec.name], volume_shape)
        out = part if out is None else np.where(out > 0, out, part)
    if out is None:
        raise InputDataError(f"no {modality} ROI among {sorted(classes)} to paste back")
    return out
