"""Inference: the fold-ensemble + TTA predictor, mask sources, ROI masking, submission writer.

The bundle helpers (``open_bundle``, ``read_oof``, demo-bundle record) live in
``mrn_engine.bundle`` and are re-exported here for callers of the older API.
"""

from mrn_engine.bundle import (
    ModelBundle,
    demo_record_path,
    last_demo_bundle,
    open_bundle,
    read_oof,
    record_demo_bundle,
)
from mrn_engine.inference.cohort import Shard, default_workers, parse_shard
from mrn_engine.inference.evidence import CaseEvidence, case_evidence, evidence_volume
from mrn_engine.inference.mask_source import MaskSource, Segmenter
from mrn_engine.inference.masking import RoiMasker
from mrn_engine.inference.merge import merge_shards
from mrn_engine.inference.predictor import CasePrediction, MRNPredictor
from mrn_engine.inference.submission import (
    SubmissionResult,
    iter_predictions,
    predict_cases,
    write_case_outputs,
    write_pd_pred,
)
from mrn_engine.inference.timing import stage_line
from mrn_engine.models.evidence import supports_slice_evidence
from mrn_engine.results import Probabilities
from mrn_engine.runtime import resolve_device

__all__ = [
    "CaseEvidence",
    "CasePrediction",
    "MRNPredictor",
    "MaskSource",
    "ModelBundle",
    "Probabilities",
    "RoiMasker",
    "Segmenter",
    "Shard",
    "case_evidence",
    "evidence_volume",
    "SubmissionResult",
    "default_workers",
    "demo_record_path",
    "iter_predictions",
    "last_demo_bundle",
    "merge_shards",
    "open_bundle",
    "parse_shard",
    "predict_cases",
    "read_oof",
    "record_demo_bundle",
    "resolve_device",
    "stage_line",
    "supports_slice_evidence",
    "write_case_outputs",
    "write_pd_pred",
]
