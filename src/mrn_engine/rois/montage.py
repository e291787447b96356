"""PNG montage of a case's ROI stacks: one row per ROI, one panel per slice, mask contours.

Panels are shown radiologically (subject right on screen left: the stack's X axis runs
left-to-right, anterior up). Padding slices are marked ``pad``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrn_engine.data.labels import NUCLEUS_COLOURS, ROI_BY_NAME
from mrn_engine.fileio import make_temp_file
from mrn_engine.rois.extract import RoiCrop


def _class_colour(name: str, cls: str) -> tuple[float, float, float]:
    return NUCLEUS_COLOURS.get(cls, (1.0, 1.0, 0.0))


def describe_crop(crop: RoiCrop) -> dict:
    """Box voxel ranges, size in mm, slices and label content of one crop (for printing)."""
    b = crop.box
    mm = b.size_mm(crop.spacing)
    used = crop.slice_index[crop.slice_index >= 0]
    return {
        "roi": crop.name,
        "x": f"{b.x0}:{b.x1}",
        "y": f"{b.y0}:{b.y1}",
        "z": f"{b.z0}:{b.z1}",
        "size_vox": "x".join(str(n) for n in b.shape),
        "size_mm": "x".join(f"{v:.1f}" for v in mm),
        "slices": f"{len(crop.slice_index)} (z {used.min()}-{used.max()}, "
        f"{int((crop.slice_index < 0).sum())} pad)"
        if used.size
        else f"{len(crop.slice_index)} (all pad)",
        "scale": round(crop.scale, 3),
        "labels": ", ".join(f"{k}:{v}" for k, v in crop.label_counts().items()) or "-",
    }


def save_montage(
    crops: dict[str, RoiCrop],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    panel_inches: float = 1.1,
    dpi: int = 110,
) -> Path:
    """Write a PNG montage of the crops (matplotlib Agg canvas, no pyplot; atomic write).

    Parameters
    ----------
    crops : dict
        ``name -> RoiCrop`` (one case).
    path : path-like
        Output ``.png``.
    title : str, optional
        Figure title (default: the case id).
    """
    # a bare Figure renders with the Agg canvas and leaves pyplot's global backend alone
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    names = list(crops)
    ncols = max(len(c.slice_index) for c in crops.values())
    fig = Figure(figsize=(panel_inches * ncols + 1.6, panel_inches * len(names) + 0.9), dpi=dpi)
    axes = fig.subplots(
        len(names), ncols, squeeze=False, gridspec_kw={"wspace": 0.03, "hspace": 0.25}
    )
    for r, name in enumerate(names):
        crop = crops[name]
        spec = ROI_BY_NAME[name]
        for s in range(ncols):
            ax = axes[r, s]
            ax.set_xticks([])
            ax.set_yticks([])
            if s >= len(crop.slice_index):
                ax.set_axis_off()
                continue
            ax.imshow(
                crop.image[s].T,
                cmap="gray",
                vmin=0,
                vmax=255,
                origin="lower",
                interpolation="nearest",
            )
            if crop.mask is not None:
                for ci, cls in enumerate(spec.classes, start=1):
                    m = crop.mask[s] == ci
                    if m.any():
                        ax.contour(
                            m.T.astype(float),
                            levels=[0.5],
                            colors=[_class_colour(name, cls)],
                            linewidths=0.7,
                            origin="lower",
                        )
            z = int(crop.slice_index[s])
            ax.set_title("pad" if z < 0 else f"z={z}", fontsize=6, pad=1.5)
            if s == 0:
                ax.set_ylabel(spec.title, fontsize=7)
        handles = [
            Line2D([], [], color=_class_colour(name, c), lw=1.5, label=c) for c in spec.classes
        ]
        axes[r, len(crop.slice_index) - 1].legend(
            handles=handles,
            fontsize=6,
            loc="center left",
            bbox_to_anchor=(1.02, 0.5),
            frameon=False,
        )
    case_id = next(iter(crops.values())).case_id
    fig.suptitle(title or f"{case_id}: MRN ROI stacks (radiological view, anterior up)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
