"""mrn_engine: the headless MRN engine (data, ROIs, models, training, inference, CLI).

It never imports napari or Qt.
"""

from .config import ModelConfig, RoiConfig, RunConfig, TrainConfig, get_preset
from .data.labels import ROI_BY_NAME, ROI_NAMES, ROIS, RoiSpec
from .errors import ConfigError, InputDataError, MRNError, WeightsError

__version__ = "0.1.0"

__all__ = [
    "ROIS",
    "ROI_BY_NAME",
    "ROI_NAMES",
    "ConfigError",
    "InputDataError",
    "MRNError",
    "ModelConfig",
    "RoiConfig",
    "RoiSpec",
    "RunConfig",
    "TrainConfig",
    "WeightsError",
    "get_preset",
]
