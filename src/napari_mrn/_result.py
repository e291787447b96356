"""The panel's result view: P(PD) text and chart, the uncertainty flag and calibration line,
the per-slice evidence plot, one checkbox per ROI, the masking table, Save."""

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
from mrn_engine.inference import CaseEvidence
from mrn_engine.inference.uncertainty import FOLD_SPREAD, MARGIN, TTA_SPREAD, Uncertainty
from mrn_engine.results import THRESHOLD, Probabilities
from napari_mrn._chart import ProbabilityChart
from napari_mrn._evidence import SliceEvidencePlot
from napari_mrn._layers import ROI_COLOURS

CALL_COLOURS: dict[int, str] = {1: "#ff6b6b", 0: "#6bb5ff"}
FLAG_COLOURS: dict[bool, str] = {True: "#ffb000", False: "#7bd88f"}  #: uncertain / confident
UNCALIBRATED = "uncalibrated bundle (trained before calibration; run `mrn calibrate BUNDLE`)"
NO_EVIDENCE = "No per-slice evidence: the model has no MRN slice tokens (baseline)."
#: shown under the slice plot when the bundle has no healthy reference (trained before it)
LEAVE_OUT_EVIDENCE = (
    "Evidence leaves each slice out (this bundle has no healthy reference; add it with "
    "`mrn calibrate BUNDLE --reference-cases ROOT`)."
)


def uncertainty_text(u: Uncertainty) -> str:
    """The flag and the rule's numbers behind it (``inference.uncertainty``), as rich text."""
    checks = [
        (
            "near-threshold",
            f"|P(PD) - {THRESHOLD:g}| = {u.distance:.3f}",
            "&lt;" if u.distance < MARGIN else "&ge;",
            MARGIN,
        ),
        (
            "fold-spread",
            f"fold std {u.fold_spread:.3f}",
            "&gt;" if u.fold_spread > FOLD_SPREAD else "&le;",
            FOLD_SPREAD,
        ),
    ]
    if u.tta_spread is not None:
        sign = "&gt;" if u.tta_spread > TTA_SPREAD else "&le;"
        checks.append(("tta-spread", f"mirror spread {u.tta_spread:.3f}", sign, TTA_SPREAD))
    shown = [c for c in checks if c[0] in u.reasons] if u.uncertain else checks
    detail = "; ".join(f"{what} {sign} {limit:.2f}" for _, what, sign, limit in shown)
    word = "uncertain" if u.uncertain else "confident"
    reasons = f" ({', '.join(u.reasons)})" if u.uncertain else ""
    return f"<b style='color:{FLAG_COLOURS[u.uncertain]}'>{word}</b>{reasons}: {detail}"


def calibration_text(calibrated: bool, raw_p_pd: float | None, site: str | None = None) -> str:
    """Whether P(PD) is calibrated (the raw full-model value when it is) and site-adapted."""
    adapted = f"; site-adapted to {site} (mrn site-adapt)" if site else ""
    if not calibrated:
        return UNCALIBRATED + adapted
    raw = f" (raw model output {raw_p_pd:.3f})" if raw_p_pd is not None else ""
    return f"P(PD) calibrated{raw}{adapted}"


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
        self.flag_label = QLabel("")
        self.flag_label.setWordWrap(True)
        self.flag_label.setTextFormat(Qt.TextFormat.RichText)
        rlay.addWidget(self.flag_label)
        self.calibration_label = QLabel("")
        self.calibration_label.setWordWrap(True)
        rlay.addWidget(self.calibration_label)
        self.chart = ProbabilityChart(result)
        rlay.addWidget(self.chart)
        root.addWidget(result)

        evidence = QGroupBox("Per-slice evidence (red: towards PD, blue: towards HC)", self)
        elay = QVBoxLayout(evidence)
        self.evidence_plot = SliceEvidencePlot(evidence)
        self.evidence_plot.setMinimumHeight(130)  # small: the P(PD) chart keeps its room
        self.evidence_plot.setMaximumHeight(140)
        elay.addWidget(self.evidence_plot)
        self.evidence_note = QLabel("")
        self.evidence_note.setWordWrap(True)
        self.evidence_note.setVisible(False)
        elay.addWidget(self.evidence_note)
        root.addWidget(evidence)

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

    def show_assessment(
        self, flag: Uncertainty, calibrated: bool, raw_p_pd: float | None, site: str | None = None
    ) -> None:
        """The uncertainty flag with its reason and the calibration (and site) line."""
        self.flag_label.setText(uncertainty_text(flag))
        self.calibration_label.setText(calibration_text(calibrated, raw_p_pd, site))
        self.calibration_label.setStyleSheet("" if calibrated else "color: #ffb000")

    def show_evidence(self, evidence: CaseEvidence | None) -> None:
        """Redraw the per-slice plot (``None``: the model gives no evidence)."""
        self.evidence_plot.show_evidence(evidence)
        if evidence is None:
            note = NO_EVIDENCE
        else:
            note = LEAVE_OUT_EVIDENCE if evidence.method == "leave-out" else ""
            self.evidence_plot.setToolTip(evidence.definition)
        self.evidence_note.setText(note)
        self.evidence_note.setVisible(bool(note))
