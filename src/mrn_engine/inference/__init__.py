"""Inference: model bundles, the fold-ensemble + TTA predictor, ROI masking, submission writer."""

from mrn_engine.inference.bundle import (
    ModelBundle,
    demo_record_path,
    last_demo_bundle,
    open_bundle,
    read_oof,
    record_demo_bundle,
)
from mrn_engine.inference.device import resolve_device
from mrn_engine.inference.evidence import CaseEvidence, case_evidence, evidence_volume
from mrn_engine.inference.predictor import CasePrediction, MRNPredictor, Segmenter
from mrn_engine.inference.submission import (
    SubmissionResult,
    iter_predictions,
    predict_cases,
    write_case_outputs,
    write_pd_pred,
)

__all__ = [
    "CaseEvidence",
    "CasePrediction",
    "MRNPredictor",
    "ModelBundle",
    "Segmenter",
    "case_evidence",
    "demo_record_path",
    "evidence_volume",
    "last_demo_bundle",
    "record_demo_bundle",
    "SubmissionResult",
    "iter_predictions",
    "open_bundle",
    "predict_cases",
    "read_oof",
    "resolve_device",
    "write_case_outputs",
    "write_pd_pred",
]
