"""napari layers -> the engine's :class:`~mrn_engine.data.Case` (one grid checked, no Qt)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mrn_engine.data import Case, Volume
from mrn_engine.errors import InputDataError
from napari_mrn._display import DisplayMapping
from napari_mrn._writer import layer_to_volume

if TYPE_CHECKING:
    from napari.layers import Layer


def layer_mapping(layer: Layer) -> DisplayMapping:
    """The display mapping of a layer (from napari-mrn metadata, else assume LAS + layer scale)."""
    meta = layer.metadata or {}
    if "affine" in meta and "source_shape" in meta:
        return DisplayMapping.from_metadata(meta)
    return DisplayMapping.default_for_display(np.shape(layer.data), tuple(layer.scale))


def layer_volume(layer: Layer, *, kind: str) -> Volume:
    """An engine :class:`Volume` ``(X, Y, Z)`` from a napari layer (``kind`` image or mask)."""
    if np.ndim(layer.data) != 3:
        raise InputDataError(
            f"layer '{layer.name}': expected a 3D volume, got shape {np.shape(layer.data)}"
        )
    mapping = layer_mapping(layer)
    meta = {**(layer.metadata or {}), **mapping.to_metadata()}
    vol = layer_to_volume(np.asarray(layer.data), meta, name=f"layer '{layer.name}'", kind=kind)
    # engine messages start with Volume.name: the file the layer came from, else the layer
    source = meta.get("source_path")
    vol.path = Path(source) if source else Path(f"layer '{layer.name}'")
    if kind == "image":
        vol.array = vol.array.astype(np.float32, copy=False)
        if not np.isfinite(vol.array).all():
            raise InputDataError(f"layer '{layer.name}': holds NaN or infinite values")
    return vol


def _grid_text(mapping: DisplayMapping) -> str:
    sp = ", ".join(f"{s:.3g}" for s in mapping.spacing)
    return f"{mapping.shape[0]}x{mapping.shape[1]}x{mapping.shape[2]} voxels of {sp} mm"


def check_layers_grid(reference: Layer, others: Iterable[Layer | None]) -> None:
    """Raise :class:`InputDataError` unless every layer in ``others`` lies on ``reference``'s grid."""
    ref = layer_mapping(reference)
    for layer in others:
        if layer is None:
            continue
        m = layer_mapping(layer)
        if m.shape != ref.shape or not np.allclose(m.affine, ref.affine, atol=1e-3):
            raise InputDataError(
                f"layer '{layer.name}': not on the grid of layer '{reference.name}' "
                f"({_grid_text(m)} vs {_grid_text(ref)}"
                + ("" if m.shape != ref.shape else "; the affines differ")
                + "). NM, QSM and masks must be co-registered on one grid."
            )


def case_from_layers(
    nm: Layer | None,
    qsm: Layer | None,
    nm_mask: Layer | None = None,
    qsm_mask: Layer | None = None,
    case_id: str | None = None,
) -> Case:
    """Build the engine's :class:`Case` from napari layers, checking that they share a grid."""
    if nm is None or qsm is None:
        raise InputDataError(
            "choose an NM layer and a QSM layer (File > Open Sample > MRN PD case)"
        )
    if nm is qsm:
        raise InputDataError(f"layer '{nm.name}': chosen as both NM and QSM")
    check_layers_grid(qsm, [nm, nm_mask, qsm_mask])
    cid = case_id or (qsm.metadata or {}).get("case_id") or (nm.metadata or {}).get("case_id")
    return Case(
        case_id=str(cid or qsm.name),
        nm=layer_volume(nm, kind="image"),
        qsm=layer_volume(qsm, kind="image"),
        nm_mask=layer_volume(nm_mask, kind="mask") if nm_mask is not None else None,
        qsm_mask=layer_volume(qsm_mask, kind="mask") if qsm_mask is not None else None,
    )
