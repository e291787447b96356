"""The run as a napari/superqt worker with a typed progress signal.

:class:`PredictionWorker` runs :meth:`Session.run` in Qt's thread pool. Each report of the
predictor's ``progress(fraction, message)`` callback becomes one ``progress`` signal carrying a
:class:`~napari_mrn._session.Progress`. :meth:`~superqt.utils.WorkerBase.quit` (Cancel) makes
the next report raise :class:`~napari_mrn._session.RunCancelled`, which ends the run with the
``errored`` signal.
"""

from __future__ import annotations

from napari.qt.threading import WorkerBase, WorkerBaseSignals
from qtpy.QtCore import Signal

from mrn_engine.data import Case
from napari_mrn._session import PredictorKey, Progress, RunCancelled, RunResult, Session


class PredictionSignals(WorkerBaseSignals):
    """The worker's signals: ``started``, ``returned``, ``errored``, ``warned``, ``finished``
    and ``progress`` (one :class:`Progress` per report)."""

    progress = Signal(object)


class PredictionWorker(WorkerBase[RunResult]):
    """Predict one case with the session's predictor for ``key`` off the GUI thread."""

    def __init__(self, session: Session, case: Case, key: PredictorKey) -> None:
        super().__init__(SignalsClass=PredictionSignals)
        self.session, self.case, self.key = session, case, key

    def _report(self, item: Progress) -> None:
        if self.abort_requested:
            raise RunCancelled(f"{self.case.case_id}: cancelled")
        self.signals.progress.emit(item)

    def work(self) -> RunResult:
        result = self.session.run(self.case, self.key, progress=self._report)
        if self.abort_requested:  # Cancel after the last report: no result either
            raise RunCancelled(f"{self.case.case_id}: cancelled")
        return result
