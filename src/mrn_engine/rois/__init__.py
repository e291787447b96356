"""rois."""
