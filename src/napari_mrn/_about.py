"""*MRN diagnostics*: the ``mrn doctor`` report inside napari (About / diagnostics box).

The same versions, devices, threads and checks as ``mrn doctor`` (from
:func:`mrn_engine.doctor.run_doctor`), plus what only the running GUI knows: the Qt binding and
version, and the Qt platform in use. A screenshot of this panel is a complete bug report;
*Copy report* puts the text on the clipboard.

Screenshot for the docs (on a server under ``xvfb-run -a``)::

    python -m napari_mrn._about --out docs/img/napari_diagnostics.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qtpy import API_NAME, QT_VERSION
from qtpy.QtGui import QFontDatabase
from qtpy.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from mrn_engine.doctor import Check, format_report, run_doctor

TITLE = "MRN diagnostics (the same as `mrn doctor`): paste or screenshot this into a bug report."


def gui_check() -> Check:
    """What the running napari knows: Qt binding, Qt version, platform plugin."""
    app = QApplication.instance()
    platform_name = app.platformName() if app is not None else "no QApplication"
    return Check(
        "GUI", "ok", f"running in napari: {API_NAME}, Qt {QT_VERSION}, platform {platform_name}"
    )


def diagnostics_text(out: Path | None = None) -> str:
    """The doctor report (no Qt child process: Qt is evidently running) + the live GUI line."""
    report = run_doctor(out, try_qt=False)
    report.checks.append(gui_check())
    return format_report(report)


class MRNAboutWidget(QWidget):
    """Read-only report with *Refresh* and *Copy report* buttons."""

    def __init__(self, napari_viewer=None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.text = QPlainTextEdit(self)
        self.text.setReadOnly(True)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.refresh_button = QPushButton("Refresh", self)
        self.copy_button = QPushButton("Copy report", self)
        self.refresh_button.clicked.connect(self.refresh)
        self.copy_button.clicked.connect(self.copy)
        buttons = QHBoxLayout()
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(self.copy_button)
        buttons.addStretch(1)
        title = QLabel(TITLE, self)
        title.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(self.text)
        layout.addLayout(buttons)
        self.setMinimumWidth(640)
        self.refresh()

    def refresh(self) -> None:
        """Run the checks again (the cache/output folders are checked in the current folder)."""
        self.text.setPlainText(diagnostics_text())

    def copy(self) -> None:
        QApplication.clipboard().setText(self.text.toPlainText())


def _screenshot(out: Path, size: tuple[int, int] = (1700, 1000)) -> None:
    """Open napari with the diagnostics panel docked and save a window screenshot."""
    import imageio.v3 as iio
    import napari

    from napari_mrn._compat import guard_triton

    guard_triton()
    viewer = napari.Viewer(title="napari-mrn")
    viewer.window.resize(*size)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mrn", "MRN diagnostics")
    app = QApplication.instance()
    for _ in range(50):
        app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out, viewer.screenshot(canvas_only=False, flash=False))
    print(widget.text.toPlainText())
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot of the MRN diagnostics panel.")
    parser.add_argument("--out", type=Path, default=Path("docs/img/napari_diagnostics.png"))
    _screenshot(parser.parse_args().out)


if __name__ == "__main__":
    main()
