"""Orchestration on top of the engine: the demo, bundle evaluation, baseline comparison and
the ROI-masking ablation. Nothing below this package imports it; the CLI calls it."""

from mrn_engine.workflows.ablation import AblationResult, masking_markdown, run_masking_analysis
from mrn_engine.workflows.compare import (
    VARIANTS,
    compare_variants,
    comparison_markdown,
    variant_config,
)
from mrn_engine.workflows.demo import DEFAULT, QUICK, DemoSize, run_demo
from mrn_engine.workflows.evaluate import heldout_metrics, oof_metrics, pooled_oof, score_folder

__all__ = [
    "DEFAULT",
    "QUICK",
    "VARIANTS",
    "AblationResult",
    "DemoSize",
    "compare_variants",
    "comparison_markdown",
    "heldout_metrics",
    "masking_markdown",
    "oof_metrics",
    "pooled_oof",
    "run_demo",
    "run_masking_analysis",
    "score_folder",
    "variant_config",
]
