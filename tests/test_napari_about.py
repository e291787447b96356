"""The *MRN diagnostics* panel: the ``mrn doctor`` report inside napari (pytest-qt, Xvfb)."""

from __future__ import annotations

import importlib.metadata as md

import pytest

pytestmark = pytest.mark.gui


def test_diagnostics_panel_shows_the_doctor_report(
    make_napari_viewer, qtbot, monkeypatch, tmp_path
):
    monkeypatch.setenv("MRN_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mrn", "MRN diagnostics")
    text = widget.text.toPlainText()
    for section in ("versions:", "devices:", "threads:", "checks:"):
        assert section in text
    assert f"napari: {md.version('napari')}" in text
    assert f"torch: {md.version('torch')}" in text
    assert f"cache folder: {tmp_path / 'cache'}" in text
    assert "] GUI: running in napari:" in text and "platform" in text
    # the panel re-runs the checks: a cache folder that became a file is now a failure
    (tmp_path / "cache").write_text("not a folder")
    qtbot.mouseClick(widget.refresh_button, _left())
    text = widget.text.toPlainText()
    assert "[fail] cache folder:" in text and "is a file" in text and "->" in text
    qtbot.mouseClick(widget.copy_button, _left())
    from qtpy.QtWidgets import QApplication

    assert QApplication.clipboard().text() == text


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton
