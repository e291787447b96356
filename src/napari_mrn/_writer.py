"""npe2 writer: a Labels (or Image) layer back to NIfTI in its source geometry.

The display mapping is inverted with the affine kept in ``layer.metadata`` by the reader,
so a mask painted in napari lands voxel for voxel on the original grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mrn_engine.data import Volume, save_volume
from mrn_engine.errors import InputDataError
from napari_mrn._display import DisplayMapping

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def layer_to_volume(
    data: Any, metadata: dict[str, Any], *, name: str = "layer", kind: str = "mask"
) -> Volume:
    """Rebuild an engine :class:`Volume` ``(X, Y, Z)`` from display data and layer metadata.

    Raises
    ------
    InputDataError
        The layer was not read by napari-mrn (no affine in its metadata) or its shape no
        longer fits the source grid.
    """
    try:
        mapping = DisplayMapping.from_metadata(metadata)
    except KeyError as e:
        raise InputDataError(
            f"{name}: no NIfTI geometry in the layer metadata ({e.args[0]}); open the image with "
            "napari-mrn (File > Open, choose 'MRN') so its affine is known"
        ) from None
    array = np.asarray(data)
    if array.shape != mapping.display_shape:
        raise InputDataError(
            f"{name}: layer shape {array.shape} does not match its source grid "
            f"{mapping.display_shape} (display order)"
        )
    source = mapping.from_display(array)
    if kind == "mask":
        source = source.astype(np.uint8)
    return Volume(
        np.ascontiguousarray(source), mapping.affine.copy(), metadata.get("header"), None, kind
    )


def nifti_output_path(path: str | os.PathLike) -> Path:
    """``path`` with ``.nii.gz`` appended unless it already ends in ``.nii``/``.nii.gz``."""
    path = Path(path)
    return path if path.name.endswith(NIFTI_SUFFIXES) else path.with_name(path.name + ".nii.gz")


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers."""
    out = nifti_output_path(path)
    vol = layer_to_volume(data, meta.get("metadata", {}), name=meta.get("name", "labels"))
    return [str(save_volume(vol, out))]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Image layers (float32 NIfTI)."""
    out = nifti_output_path(path)
    vol = layer_to_volume(
        data, meta.get("metadata", {}), name=meta.get("name", "image"), kind="image"
    )
    return [str(save_volume(vol, out))]
