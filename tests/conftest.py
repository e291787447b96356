"""Shared fixtures: a small synthetic cohort in the exact challenge layout (built once per session).

Also the display probe: with no usable display (no DISPLAY and no Xvfb for pytest-xvfb to start,
or a Qt that cannot start on it) the GUI tests are skipped with :data:`NO_DISPLAY_REASON` instead
of Qt aborting the whole run. The probe runs after pytest-xvfb has started Xvfb and never creates
a Qt application in this process (:func:`mrn_engine.doctor.qt_starts` uses a child process).
"""

from __future__ import annotations

import os

import pytest

from mrn_engine.doctor import NO_DISPLAY_REASON, display_status, qt_starts

os.environ.setdefault("OMP_NUM_THREADS", "2")

#: fixtures that create a Qt application (a test using one is a GUI test)
QT_FIXTURES = frozenset({"qapp", "qtbot", "make_napari_viewer", "make_napari_viewer_proxy"})
#: set by :func:`pytest_configure`: None = a display is usable, else why the GUI tests skip
_gui_skip_reason: str | None = None


@pytest.hookimpl(trylast=True)  # after pytest-xvfb's pytest_configure has started Xvfb
def pytest_configure(config: pytest.Config) -> None:
    """Decide once, before any test creates a QApplication, whether the GUI tests can run."""
    global _gui_skip_reason
    display = display_status()
    if display.status == "ok":
        ok, said = qt_starts()
        _gui_skip_reason = None if ok else f"{NO_DISPLAY_REASON} (Qt cannot start: {said})"
    else:
        _gui_skip_reason = NO_DISPLAY_REASON


def pytest_report_header(config: pytest.Config) -> str:
    return f"GUI tests: {'run' if _gui_skip_reason is None else 'skipped: ' + _gui_skip_reason}"


def is_gui_test(item: pytest.Item) -> bool:
    """Marked ``gui`` (or in a module marked so), or uses a fixture that starts Qt."""
    return item.get_closest_marker("gui") is not None or bool(
        QT_FIXTURES & set(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gui_skip_reason is None:
        return
    skip = pytest.mark.skip(reason=_gui_skip_reason)
    for item in items:
        if is_gui_test(item):
            item.add_marker(skip)


#: size of the shared test cohort (balanced PD/HC; train + val CSVs)
TEST_COHORT_SIZE = 8


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A deterministic 8-case phantom cohort written in the challenge layout."""
    from mrn_engine.phantom import generate_cohort

    out = tmp_path_factory.mktemp("phantom_cohort")
    generate_cohort(out, n=TEST_COHORT_SIZE, seed=123, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one torch thread is far faster than two oversubscribed ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
