"""Evaluation and analysis: metrics, ROI masking (Table 4), HTML run reports."""

from mrn_engine.analysis.ablation import AblationResult, masking_markdown, run_masking_analysis
from mrn_engine.analysis.masking import MASK_SUBSETS, ROI_SHORT, masking_metrics, subset_key
from mrn_engine.analysis.metrics import (
    BinaryMetrics,
    binary_metrics,
    ensemble_metrics,
    fold_metrics,
    roc_points,
)
from mrn_engine.analysis.report import write_report

__all__ = [
    "MASK_SUBSETS",
    "ROI_SHORT",
    "AblationResult",
    "BinaryMetrics",
    "binary_metrics",
    "ensemble_metrics",
    "fold_metrics",
    "masking_markdown",
    "masking_metrics",
    "roc_points",
    "run_masking_analysis",
    "subset_key",
    "write_report",
]
