"""nnU-Net v2 nucleus segmentation: dataset export, training, in-process prediction, scores.

``mrn seg export | train | predict | evaluate``. nnU-Net is imported lazily (only when a job
needs it); its paths are set per call inside a workspace (:mod:`.env`).
"""

from mrn_engine.segmentation.evaluate import evaluate_folders
from mrn_engine.segmentation.export import (
    DatasetSpec,
    dataset_json,
    default_specs,
    export_dataset,
    export_datasets,
)
from mrn_engine.segmentation.metrics import (
    LabelScore,
    case_summary,
    dice,
    hausdorff95,
    label_scores,
    region_score,
)
from mrn_engine.segmentation.predict import (
    MaskProblem,
    NNUNetSegmenter,
    SegmentationError,
    find_nnunet_dir,
    mask_pair_problems,
)
from mrn_engine.segmentation.train import SegTrainConfig, train_segmentation

__all__ = [
    "DatasetSpec",
    "LabelScore",
    "MaskProblem",
    "NNUNetSegmenter",
    "SegTrainConfig",
    "SegmentationError",
    "case_summary",
    "dataset_json",
    "default_specs",
    "dice",
    "evaluate_folders",
    "export_dataset",
    "export_datasets",
    "find_nnunet_dir",
    "hausdorff95",
    "label_scores",
    "mask_pair_problems",
    "region_score",
    "train_segmentation",
]
