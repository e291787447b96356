"""npe2 reader: NIfTI files and whole challenge case folders (``RJPD_xxx/``).

Images become Image layers, masks Labels layers with the challenge's names and colours; all
in the display orientation of :mod:`napari_mrn._display`, with the voxel spacing as ``scale``
and the true affine + header in ``layer.metadata`` (used by the writer and the panel).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mrn_engine.data import Case, Volume, discover_cases, load_case, load_volume
from mrn_engine.errors import InputDataError
from napari_mrn._display import DisplayMapping
from napari_mrn._layers import LayerDataTuple, image_layer, labels_layer

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]

#: file stems read as masks, with their label table (``NM`` or ``QSM``)
MASK_STEMS: dict[str, str] = {
    "NM_mask": "NM",
    "QSM_mask": "QSM",
    "NM_pred": "NM",
    "QSM_pred": "QSM",
}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def mask_kind(path: Path) -> str | None:
    """``"NM"``/``"QSM"`` when the file name says it is a mask, else ``None`` (an image)."""
    stem = _stem(path)
    if stem in MASK_STEMS:
        return MASK_STEMS[stem]
    low = stem.lower()
    if any(k in low for k in ("mask", "seg", "label", "pred", "nuclei")):
        return "NM" if low.startswith("nm") else "QSM"
    return None


def volume_layer(
    volume: Volume,
    name: str,
    *,
    metadata: dict[str, Any] | None = None,
    mask: str | None = None,
    visible: bool = True,
) -> LayerDataTuple:
    """One layer tuple for an engine :class:`Volume` (``mask`` = ``"NM"``/``"QSM"`` for labels)."""
    mapping = DisplayMapping(volume.affine, volume.shape)
    meta = {
        "header": volume.header,
        "source_path": str(volume.path) if volume.path else None,
        **(metadata or {}),
    }
    if mask is not None:
        return labels_layer(volume.array, mapping, name, kind=mask, metadata=meta, visible=visible)
    kind = name if name in ("NM", "QSM", "T1") else "image"
    return image_layer(volume.array, mapping, name, kind=kind, metadata=meta, visible=visible)


def case_layers(case: Case, *, prefix: str = "") -> list[LayerDataTuple]:
    """Layers of a loaded case, bottom to top: T1 (hidden), NM (hidden), QSM, NM_mask, QSM_mask.

    Layer names are ``NM``, ``QSM``, ... (with ``prefix``); ``metadata["case_id"]`` names the case.
    """
    meta = {"case_id": case.case_id}
    out: list[LayerDataTuple] = []
    if case.t1 is not None:
        out.append(volume_layer(case.t1, "T1", metadata=meta, visible=False))
    out.append(volume_layer(case.nm, "NM", metadata=meta, visible=False))
    out.append(volume_layer(case.qsm, "QSM", metadata=meta))
    if case.nm_mask is not None:
        out.append(volume_layer(case.nm_mask, "NM_mask", metadata=meta, mask="NM", visible=False))
    if case.qsm_mask is not None:
        out.append(volume_layer(case.qsm_mask, "QSM_mask", metadata=meta, mask="QSM"))
    if prefix:
        for _, kwargs, _ in out:
            kwargs["name"] = f"{prefix}{kwargs['name']}"
    return out


def read_case_folder(folder: str | os.PathLike) -> list[LayerDataTuple]:
    """Layers of the single case held by ``folder`` (raises if it holds none or several)."""
    folder = Path(folder)
    cases = discover_cases(folder)
    if not cases:
        raise InputDataError(f"{folder}: no case folder (NM.nii.gz / QSM.nii.gz) found")
    if len(cases) > 1:
        ids = ", ".join(c.case_id for c in cases[:5])
        raise InputDataError(
            f"{folder}: holds {len(cases)} cases ({ids}{', ...' if len(cases) > 5 else ''}); "
            "open one case folder at a time"
        )
    layers = case_layers(load_case(cases[0]))
    for stem, kind in (("NM_pred", "NM"), ("QSM_pred", "QSM")):
        for suffix in NIFTI_SUFFIXES:
            p = cases[0].folder / f"{stem}{suffix}"
            if p.is_file():
                vol = load_volume(p, kind="mask")
                layers.append(
                    volume_layer(
                        vol, stem, metadata={"case_id": cases[0].case_id}, mask=kind, visible=False
                    )
                )
                break
    return layers


def read_nifti_file(path: str | os.PathLike) -> list[LayerDataTuple]:
    """One layer for one ``.nii``/``.nii.gz`` file (a mask if its name says so)."""
    path = Path(path)
    kind = mask_kind(path)
    vol = load_volume(path, kind="mask" if kind else "image")
    return [volume_layer(vol, _stem(path), mask=kind)]


def read_paths(paths: PathOrPaths) -> list[LayerDataTuple]:
    """Read one path or several (files or case folders)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    layers: list[LayerDataTuple] = []
    for p in paths:
        p = Path(p)
        layers.extend(read_case_folder(p) if p.is_dir() else read_nifti_file(p))
    return layers


def _claims(path: Path) -> bool:
    if path.is_dir():
        try:
            return len(discover_cases(path)) >= 1
        except InputDataError:
            return False
    return path.name.endswith(NIFTI_SUFFIXES)


def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerDataTuple]] | None:
    """npe2 reader hook: a reader for NIfTI files and case folders, else ``None``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_claims(Path(p)) for p in paths):
        return None
    return read_paths
