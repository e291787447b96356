"""Figure of a PD and an HC phantom: NM and QSM axial slices through the SN with mask contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrn_engine.data.labels import NUCLEUS_COLOURS, QSM_LABELS
from mrn_engine.phantom.case import PhantomCase, make_phantom_case
from mrn_engine.phantom.geometry import VOXEL_MM

#: QSM structures outlined on the midbrain panels
_MIDBRAIN = (9, 10, 11, 12, 13, 14)


def _sn_slice(case: PhantomCase) -> int:
    area = (case.nm_mask > 0).sum(axis=(0, 1))
    return int(np.argmax(area))


def _window(case: PhantomCase, z: int, half_mm: tuple[float, float] = (32.0, 26.0)):
    xs, ys = np.nonzero(case.nm_mask[:, :, z] > 0)
    cx, cy = int(xs.mean()), int(ys.mean())
    hx, hy = int(half_mm[0] / VOXEL_MM[0]), int(half_mm[1] / VOXEL_MM[1])
    return slice(max(cx - hx, 0), cx + hx), slice(max(cy - hy, 0), cy + hy)


def _contours(ax, mask: np.ndarray, labels, colours) -> None:
    for lab, colour in zip(labels, colours, strict=True):
        sel = (mask == lab).astype(float)
        if sel.any():
            ax.contour(sel.T, levels=[0.5], colors=[colour], linewidths=1.0, origin="lower")


def plot_pd_hc(path: str | Path, seed: int = 2048, effect: float = 1.0) -> Path:
    """Write the PD-vs-HC phantom figure (PNG) and return its path.

    Both subjects share ``seed`` (same anatomy and nuisance draws); only the class, and
    with it the latent severity and age, differs. Rows: HC, PD. Columns: whole QSM slice
    through the SN, NM and QSM zoomed on the midbrain with the mask contours. Images are
    shown in radiological view (subject right on the left), anterior up.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cases = [make_phantom_case(0, seed, "HC", effect), make_phantom_case(1, seed, "PD", effect)]
    z = _sn_slice(cases[0])
    win = _window(cases[0], z)
    aspect = VOXEL_MM[1] / VOXEL_MM[0]
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 8.4), constrained_layout=True)
    for row, case in enumerate(cases):
        lat = case.latents
        qsm = case.qsm[:, :, z]
        ax = axes[row, 0]
        im = ax.imshow(qsm.T, cmap="gray", vmin=-60, vmax=200, origin="lower", aspect=aspect)
        ax.add_patch(
            Rectangle(
                (win[0].start, win[1].start),
                win[0].stop - win[0].start,
                win[1].stop - win[1].start,
                fill=False,
                ec="yellow",
                lw=1,
            )
        )
        ax.set_title(f"{case.case_id}: QSM, slice z={z}")
        fig.colorbar(im, ax=ax, shrink=0.8, label="susceptibility (ppb)")
        ax = axes[row, 1]
        nm = case.nm[win[0], win[1], z]
        im = ax.imshow(nm.T, cmap="magma", vmin=2000, vmax=30000, origin="lower", aspect=aspect)
        _contours(ax, case.nm_mask[win[0], win[1], z], (1, 2), ("cyan", "lime"))
        ax.set_title(
            f"NM + NM_mask: severity {lat['severity']:.2f}\n"
            f"NM SN {lat['nm_sn_volume_mm3']:.0f} mm$^3$, contrast {lat['nm_sn_contrast']:.2f}",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, shrink=0.8, label="NM signal (a.u.)")
        ax = axes[row, 2]
        im = ax.imshow(
            case.qsm[win[0], win[1], z].T,
            cmap="gray",
            vmin=-60,
            vmax=200,
            origin="lower",
            aspect=aspect,
        )
        colours = [NUCLEUS_COLOURS[QSM_LABELS[lab].rsplit("_", 1)[0]] for lab in _MIDBRAIN]
        _contours(ax, case.qsm_mask[win[0], win[1], z], _MIDBRAIN, colours)
        sn = 0.5 * (lat["qsm_sn_mean_R"] + lat["qsm_sn_mean_L"])
        ax.set_title(
            f"QSM + QSM_mask STN/SN/RN\nSN mean {sn:.0f} ppb, age {lat['age']:.0f}", fontsize=9
        )
        fig.colorbar(im, ax=ax, shrink=0.8, label="susceptibility (ppb)")
        axes[row, 0].set_ylabel("HC" if case.label == 0 else "PD", fontsize=14)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, "R", color="w", transform=ax.transAxes, va="center")
        ax.text(0.97, 0.5, "L", color="w", transform=ax.transAxes, va="center")
    fig.suptitle(
        "Phantom HC vs PD (same anatomy seed): axial slice through the SN, "
        "radiological view, anterior up",
        fontsize=12,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
