"""Challenge-format data: label/ROI definitions, NIfTI volumes with geometry, cases and labels."""

from mrn_engine.data.cases import (
    Case,
    CaseFiles,
    case_table,
    check_duplicates,
    discover_cases,
    find_label_splits,
    find_labels,
    load_case,
    read_labels_csv,
)
from mrn_engine.data.labels import (
    NM_LABELS,
    NUCLEUS_COLOURS,
    QSM_LABELS,
    ROI_BY_NAME,
    ROI_NAMES,
    ROIS,
    RoiSpec,
)
from mrn_engine.data.nifti import (
    Volume,
    check_mask_labels,
    check_same_grid,
    load_volume,
    same_grid,
    save_volume,
)
from mrn_engine.data.roi_subsets import MASK_SUBSETS, ROI_SHORT, parse_subset_key, subset_key
from mrn_engine.runtime import file_sha256

__all__ = [
    "MASK_SUBSETS",
    "ROI_SHORT",
    "NM_LABELS",
    "NUCLEUS_COLOURS",
    "QSM_LABELS",
    "ROIS",
    "ROI_BY_NAME",
    "ROI_NAMES",
    "Case",
    "CaseFiles",
    "RoiSpec",
    "Volume",
    "case_table",
    "check_duplicates",
    "check_mask_labels",
    "check_same_grid",
    "discover_cases",
    "file_sha256",
    "find_label_splits",
    "find_labels",
    "load_case",
    "load_volume",
    "parse_subset_key",
    "read_labels_csv",
    "same_grid",
    "save_volume",
    "subset_key",
]
