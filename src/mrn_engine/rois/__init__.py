"""ROI preprocessing: crop boxes, slice stacks, intensity mapping, paste-back, on-disk cache."""

from mrn_engine.rois.batch import stack_rois
from mrn_engine.rois.boxes import CropBox, label_box, margin_voxels, roi_box
from mrn_engine.rois.cache import RoiCache, config_hash, default_cache_dir
from mrn_engine.rois.extract import (
    RoiCrop,
    check_roi_labels,
    crop_roi,
    extract_rois,
    modality_mapping,
    paste_back,
    paste_back_all,
)
from mrn_engine.rois.intensity import (
    IntensityMapping,
    apply_window,
    intensity_window,
    nm_reference_region,
    qsm_to_ppm_factor,
)

__all__ = [
    "CropBox",
    "IntensityMapping",
    "RoiCache",
    "RoiCrop",
    "apply_window",
    "check_roi_labels",
    "config_hash",
    "crop_roi",
    "default_cache_dir",
    "extract_rois",
    "intensity_window",
    "label_box",
    "margin_voxels",
    "modality_mapping",
    "nm_reference_region",
    "qsm_to_ppm_factor",
    "paste_back",
    "paste_back_all",
    "roi_box",
    "stack_rois",
]
