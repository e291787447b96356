"""A small bar chart of P(PD): one bar per fold and the ensemble with its spread (matplotlib in Qt)."""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QWidget

from mrn_engine.results import THRESHOLD, Probabilities, call_of

PD_COLOUR = "#d62728"
HC_COLOUR = "#1f77b4"


class ProbabilityChart(FigureCanvasQTAgg):
    """Bars of P(PD) per fold plus the ensemble (error bar = std across folds), threshold line."""

    def __init__(self, parent: QWidget | None = None) -> None:
        self.figure = Figure(figsize=(3.2, 2.1), dpi=100, facecolor="#262930", layout="constrained")
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(200)
        self.axes = self.figure.add_subplot(111)
        self.bars: list = []
        self.show_probabilities(None)

    def show_probabilities(self, probs: Probabilities | None) -> None:
        """Redraw for ``probs`` (``None`` = empty chart)."""
        ax = self.axes
        ax.clear()
        ax.set_facecolor("#262930")
        for spine in ax.spines.values():
            spine.set_color("#aaaaaa")
        ax.tick_params(colors="#dddddd", labelsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("P(PD)", color="#dddddd", fontsize=8)
        ax.axhline(THRESHOLD, color="#aaaaaa", lw=0.8, ls="--")
        self.bars = []
        if probs is not None:
            names = [f"f{k}" for k in probs.folds] + ["ensemble"]
            values = [*probs.p_pd_folds, probs.p_pd]
            colours = [PD_COLOUR if call_of(v) else HC_COLOUR for v in values]
            alphas = [0.55] * len(probs.p_pd_folds) + [1.0]
            x = list(range(len(values)))
            self.bars = list(ax.bar(x, values, color=colours))
            for bar, a in zip(self.bars, alphas, strict=True):
                bar.set_alpha(a)
            ax.errorbar(
                [x[-1]], [probs.p_pd], yerr=[probs.p_pd_std], color="white", capsize=4, lw=1.2
            )
            ax.set_xticks(x, names)
            title = f"P(PD) = {probs.p_pd:.2f} -> {probs.call_name}"
            if probs.masked:
                title += f"  (masked: {len(probs.masked)})"
            ax.set_title(title, color="white", fontsize=8)
        else:
            ax.set_xticks([])
        self.draw_idle()
