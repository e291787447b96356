"""The panel's inputs: NM and QSM image layers and optional mask layers, checked for one grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari.layers import Image, Labels, Layer
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QLabel, QWidget

from mrn_engine.data import Case
from mrn_engine.errors import MRNError
from napari_mrn._case import case_from_layers, check_layers_grid

NONE_CHOICE = "(none)"
OPEN_A_CASE = "Open a case (File > Open, or File > Open Sample > MRN PD case)."


@dataclass(frozen=True)
class InputLayers:
    """The chosen layers (masks optional)."""

    nm: Layer | None
    qsm: Layer | None
    nm_mask: Layer | None
    qsm_mask: Layer | None


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of some types (optionally with a "(none)" entry)."""

    def __init__(
        self,
        viewer: Any,
        types: tuple[type, ...],
        *,
        optional: bool = False,
        prefer: tuple[str, ...] = (),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer, self.types, self.optional, self.prefer = viewer, types, optional, prefer
        self._user_chose = False
        self.activated.connect(self._on_user_choice)
        self.refresh()

    def _on_user_choice(self, *_: Any) -> None:
        self._user_chose = True

    def layers(self) -> list[Layer]:
        return [ly for ly in self.viewer.layers if isinstance(ly, self.types)]

    def refresh(self) -> None:
        """Re-list the layers. A choice the user made is kept while its layer exists; otherwise
        the preferred layer (by napari-mrn kind or name, e.g. ``QSM``) is chosen."""
        current = self.layer()
        self.blockSignals(True)
        self.clear()
        if self.optional:
            self.addItem(NONE_CHOICE, None)
        for ly in self.layers():
            self.addItem(ly.name, ly)
        self.blockSignals(False)
        keep = current is not None and current in self.layers()
        preferred = self._preferred()
        if keep and (self._user_chose or preferred is None or self._matches(current)):
            self.set_layer(current)
        elif preferred is not None:
            self.set_layer(preferred)
        elif self.optional:
            self.setCurrentIndex(0)

    def _matches(self, layer: Layer) -> bool:
        kind = (layer.metadata or {}).get("mrn_kind")
        return any(kind == w or layer.name == w for w in self.prefer)

    def _preferred(self) -> Layer | None:
        for want in self.prefer:
            for ly in self.layers():
                if (ly.metadata or {}).get("mrn_kind") == want or ly.name == want:
                    return ly
        return None

    def layer(self) -> Layer | None:
        return self.currentData() if self.count() else None

    def set_layer(self, layer: Layer | None) -> None:
        for i in range(self.count()):
            if self.itemData(i) is layer:
                self.setCurrentIndex(i)
                return


class InputsWidget(QGroupBox):
    """NM / QSM / mask layer choice; :attr:`changed` fires on any change, :attr:`message`
    shows why the choice cannot run (empty when it can)."""

    changed = Signal()

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__("Inputs", parent)
        self.viewer = viewer
        form = QFormLayout(self)
        self.nm_combo = LayerCombo(viewer, (Image,), prefer=("NM",))
        self.qsm_combo = LayerCombo(viewer, (Image,), prefer=("QSM",))
        self.nm_mask_combo = LayerCombo(viewer, (Labels,), optional=True, prefer=("NM_mask",))
        self.qsm_mask_combo = LayerCombo(viewer, (Labels,), optional=True, prefer=("QSM_mask",))
        form.addRow("NM image", self.nm_combo)
        form.addRow("QSM image", self.qsm_combo)
        form.addRow("NM mask", self.nm_mask_combo)
        form.addRow("QSM mask", self.qsm_mask_combo)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #ff6060")
        form.addRow(self.message)
        for combo in self._combos():
            combo.currentIndexChanged.connect(self._validate)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self.refresh)
        viewer.layers.events.inserted.connect(self._watch_name)
        for ly in viewer.layers:
            ly.events.name.connect(self.refresh)
        self.refresh()

    def _combos(self) -> tuple[LayerCombo, ...]:
        return (self.nm_combo, self.qsm_combo, self.nm_mask_combo, self.qsm_mask_combo)

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh)

    def refresh(self, *_: Any) -> None:
        """Re-list the viewer's layers in every combo box and re-check the choice."""
        for combo in self._combos():
            combo.refresh()
        self._validate()

    def layers(self) -> InputLayers:
        return InputLayers(
            nm=self.nm_combo.layer(),
            qsm=self.qsm_combo.layer(),
            nm_mask=self.nm_mask_combo.layer(),
            qsm_mask=self.qsm_mask_combo.layer(),
        )

    def problem(self) -> str:
        """Why the chosen layers cannot run ("" when they can)."""
        ly = self.layers()
        if ly.nm is None or ly.qsm is None:
            return OPEN_A_CASE
        if ly.nm is ly.qsm:
            return f"Layer '{ly.nm.name}' is chosen as both NM and QSM."
        try:
            check_layers_grid(ly.qsm, [ly.nm, ly.nm_mask, ly.qsm_mask])
        except MRNError as e:
            return str(e)
        return ""

    def _validate(self, *_: Any) -> None:
        self.message.setText(self.problem())
        self.changed.emit()

    def is_valid(self) -> bool:
        return not self.message.text()

    def case(self) -> Case:
        """The engine case of the chosen layers (raises ``MRNError`` with a clear message)."""
        ly = self.layers()
        return case_from_layers(ly.nm, ly.qsm, ly.nm_mask, ly.qsm_mask)
