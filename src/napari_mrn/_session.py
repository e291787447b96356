"""What the diagnosis panel holds, without Qt: the predictor, the last result, ROI masking, saving.

The dock widget is a view over one :class:`Session`. A run (:meth:`Session.run`) happens in a
worker thread and returns a :class:`RunResult`; the GUI thread hands it to
:meth:`Session.accept`. Everything after that (ROI toggles, the 16-subset table, saving) reads
the typed records of the engine (``CasePrediction``, ``Probabilities``, ``CaseEvidence``,
``Uncertainty``) only.

Per-slice evidence (``mrn_engine.inference.evidence``): for models with MRN slice tokens the
run keeps them (``keep_slice_tokens``) and computes the evidence of the full model in the
worker; each ROI toggle recomputes it for the masked set with head passes only (SFA + head on
the kept slice tokens, the masking cache's empty tokens): no backbone pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mrn_engine.data import Case
from mrn_engine.errors import MRNError
from mrn_engine.inference import (
    CaseEvidence,
    CasePrediction,
    MRNPredictor,
    case_evidence,
    supports_slice_evidence,
)
from mrn_engine.inference.uncertainty import Uncertainty, assess, assess_prediction
from mrn_engine.results import Probabilities
from napari_mrn._outputs import OutputVolume, output_volumes
from napari_mrn._save import save_result

#: share of the progress bar taken by loading the bundle (the rest is the prediction)
LOAD_SHARE = 0.02


class RunCancelled(MRNError):
    """The user pressed Cancel."""


class SessionBusy(RuntimeError):
    """A run is using the predictor: masking and saving wait until it is done."""


@dataclass(frozen=True)
class PredictorKey:
    """The model settings a predictor is made for (the cache key of :class:`Session`).

    Attributes
    ----------
    bundle: the model bundle folder.
    device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    folds: the folds to use (``None`` = all of the bundle's).
    tta: mirror test-time augmentation.
    """

    bundle: Path
    device: str = "auto"
    folds: tuple[int, ...] | None = None
    tta: bool = False
    site: Path | None = None  #: site harmonisation file (``mrn site-adapt``)


@dataclass(frozen=True)
class Progress:
    """One progress report of a run: ``fraction`` done in [0, 1] and what is happening."""

    fraction: float
    message: str


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class RunResult:
    """A finished run: the prediction and what it was made from."""

    key: PredictorKey
    predictor: MRNPredictor
    case: Case
    prediction: CasePrediction
    seconds: float
    evidence: CaseEvidence | None = None  #: of the full model (None: the model has none)


class Session:
    """The panel's state: a cached predictor, the shown result and its masked-ROI set."""

    def __init__(self) -> None:
        self._predictor: MRNPredictor | None = None
        self._key: PredictorKey | None = None
        self.result: RunResult | None = None
        self.masked: frozenset[str] = frozenset()
        self._shown: Probabilities | None = None
        self._table: list[Probabilities] | None = None
        self._evidence: CaseEvidence | None = None
        self._raw: Probabilities | None = None
        self.running = False

    # ------------------------------------------------------------------ running
    def predictor(self, key: PredictorKey) -> MRNPredictor:
        """The predictor for ``key``: the cached one when the settings are unchanged."""
        if self._predictor is None or self._key != key:
            folds = list(key.folds) if key.folds is not None else None
            self._predictor = MRNPredictor.from_bundle(
                key.bundle, device=key.device, folds=folds, tta=key.tta, site_adaptation=key.site
            )
            self._key = key
        return self._predictor

    def run(self, case: Case, key: PredictorKey, progress: ProgressFn | None = None) -> RunResult:
        """Predict ``case`` with the predictor for ``key`` (called in a worker thread).

        ``progress`` receives :class:`Progress` reports; raising in it (e.g.
        :class:`RunCancelled`) stops the run at the predictor's next report. The predictor also
        caches every fold's empty-ROI tokens (``warm_masking``), so that an ROI toggle
        afterwards runs only the classification head. The shown result is not touched: hand
        the returned :class:`RunResult` to :meth:`accept`.
        """
        report = progress or (lambda _p: None)
        self.running = True
        try:
            t0 = time.perf_counter()
            report(Progress(0.0, "Loading the model bundle"))
            predictor = self.predictor(key)
            report(Progress(LOAD_SHARE, f"Predicting {case.case_id}"))

            def scaled(fraction: float, message: str) -> None:
                report(Progress(LOAD_SHARE + (1.0 - LOAD_SHARE) * fraction, message))

            explain = supports_slice_evidence(predictor.model)
            pred = predictor.predict_case(
                case, progress=scaled, warm_masking=True, keep_slice_tokens=explain
            )
            evidence = case_evidence(predictor, pred) if explain else None
            return RunResult(key, predictor, case, pred, time.perf_counter() - t0, evidence)
        finally:
            self.running = False

    def accept(self, result: RunResult) -> Probabilities:
        """Show ``result``: all ROIs unmasked; returns its probabilities."""
        self.result = result
        self.masked = frozenset()
        self._table = None
        self._shown = result.prediction.probabilities
        self._evidence = result.evidence
        self._raw = result.prediction.raw or result.prediction.probabilities
        return self._shown

    # ------------------------------------------------------------------ masking
    def _ready(self) -> RunResult:
        if self.running:
            raise SessionBusy("a run is in progress: wait until it is done")
        if self.result is None:
            raise SessionBusy("nothing to show yet: run a prediction first")
        return self.result

    @property
    def probabilities(self) -> Probabilities | None:
        """P(PD) as shown: the full model, or with :attr:`masked` ROIs masked."""
        return self._shown

    @property
    def evidence(self) -> CaseEvidence | None:
        """Per-slice evidence for the shown masked set (None: no result, or a model without it)."""
        return self._evidence

    @property
    def uncertainty(self) -> Uncertainty | None:
        """The "uncertain" rule (``inference.uncertainty``) on the shown probabilities.

        The full model uses the run's TTA spread too; a masked model is judged on its ensemble
        and fold P(PD) only (its mirrored-view spread was not measured).
        """
        if self.result is None or self._shown is None:
            return None
        if not self._shown.masked:
            return assess_prediction(self.result.prediction)
        return assess(self._shown.p_pd, self._shown.p_pd_folds)

    @property
    def calibrated(self) -> bool | None:
        """Whether the shown P(PD) is calibrated (None: no result yet)."""
        return self.result.predictor.calibrated if self.result is not None else None

    @property
    def raw_probabilities(self) -> Probabilities | None:
        """The shown P(PD) before calibration (equal to :attr:`probabilities` when uncalibrated)."""
        return self._raw

    def set_masked(self, masked: Iterable[str]) -> Probabilities:
        """Mask the ROIs in ``masked`` (input replaced by an empty volume): head passes only."""
        result = self._ready()
        subset = frozenset(masked)
        pred, predictor = result.prediction, result.predictor
        if subset:  # = predictor.masked_prediction, keeping the raw values for the panel
            (raw,) = predictor.masker.probabilities(
                pred.case_id, pred.roi_tokens, pred.folds, [subset]
            )
            self._raw, self._shown = raw, predictor.calibrate(raw)
        else:
            self._raw = pred.raw or pred.probabilities
            self._shown = pred.probabilities
        if result.evidence is not None:
            self._evidence = (
                case_evidence(result.predictor, result.prediction, subset)
                if subset
                else result.evidence
            )
        self.masked = subset
        return self._shown

    def masking_table(self) -> list[Probabilities]:
        """P(PD) for all 16 ROI subsets of the shown result (the full model first)."""
        result = self._ready()
        if self._table is None:
            self._table = result.predictor.masking_table(result.prediction)
        return self._table

    # ------------------------------------------------------------------ outputs
    def outputs(self) -> list[OutputVolume]:
        """The shown result's output masks (layers and saved files alike)."""
        result = self._ready()
        return output_volumes(result.case, result.prediction)

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``folder/<case_id>/``: the output masks, ``PD_pred.txt`` and ``mrn_result.json``."""
        result = self._ready()
        shown = self._shown or result.prediction.probabilities
        return save_result(
            folder,
            result,
            shown=shown,
            table=self.masking_table(),
            outputs=self.outputs(),
            uncertainty=self.uncertainty,
            evidence=self._evidence,
        )
