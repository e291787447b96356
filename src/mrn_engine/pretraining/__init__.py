"""Anatomy-aware (AnatCL) pretraining of the slice backbone on unlabelled cases (docs/pretraining.md)."""
