"""Layer data tuples for napari built from engine volumes (images, masks, ROI boxes).

Everything here is plain data (``(data, kwargs, layer_type)`` tuples): the reader, the sample
data and the diagnosis panel all build their layers through these functions, so geometry,
names and colours are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mrn_engine.data.labels import NM_LABELS, NUCLEUS_COLOURS, QSM_LABELS, ROI_BY_NAME
from napari_mrn._display import DisplayMapping

LayerDataTuple = tuple[Any, dict[str, Any], str]

#: box colour of each ROI (the colour of its most characteristic nucleus)
ROI_COLOURS: dict[str, tuple[float, float, float]] = {
    "nm_sn": NUCLEUS_COLOURS["SN"],
    "qsm_bg": NUCLEUS_COLOURS["putamen"],
    "qsm_midbrain": NUCLEUS_COLOURS["RN"],
    "qsm_dentate": NUCLEUS_COLOURS["dentate"],
}

#: which label table a mask kind uses
LABEL_TABLES: dict[str, dict[int, str]] = {"QSM": QSM_LABELS, "NM": NM_LABELS}


def label_colour(name: str) -> tuple[float, float, float, float]:
    """RGBA of a challenge label name (``putamen_L`` ...): right side full, left side darker."""
    structure, _, side = name.rpartition("_")
    rgb = np.array(NUCLEUS_COLOURS.get(structure, (0.8, 0.8, 0.8)), dtype=float)
    if side == "L":
        rgb = rgb * 0.7
    return (*(float(c) for c in rgb), 1.0)


def labels_kwargs(table: Mapping[int, str]) -> dict[str, Any]:
    """``colormap`` (direct, challenge colours) and ``features`` (names) for a Labels layer."""
    from napari.utils.colormaps import DirectLabelColormap

    colours: dict[int | None, Any] = {0: (0.0, 0.0, 0.0, 0.0), None: (1.0, 1.0, 1.0, 1.0)}
    colours.update({v: label_colour(n) for v, n in table.items()})
    features = pd.DataFrame({"index": [0, *table], "name": ["background", *table.values()]})
    return {"colormap": DirectLabelColormap(color_dict=colours), "features": features}


#: napari axis labels of the display order (see :mod:`napari_mrn._display`)
AXIS_LABELS: tuple[str, str, str] = ("axial (I-S)", "A-P", "R-L")


def _base_kwargs(mapping: DisplayMapping, name: str, metadata: Mapping[str, Any]) -> dict:
    meta = {**mapping.to_metadata(), **metadata}
    return {"name": name, "scale": mapping.scale, "metadata": meta, "axis_labels": AXIS_LABELS}


def image_layer(
    array: np.ndarray,
    mapping: DisplayMapping,
    name: str,
    *,
    kind: str,
    metadata: Mapping[str, Any] | None = None,
    visible: bool = True,
) -> LayerDataTuple:
    """An Image layer tuple for an NM/QSM/T1 volume ``(X, Y, Z)``.

    The contrast window is robust: NM 0.5-99.98 and T1 0.5-99.5 percentiles; QSM symmetric around zero
    from the brain's (non-zero voxels) 99.5 percentile of ``|QSM|``.
    """
    data = mapping.to_display(np.asarray(array, dtype=np.float32))
    finite = data[np.isfinite(data)]
    if kind == "QSM":
        inside = finite[finite != 0]
        hi = float(np.percentile(np.abs(inside), 99.5)) if inside.size else 1.0
        limits = [-hi, hi] if hi > 0 else [-1.0, 1.0]
    else:
        # NM: the substantia nigra is a tiny bright fraction of the volume, keep it below white
        top = 99.98 if kind == "NM" else 99.5
        lo, hi = np.percentile(finite, (0.5, top)) if finite.size else (0.0, 1.0)
        limits = [float(lo), float(hi) if hi > lo else float(lo) + 1.0]
    kwargs = _base_kwargs(mapping, name, {"mrn_kind": kind, **(metadata or {})})
    kwargs.update(colormap="gray", contrast_limits=limits, visible=visible)
    return data, kwargs, "image"


def labels_layer(
    array: np.ndarray,
    mapping: DisplayMapping,
    name: str,
    *,
    kind: str,
    metadata: Mapping[str, Any] | None = None,
    visible: bool = True,
    opacity: float = 0.6,
) -> LayerDataTuple:
    """A Labels layer tuple for a challenge mask ``(X, Y, Z)``; ``kind`` is ``"QSM"`` or ``"NM"``."""
    data = mapping.to_display(np.asarray(array).astype(np.uint8, copy=False))
    kwargs = _base_kwargs(mapping, name, {"mrn_kind": f"{kind}_mask", **(metadata or {})})
    kwargs.update(labels_kwargs(LABEL_TABLES[kind]), visible=visible, opacity=opacity)
    return data, kwargs, "labels"


def box_corners(box: Any) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive source-voxel corners ``(lo, hi)`` of a half-open ``CropBox``."""
    lo = np.array([box.x0, box.y0, box.z0], dtype=float)
    hi = np.array([box.x1, box.y1, box.z1], dtype=float) - 1
    return lo, hi


#: font size of the ROI labels (screen points)
ROI_LABEL_SIZE = 14
#: ROIs whose label sits inside the box at its lower-left corner. NM-SN's box lies inside the
#: QSM midbrain box, just below that box's top edge: a label above it would sit on the midbrain
#: box's edge and label. The other labels sit just above their box's upper-left corner.
LABEL_INSIDE_LOWER_LEFT: frozenset[str] = frozenset({"nm_sn"})


def _display_rect(box: Any, mapping: DisplayMapping) -> tuple[range, float, float, float, float]:
    """Display slices and the rectangle ``(r0, r1, c0, c1)`` enclosing a box's whole voxels."""
    lo, hi = box_corners(box)
    corners = mapping.index_to_display(np.stack([lo, hi]))
    dlo, dhi = corners.min(axis=0), corners.max(axis=0)
    slices = range(int(round(dlo[0])), int(round(dhi[0])) + 1)
    return slices, dlo[1] - 0.5, dhi[1] + 0.5, dlo[2] - 0.5, dhi[2] + 0.5


def _title(roi: str) -> str:
    return ROI_BY_NAME[roi].title if roi in ROI_BY_NAME else roi


def roi_boxes_layer(
    boxes: Mapping[str, Any],
    mapping: DisplayMapping,
    name: str = "MRN ROIs",
    metadata: Mapping[str, Any] | None = None,
) -> LayerDataTuple:
    """A Shapes layer tuple with one rectangle per ROI and per axial slice it spans.

    Rectangles enclose whole voxels (edges half a voxel outside the extreme voxel centres).
    ``features`` carries ``roi`` (machine name) and ``title``; the names are drawn by
    :func:`roi_labels_layer`.
    """
    shapes, rois, titles, colours = [], [], [], []
    for roi, box in boxes.items():
        slices, r0, r1, c0, c1 = _display_rect(box, mapping)
        for s in slices:
            shapes.append(np.array([[s, r0, c0], [s, r0, c1], [s, r1, c1], [s, r1, c0]]))
            rois.append(roi)
            titles.append(_title(roi))
            colours.append((*ROI_COLOURS.get(roi, (1.0, 1.0, 0.0)), 1.0))
    features = pd.DataFrame({"roi": rois, "title": titles})
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": mapping.scale,
        "shape_type": "rectangle",
        "features": features,
        "face_color": "transparent",
        "edge_width": 1.5,
        "axis_labels": AXIS_LABELS,
        "edge_color": np.array(colours).reshape(-1, 4),
        "metadata": {**mapping.to_metadata(), "mrn_kind": "roi_boxes", **(metadata or {})},
    }
    return shapes, kwargs, "shapes"


def roi_labels_layer(
    boxes: Mapping[str, Any],
    mapping: DisplayMapping,
    name: str = "MRN ROI labels",
    metadata: Mapping[str, Any] | None = None,
) -> LayerDataTuple:
    """A Points layer tuple of the ROI names: one invisible point per ROI and slice, its text
    in the ROI's colour (size :data:`ROI_LABEL_SIZE`).

    The text grows up and to the right from its point (anchor ``upper_left``). Points sit one
    row above the box's upper-left corner, or, for :data:`LABEL_INSIDE_LOWER_LEFT`, one row
    above the bottom edge inside the box, so that labels of nested boxes do not collide.
    """
    points, rois, titles, colours = [], [], [], []
    for roi, box in boxes.items():
        slices, r0, r1, c0, _ = _display_rect(box, mapping)
        row, col = (r1 - 1.0, c0 + 1.0) if roi in LABEL_INSIDE_LOWER_LEFT else (r0 - 1.0, c0)
        for s in slices:
            points.append((s, row, col))
            rois.append(roi)
            titles.append(_title(roi))
            colours.append((*ROI_COLOURS.get(roi, (1.0, 1.0, 0.0)), 1.0))
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": mapping.scale,
        "features": pd.DataFrame({"roi": rois, "title": titles}),
        "size": 0.0,
        "face_color": "transparent",
        "border_width": 0.0,
        "axis_labels": AXIS_LABELS,
        "text": {
            "string": "{title}",
            "anchor": "upper_left",
            "size": ROI_LABEL_SIZE,
            "color": np.array(colours).reshape(-1, 4),
        },
        "metadata": {**mapping.to_metadata(), "mrn_kind": "roi_labels", **(metadata or {})},
    }
    return np.array(points, dtype=float).reshape(-1, 3), kwargs, "points"
