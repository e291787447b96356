"""Shared fixtures: a small synthetic cohort in the exact challenge layout (built once per session).

Also the display probe: with no usable display (no DISPLAY and no Xvfb for pytest-xvfb to start,
or a Qt that cannot start on it) the GUI tests are skipped with :data:`NO_DISPLAY_REASON` instead
of Qt aborting the whole run. The probe runs after pytest-xvfb has started Xvfb, only when GUI
tests were collected, and never creates a Qt application in this process
(:func:`mrn_engine.doctor.qt_starts` uses a child process).
"""

from __future__ import annotations

import os

import pytest

from mrn_engine.doctor import NO_DISPLAY_REASON, display_status, qt_starts

os.environ.setdefault("OMP_NUM_THREADS", "2")

#: fixtures that create a Qt application (a test using one is a GUI test)
QT_FIXTURES = frozenset({"qapp", "qtbot", "make_napari_viewer", "make_napari_viewer_proxy"})
#: the probe's verdict once made: "" = a display is usable, else why the GUI tests are skipped
_gui_verdict: list[str] = []


def gui_skip_reason() -> str:
    """Probe once (after pytest-xvfb has started Xvfb in its pytest_configure, before any test
    runs): "" when the GUI tests can run, else the skip reason."""
    if not _gui_verdict:
        display = display_status()
        if display.status != "ok":
            _gui_verdict.append(NO_DISPLAY_REASON)
        else:
            ok, said = qt_starts()
            _gui_verdict.append("" if ok else f"{NO_DISPLAY_REASON} (Qt cannot start: {said})")
    return _gui_verdict[0]


def is_gui_test(item: pytest.Item) -> bool:
    """Marked ``gui`` (or in a module marked so), or uses a fixture that starts Qt."""
    return item.get_closest_marker("gui") is not None or bool(
        QT_FIXTURES & set(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the GUI tests when no display is usable (probed only if GUI tests were collected)."""
    gui = [item for item in items if is_gui_test(item)]
    if not gui or not gui_skip_reason():
        return
    skip = pytest.mark.skip(reason=gui_skip_reason())
    for item in gui:
        item.add_marker(skip)


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> str:
    if not _gui_verdict:
        return ""
    return "GUI tests: " + (f"skipped: {_gui_verdict[0]}" if _gui_verdict[0] else "run")


#: size of the shared test cohort (balanced PD/HC; train + val CSVs)
TEST_COHORT_SIZE = 8


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A deterministic 8-case phantom cohort written in the challenge layout."""
    from mrn_engine.phantom import generate_cohort

    out = tmp_path_factory.mktemp("phantom_cohort")
    generate_cohort(out, n=TEST_COHORT_SIZE, seed=123, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def unlabelled_cases(tmp_path_factory):
    """Six tiny synthetic cases, no label files at all (pretraining must not need them)."""
    from mrn_engine.badinput.cases import write_case

    root = tmp_path_factory.mktemp("unlabelled")
    for i in range(6):
        write_case(root / f"RJPD_{i:03d}", seed=i, pd=i % 2)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one torch thread is far faster than two oversubscribed ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
