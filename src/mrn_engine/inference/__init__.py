"""Inference: model bundles, the fold-ensemble + TTA predictor, ROI masking, submission writer."""

from mrn_engine.inference.bundle import ModelBundle, open_bundle, read_oof
from mrn_engine.inference.device import resolve_device
from mrn_engine.inference.predictor import CasePrediction, MRNPredictor, Segmenter
from mrn_engine.inference.submission import (
    SubmissionResult,
    iter_predictions,
    predict_cases,
    write_case_outputs,
)

__all__ = [
    "CasePrediction",
    "MRNPredictor",
    "ModelBundle",
    "Segmenter",
    "SubmissionResult",
    "iter_predictions",
    "open_bundle",
    "predict_cases",
    "read_oof",
    "resolve_device",
    "write_case_outputs",
]
