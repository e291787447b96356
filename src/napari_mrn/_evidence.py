"""Per-slice evidence in napari: a diverging heat overlay inside each ROI box, and a slice plot.

The engine computes the evidence (``mrn_engine.inference.evidence``): for each ROI slice,
``P(PD) - P(PD with that slice left out of SFA)``; > 0 the slice pushes towards PD (red), < 0
towards HC (blue). It costs head passes only, so the panel recomputes it on every ROI toggle:

    pred = predictor.predict_case(case, keep_slice_tokens=True)
    ev = case_evidence(predictor, pred, masked)               # on each toggle
    viewer.add_layer(Layer.create(*evidence_layer(ev, pred.crops, case.qsm, "QSM")))
    plot.show_evidence(ev)

:func:`evidence_layer` is plain layer data on the case's grid (the same
:class:`~napari_mrn._display.DisplayMapping` as the case's image layers); a masked ROI has no
evidence (0, transparent). :class:`SliceEvidencePlot` draws one small bar chart per ROI.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mrn_engine.analysis import ROI_SHORT
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.inference import CaseEvidence, evidence_volume
from napari_mrn._display import DisplayMapping
from napari_mrn._layers import LayerDataTuple, _base_kwargs

PD_COLOUR = (0.839, 0.153, 0.157)  #: PD-ward (matches the probability chart)
HC_COLOUR = (0.122, 0.467, 0.706)  #: HC-ward
#: name of the overlay layer per modality
LAYER_NAMES: dict[str, str] = {"NM": "NM evidence", "QSM": "QSM evidence"}


def evidence_colormap() -> Any:
    """napari colormap: blue (HC-ward) -> transparent (0) -> red (PD-ward)."""
    from napari.utils.colormaps import Colormap

    return Colormap(
        colors=[(*HC_COLOUR, 0.6), (1.0, 1.0, 1.0, 0.0), (*PD_COLOUR, 0.6)],
        controls=[0.0, 0.5, 1.0],
        name="mrn_evidence",
    )


def evidence_limit(ev: CaseEvidence) -> float:
    """Symmetric contrast limit: the largest |evidence| of the case (at least 1e-6)."""
    return max(1e-6, max(float(np.abs(ev.evidence[n]).max()) for n in ROI_NAMES))


def evidence_data(
    ev: CaseEvidence, crops: dict[str, Any], volume: Any, modality: str
) -> np.ndarray:
    """Evidence of ``modality``'s ROIs on ``volume``'s grid, in napari display order."""
    mapping = DisplayMapping(volume.affine, volume.shape)
    return mapping.to_display(evidence_volume(ev, crops, modality, tuple(volume.shape)))


def evidence_layer(
    ev: CaseEvidence,
    crops: dict[str, Any],
    volume: Any,
    modality: str,
    *,
    name: str | None = None,
    limit: float | None = None,
) -> LayerDataTuple:
    """Image layer tuple of the evidence over ``volume`` (the case's NM or QSM Volume).

    ``limit``: symmetric contrast limit (default :func:`evidence_limit`), so that the colour of
    a value means the same on the NM and the QSM layer.
    """
    mapping = DisplayMapping(volume.affine, volume.shape)
    data = evidence_data(ev, crops, volume, modality)
    lim = float(limit if limit is not None else evidence_limit(ev))
    meta = {
        "case_id": ev.case_id,
        "mrn_kind": "evidence",
        "masked": sorted(ev.masked),
        "p_pd": ev.p_pd,
    }
    kwargs = _base_kwargs(mapping, name or LAYER_NAMES[modality], meta)
    kwargs.update(
        colormap=evidence_colormap(),
        contrast_limits=[-lim, lim],
        blending="translucent",
        opacity=0.7,
    )
    return data, kwargs, "image"


def _slice_plot_base() -> type:
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

    return FigureCanvasQTAgg


class SliceEvidencePlot(_slice_plot_base()):  # type: ignore[misc]
    """One small bar chart per ROI: evidence per slice (red PD-ward, blue HC-ward)."""

    def __init__(self, parent: Any = None) -> None:
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.4), dpi=100, facecolor="#262930", layout="constrained")
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(220)
        self.axes = {
            n: ax for n, ax in zip(ROI_NAMES, self.figure.subplots(1, len(ROI_NAMES)), strict=True)
        }
        self.bars: dict[str, list] = {}
        self.show_evidence(None)

    def show_evidence(self, ev: CaseEvidence | None) -> None:
        """Redraw for ``ev`` (``None`` = empty)."""
        lim = evidence_limit(ev) if ev is not None else 1.0
        self.bars = {}
        for i, (name, ax) in enumerate(self.axes.items()):
            ax.clear()
            ax.set_facecolor("#262930")
            for spine in ax.spines.values():
                spine.set_color("#aaaaaa")
            ax.tick_params(colors="#dddddd", labelsize=6, labelleft=i == 0)
            ax.axhline(0, color="#aaaaaa", lw=0.6)
            ax.set_ylim(-1.1 * lim, 1.1 * lim)
            title = ROI_SHORT.get(name, name)
            if ev is not None:
                e = ev.evidence[name]
                colours = [PD_COLOUR if v >= 0 else HC_COLOUR for v in e.tolist()]
                self.bars[name] = list(ax.bar(np.arange(len(e)), e, color=colours))
                z = ev.source_z[name]
                step = max(1, int(np.ceil(len(e) / 3)))  # at most 3 z labels: readable when narrow
                ticks = np.arange(0, len(e), step)
                ax.set_xticks(ticks, [str(z[t]) if z[t] >= 0 else "" for t in ticks])
                if name in ev.masked:
                    title += " (off)"
            else:
                ax.set_xticks([])
            ax.set_title(title, color="white", fontsize=7)
        self.axes[ROI_NAMES[0]].set_ylabel("ΔP(PD) per slice", color="#dddddd", fontsize=7)
        self.draw_idle()
