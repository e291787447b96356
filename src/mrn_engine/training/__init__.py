"""Training: k-fold splits, ROI-stack datasets and augmentation, the epoch loop with
checkpoints/resume and k-fold model bundles (the demo and the comparison: ``workflows``)."""

from mrn_engine.training.augment import RoiAugmenter, build_roi_transform
from mrn_engine.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
    save_state_dict,
)
from mrn_engine.training.cv import (
    LabelledCohort,
    load_labelled_cohort,
    prepare_bundle,
    train_bundle,
)
from mrn_engine.training.dataset import RoiStackDataset, make_loader
from mrn_engine.training.objective import MRNObjective
from mrn_engine.training.optim import build_optimizer, parameter_groups
from mrn_engine.training.splits import Fold, make_folds, warn_split_duplicates
from mrn_engine.training.trainer import FoldResult, predict_dataset, train_fold

__all__ = [
    "Fold",
    "FoldResult",
    "LabelledCohort",
    "MRNObjective",
    "RoiAugmenter",
    "RoiStackDataset",
    "build_optimizer",
    "build_roi_transform",
    "latest_checkpoint",
    "load_checkpoint",
    "load_labelled_cohort",
    "load_state_dict",
    "make_folds",
    "make_loader",
    "parameter_groups",
    "predict_dataset",
    "prepare_bundle",
    "save_checkpoint",
    "save_state_dict",
    "train_bundle",
    "train_fold",
    "warn_split_duplicates",
]
