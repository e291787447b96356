"""Evaluation and analysis: metrics, the ROI-masking table (Table 4), HTML run reports.

The masking *run* (predict + tabulate) is ``mrn_engine.workflows.run_masking_analysis``.
"""

from mrn_engine.analysis.masking import TABLE_COLUMNS, masking_metrics
from mrn_engine.analysis.metrics import (
    THRESHOLD,
    BinaryMetrics,
    binary_metrics,
    ensemble_metrics,
    fold_metrics,
    roc_points,
)
from mrn_engine.analysis.report import write_report
from mrn_engine.data.roi_subsets import MASK_SUBSETS, ROI_SHORT, subset_key

__all__ = [
    "MASK_SUBSETS",
    "ROI_SHORT",
    "TABLE_COLUMNS",
    "THRESHOLD",
    "BinaryMetrics",
    "binary_metrics",
    "ensemble_metrics",
    "fold_metrics",
    "masking_metrics",
    "roc_points",
    "subset_key",
    "write_report",
]
