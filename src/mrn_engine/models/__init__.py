"""The MRN network (paper 3.2-3.4), mSupMoCo, losses, offline DINOv2 weights, SERes10 baseline.

See ``docs/model-api.md`` for how a trainer and a predictor call these.
"""

from mrn_engine.models.checkpoint import load_model, save_model
from mrn_engine.models.factory import ARCHS, build_model, build_training_wrapper, param_groups
from mrn_engine.models.losses import compute_losses, weighted_seg_loss
from mrn_engine.models.moco import (
    CategoryMemoryBank,
    MSupMoCo,
    PlainStep,
    ProjectionHead,
    supervised_contrastive_loss,
)
from mrn_engine.models.mrn import MRN
from mrn_engine.models.multiroi import MultiRoiClassifier
from mrn_engine.models.outputs import MRNOutput
from mrn_engine.models.res import RES
from mrn_engine.models.seres import SERes10
from mrn_engine.models.weights import file_sha256, load_backbone_weights, read_state_dict

__all__ = [
    "ARCHS",
    "MRN",
    "RES",
    "CategoryMemoryBank",
    "MRNOutput",
    "MSupMoCo",
    "MultiRoiClassifier",
    "PlainStep",
    "ProjectionHead",
    "SERes10",
    "build_model",
    "build_training_wrapper",
    "compute_losses",
    "file_sha256",
    "load_backbone_weights",
    "load_model",
    "param_groups",
    "read_state_dict",
    "save_model",
    "supervised_contrastive_loss",
    "weighted_seg_loss",
]
