"""The panel's result view: P(PD) text and chart, one checkbox per ROI, the masking table, Save."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QDialog,
    QGroupBox,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.results import Probabilities
from napari_mrn._chart import ProbabilityChart
from napari_mrn._layers import ROI_COLOURS

CALL_COLOURS: dict[int, str] = {1: "#ff6b6b", 0: "#6bb5ff"}


def masked_titles(probs: Probabilities) -> str:
    """The masked ROIs' titles in ROI order (``""`` for the full model)."""
    return ", ".join(ROI_BY_NAME[m].title for m in probs.masked_names)


def probabilities_html(probs: Probabilities) -> str:
    """The result text: the call, P(PD) +- spread, each fold and the masked ROIs."""
    folds = ", ".join(f"{p:.2f}" for p in probs.p_pd_folds)
    text = (
        f"<b style='font-size:14pt; color:{CALL_COLOURS[probs.call]}'>{probs.call_name}</b>"
        f" &nbsp; P(PD) = <b>{probs.p_pd:.3f}</b> &plusmn; {probs.p_pd_std:.3f} "
        f"(spread across {len(probs.p_pd_folds)} folds)<br>folds: {folds}"
    )
    if probs.masked:
        text += f"<br><i>masked: {masked_titles(probs)}</i>"
    return text


class MaskingTableDialog(QDialog):
    """All 16 ROI subsets: masked ROIs, ensemble P(PD) +- std, the call and each fold's P(PD)."""

    def __init__(self, rows: Sequence[Probabilities], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("MRN ROI masking table")
        folds = rows[0].folds if rows else ()
        headers = ["masked ROIs", "P(PD)", "std", "call"] + [f"fold {k}" for k in folds]
        self.table = QTableWidget(len(rows), len(headers), self)
        self.table.setHorizontalHeaderLabels(headers)
        for i, row in enumerate(rows):
            cells = [
                masked_titles(row) or "none (full model)",
                f"{row.p_pd:.3f}",
                f"{row.p_pd_std:.3f}",
                row.call_name,
                *(f"{p:.3f}" for p in row.p_pd_folds),
            ]
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                self.table.setItem(i, j, item)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("P(PD) with each subset of ROIs replaced by an empty volume"))
        layout.addWidget(self.table)
        self.resize(760, 640)


class ResultWidget(QWidget):
    """P(PD) of the shown result and its controls.

    Signals: :attr:`masking_changed` (an ROI box was toggled), :attr:`table_requested`,
    :attr:`save_requested`. The controls start disabled (:meth:`set_enabled`).
    """

    masking_changed = Signal()
    table_requested = Signal()
    save_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        result = QGroupBox("Result", self)
        rlay = QVBoxLayout(result)
        self.label = QLabel("No result yet.")
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        rlay.addWidget(self.label)
        self.chart = ProbabilityChart(result)
        rlay.addWidget(self.chart)
        root.addWidget(result)

        masking = QGroupBox("ROI masking (untick to hide an ROI)", self)
        mlay = QVBoxLayout(masking)
        self.roi_checks: dict[str, QCheckBox] = {}
        for name in ROI_NAMES:
            box = QCheckBox(ROI_BY_NAME[name].title)
            box.setChecked(True)
            r, g, b = (int(255 * c) for c in ROI_COLOURS[name])
            box.setStyleSheet(f"QCheckBox {{ color: rgb({r},{g},{b}); }}")
            box.toggled.connect(self.masking_changed)
            self.roi_checks[name] = box
            mlay.addWidget(box)
        self.table_button = QPushButton("Masking table (all 16 subsets)...")
        self.table_button.clicked.connect(self.table_requested)
        mlay.addWidget(self.table_button)
        root.addWidget(masking)

        self.save_button = QPushButton("Save results...")
        self.save_button.clicked.connect(self.save_requested)
        root.addWidget(self.save_button)
        self.set_enabled(False)

    def controls(self) -> list[QWidget]:
        """The controls that use the shown result: ROI boxes, table, Save."""
        return [*self.roi_checks.values(), self.table_button, self.save_button]

    def set_enabled(self, enabled: bool) -> None:
        for w in self.controls():
            w.setEnabled(enabled)

    def masked(self) -> frozenset[str]:
        """The unticked ROIs."""
        return frozenset(n for n, box in self.roi_checks.items() if not box.isChecked())

    def reset_masking(self) -> None:
        """Tick every ROI box (without a :attr:`masking_changed`)."""
        for box in self.roi_checks.values():
            box.blockSignals(True)
            box.setChecked(True)
            box.blockSignals(False)

    def show_probabilities(self, probs: Probabilities) -> None:
        self.label.setText(probabilities_html(probs))
        self.chart.show_probabilities(probs)
