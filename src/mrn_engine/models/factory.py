"""``build_model``: the network a :class:`RunConfig` describes, plus the trainer's helpers."""

from __future__ import annotations

from mrn_engine.config import ModelConfig, RoiConfig, RunConfig, TrainConfig
from mrn_engine.errors import ConfigError, WeightsError
from mrn_engine.models.anatcl3d import AnatCL3D, load_trunk_weights
from mrn_engine.models.backbone import tiny_kwargs
from mrn_engine.models.moco import MSupMoCo, PlainStep
from mrn_engine.models.mrn import MRN
from mrn_engine.models.multiroi import MultiRoiClassifier
from mrn_engine.models.seres import SERes10
from mrn_engine.models.weights import load_backbone_weights

ARCHS = ("mrn", "seres10", "anatcl3d")


def _split(
    cfg: RunConfig | ModelConfig, roi_cfg: RoiConfig | None
) -> tuple[ModelConfig, RoiConfig]:
    if isinstance(cfg, RunConfig):
        return cfg.model, roi_cfg or cfg.roi
    if roi_cfg is None:
        raise ConfigError("build_model(ModelConfig, RoiConfig): the RoiConfig is required")
    return cfg, roi_cfg


def build_model(
    cfg: RunConfig | ModelConfig, roi_cfg: RoiConfig | None = None, *, pretrained: bool = True
) -> MultiRoiClassifier:
    """Build MRN (``model.arch="mrn"``), the SERes10 baseline (``"seres10"``) or AnatCL's 3D
    ResNet-18 baseline (``"anatcl3d"``, its trunk from ``model.backbone_weights`` if given).

    Parameters
    ----------
    cfg: a :class:`RunConfig` (or a :class:`ModelConfig` together with ``roi_cfg``).
    pretrained: load ``model.backbone_weights`` (training). A DINOv2 preset without weights
        is refused unless ``model.allow_random_init``. Pass ``False`` when the weights come
        from a checkpoint right after (inference, :func:`load_model`).

    Raises
    ------
    WeightsError: pretrained backbone without weights, or bad weights file.
    ConfigError: unknown architecture / inconsistent sizes.
    """
    model_cfg, roi = _split(cfg, roi_cfg)
    if model_cfg.arch == "seres10":
        return SERes10(model_cfg, roi)
    if model_cfg.arch == "anatcl3d":
        net = AnatCL3D(model_cfg, roi)
        if pretrained and model_cfg.backbone_weights:
            net.weights_provenance = load_trunk_weights(net.trunk, model_cfg.backbone_weights)
        return net
    if model_cfg.arch != "mrn":
        raise ConfigError(f"unknown model.arch {model_cfg.arch!r}; choose one of {ARCHS}")
    model = MRN(model_cfg, roi)
    if not pretrained:
        return model
    if model_cfg.backbone_weights:
        vit = model.res.patchnizer.vit
        model.weights_provenance = load_backbone_weights(
            vit, model_cfg.backbone_weights, model_cfg.backbone
        )
    elif tiny_kwargs(model_cfg.backbone) is None and not model_cfg.allow_random_init:
        raise WeightsError(
            f"model.backbone {model_cfg.backbone!r} is a pretrained DINOv2 but no weights were given: "
            "pass a local file as model.backbone_weights (CLI: --weights PATH; timm/HF .safetensors or "
            "Meta's dinov2_vit*14_reg4_pretrain.pth), or set model.allow_random_init=true to train "
            "from random initialisation (much worse)"
        )
    else:
        model.weights_provenance = {
            "backbone": model_cfg.backbone,
            "path": None,
            "sha256": None,
            "format": "random-init",
        }
    return model


def build_training_wrapper(
    model: MultiRoiClassifier, cfg: RunConfig | ModelConfig
) -> MSupMoCo | PlainStep:
    """``MSupMoCo(model)`` when ``model.use_moco`` else ``PlainStep(model)``; both have ``step(batch)``."""
    model_cfg = cfg.model if isinstance(cfg, RunConfig) else cfg
    return MSupMoCo(model, model_cfg) if model_cfg.use_moco else PlainStep(model)


def param_groups(
    wrapper: MSupMoCo | PlainStep | MultiRoiClassifier, train_cfg: TrainConfig
) -> list[dict]:
    """AdamW parameter groups (paper 4.1.2): DINOv2/FFA/SFA at ``lr_backbone``/``wd_backbone``;
    DPT, classification and contrastive heads at ``lr_head``/``wd_head``."""
    groups = wrapper.lr_groups()
    return [
        {
            "name": "backbone",
            "params": groups["backbone"],
            "lr": train_cfg.lr_backbone,
            "weight_decay": train_cfg.wd_backbone,
        },
        {
            "name": "head",
            "params": groups["head"],
            "lr": train_cfg.lr_head,
            "weight_decay": train_cfg.wd_head,
        },
    ]
