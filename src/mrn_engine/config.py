"""The one configuration object of a model and a run (dataclasses, saved as JSON).

``RunConfig`` nests ``RoiConfig`` (preprocessing), ``ModelConfig`` (network) and
``TrainConfig`` (optimisation, CV). It is written beside every checkpoint and every output
(``config.json``) and read back exactly with :func:`RunConfig.load`.

Presets (like timm's pretrained configs) are named, complete configurations:
``paper-vitb`` (the MRN paper's values), ``vits`` and ``cpu-tiny`` (trains in minutes on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mrn_engine.config_check import validate_section
from mrn_engine.errors import ConfigError
from mrn_engine.fileio import make_temp_file


@dataclass
class RoiConfig:
    """How the four ROIs are cropped and turned into slice stacks (paper 3.3)."""

    image_size: int = 224  #: square in-plane size; longest side resized to this, then padded
    slices: dict[str, int] = field(
        default_factory=lambda: {"nm_sn": 8, "qsm_bg": 16, "qsm_midbrain": 8, "qsm_dentate": 8}
    )  #: fixed number of axial slices per ROI (how: ``slice_policy``)
    margin_mm: float = 4.0  #: margin around the union of the ROI's labels, in millimetres
    nm_clip_percentiles: tuple[float, float] = (0.5, 99.5)  #: robust NM window (whole volume)
    qsm_clip_percentiles: tuple[float, float] = (0.5, 99.5)  #: robust signed QSM window (brain)
    #: window = scale x percentiles (about 0, sign kept): the nuclei (NM SN, QSM iron) are
    #: <0.1% of voxels and lie beyond whole-volume percentiles; unscaled, they would saturate
    nm_window_scale: float = 3.0
    qsm_window_scale: float = 2.0
    #: how a box's z-range becomes ``slices[name]`` stack slices (docs/data.md, step 3):
    #: "pad" keeps native slices (the central ones if too many, zero slices if too few);
    #: "resample" resamples the box's slices along z to exactly that count (linear for the
    #: image, nearest for the mask; predictions are pasted back with nearest)
    slice_policy: str = "pad"
    #: intensity mapping (docs/data.md, step 2): "reference" = NM contrast-to-noise against
    #: the reference region next to the SN and QSM in a fixed ppm window (scanner-robust);
    #: "percentile" = whole-volume percentiles x *_window_scale (configs saved before this
    #: field existed load with it, so old bundles keep their mapping)
    intensity: str = "reference"
    nm_cnr_window: tuple[float, float] = (-5.0, 45.0)  #: NM CNR mapped to 0..255
    qsm_window_ppm: tuple[float, float] = (-0.1, 0.3)  #: QSM ppm mapped to 0..255
    qsm_unit: str = (
        "auto"  #: "auto" (ppb detected and converted; warns when unclear), "ppm" or "ppb"
    )

    #: allowed ``slice_policy`` values (a class constant, not a field)
    SLICE_POLICIES = ("pad", "resample")
    #: allowed ``intensity`` and ``qsm_unit`` values
    INTENSITY_MAPPINGS = ("reference", "percentile")
    QSM_UNITS = ("auto", "ppm", "ppb")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> RoiConfig:
        """Raise ``ConfigError`` for an unknown ``slice_policy``; returns ``self``."""
        if not isinstance(self.slice_policy, str) or self.slice_policy not in self.SLICE_POLICIES:
            raise ConfigError(
                f"roi.slice_policy must be one of "
                f"{', '.join(repr(p) for p in self.SLICE_POLICIES)}, not {self.slice_policy!r}"
            )
        for name, allowed in (
            ("intensity", self.INTENSITY_MAPPINGS),
            ("qsm_unit", self.QSM_UNITS),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ConfigError(
                    f"roi.{name} must be one of {', '.join(repr(p) for p in allowed)}, "
                    f"not {value!r}"
                )
        for name in ("nm_cnr_window", "qsm_window_ppm"):
            lo, hi = getattr(self, name)
            if not float(hi) > float(lo):
                raise ConfigError(f"roi.{name} must be (low, high) with high > low, not {(lo, hi)}")
        return self


@dataclass
class ModelConfig:
    """The MRN network (paper 3.2-3.4, 4.1.2)."""

    #: "mrn" (the paper's network), "seres10" (paper 4.2 CNN baseline) or "anatcl3d" (AnatCL's
    #: 3D ResNet-18 on the ROI volumes, models/anatcl3d.py)
    arch: str = "mrn"
    backbone: str = "vit_base_patch14_reg4_dinov2"  #: timm model name, "tiny" or "tiny-WxD"
    backbone_weights: str | None = None  #: local .safetensors / Meta .pth file
    allow_random_init: bool = False  #: train a pretrained-backbone preset without weights
    embed_dim: int = 768  #: token width D: must be the backbone's width (checked when built)
    num_heads: int = 12  #: heads of FFA/SFA attention
    max_slices: int = 32  #: rows of the learned slice position embedding
    ffa_depth: int = 3  #: L_FFA (global + local attention pairs)
    sfa_depth: int = 2  #: L_SFA
    use_ffa: bool = True
    use_sfa: bool = True  #: off = average of slice tokens
    use_dpt: bool = True
    use_moco: bool = True
    dinov2_only: bool = False  #: paper baseline: mean of slice tokens, no FFA/SFA/DPT
    dpt_features: str = "local"  #: "local" (paper) or "global" (Fig. 3)
    dpt_channels: tuple[int, int, int, int] = (96, 192, 384, 768)
    dpt_fusion: int = 256
    head_hidden: int = 512  #: hidden width of the 2-layer classification MLP
    dropout: float = 0.5
    #: BatchNorm1d on the patient vector before the head (not in the paper; needed from random init)
    head_input_norm: bool = False
    #: add to every slice token the mean of its patch tokens inside the nuclei masks (after
    #: FFA, LayerNorm + Linear): the nuclei-pooled slice token of models/res.py. Not in the
    #: paper; MRN then reads the case's nuclei masks, as SERes10 does
    nuclei_pool: bool = False
    drop_path: float = 0.2
    proj_dim: int = 128  #: mSupMoCo projection output
    moco_momentum: float = 0.999
    #: if set, the EMA momentum is derived from the planned optimiser steps instead: the
    #: teacher's half-life is this fraction of the run (``models.moco.momentum_for_steps``)
    moco_half_life: float | None = None
    moco_bank_size: int = 1024  #: per class
    moco_temperature: float = 0.1
    lambda_seg: float = 1.0
    lambda_con: float = 0.1
    num_classes: int = 2  #: HC, PD
    #: SERes10 baseline: channels of its four residual stages (paper: ResNet-10's 64-512)
    seres_widths: tuple[int, int, int, int] = (64, 128, 256, 512)


@dataclass
class TrainConfig:
    """Optimisation and cross-validation (paper 4.1)."""

    pretrain_epochs: int = 400  #: seg + contrastive losses only
    epochs: int = 200  #: full loss
    batch_size: int = 4
    lr_backbone: float = 1e-5  #: DINOv2, FFA, SFA
    wd_backbone: float = 0.1
    lr_head: float = 1e-4  #: DPT, classification and contrastive heads
    wd_head: float = 0.05
    #: MRN's slice position embedding, FFA and SFA (randomly initialised even when the ViT is
    #: pretrained): None = ``lr_backbone``, the paper's grouping
    lr_fusion: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    folds: int = 5
    cv_seed: int = 1
    seed: int = 1
    augment: bool = True
    #: with ``augment``: also the intensity and scanner transforms (``training/augment.py``);
    #: False keeps the geometry (rotation, mirror) and mild noise only
    augment_intensity: bool = True
    num_workers: int = 0
    device: str = "auto"  #: auto | cpu | cuda
    amp: bool = True  #: bf16 autocast on CUDA
    #: LayerScale gammas when the backbone starts from random init (DINOv2's 1e-5 is meant for
    #: pretrained weights; from scratch it collapses the slice tokens). 0 = keep the model's.
    random_init_layerscale: float = 1.0


@dataclass
class RunConfig:
    """Everything that defines a model and a training run."""

    preset: str = "paper-vitb"
    roi: RoiConfig = field(default_factory=RoiConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str):
            raise ConfigError(f"preset = {self.preset!r}: expected a string")
        for name in ("roi", "model", "train"):
            section = getattr(self, name)
            expected = {"roi": RoiConfig, "model": ModelConfig, "train": TrainConfig}[name]
            if not isinstance(section, expected):
                raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
            validate_section(section, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        roi = data.get("roi") if isinstance(data, dict) else None
        if isinstance(roi, dict) and "intensity" not in roi:  # saved before the field existed
            data = {**data, "roi": {**roi, "intensity": "percentile"}}
        return _from_dict(cls, data, "config")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` atomically."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: configuration file not found") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        except IsADirectoryError as e:
            raise ConfigError(f"{path}: is a folder, not a configuration file") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: unreadable configuration file ({e})") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: invalid configuration ({e})") from e

    def replace(self, **sections: Any) -> RunConfig:
        """Copy with nested overrides, e.g. ``cfg.replace(train={"epochs": 3})``."""
        data = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        return RunConfig.from_dict(data)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = (
            known[name].default_factory()
            if known[name].default_factory is not dataclasses.MISSING
            else known[name].default
        )  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


#: environment variable that moves the engine's cache folder
CACHE_ENV = "MRN_CACHE_DIR"


def cache_dir() -> Path:
    """Folder of derived files (``$MRN_CACHE_DIR``, default ``~/.cache/mrn``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mrn").expanduser()


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _paper_vitb() -> RunConfig:
    return RunConfig(preset="paper-vitb")


def _vits() -> RunConfig:
    cfg = RunConfig(preset="vits")
    cfg.model.backbone = "vit_small_patch14_reg4_dinov2"
    cfg.model.embed_dim = 384
    cfg.model.num_heads = 6
    cfg.model.dpt_channels = (48, 96, 192, 384)
    cfg.model.dpt_fusion = 128
    cfg.model.head_hidden = 256
    return cfg


def _cpu_tiny() -> RunConfig:
    cfg = RunConfig(preset="cpu-tiny")
    # "resample": the real basal-ganglia box spans ~18-20 slices; "pad" kept its central 8
    # and cut nucleus slices off (issue 13, tests/test_real_geometry.py)
    cfg.roi = RoiConfig(
        image_size=56,
        slices={"nm_sn": 6, "qsm_bg": 8, "qsm_midbrain": 6, "qsm_dentate": 6},
        slice_policy="resample",
    )
    m = cfg.model
    m.backbone = "tiny"
    m.allow_random_init = True  # no tiny DINOv2 weights exist: trained from scratch, documented
    m.embed_dim, m.num_heads = 64, 4
    m.ffa_depth, m.sfa_depth = 2, 1
    m.dpt_channels, m.dpt_fusion = (16, 32, 64, 64), 32
    m.head_hidden, m.proj_dim = 64, 32
    m.head_input_norm = True  # random-init tokens barely differ between cases: docs/results.md
    m.drop_path = 0.1
    m.moco_bank_size = 128
    m.seres_widths = (16, 32, 64, 128)  # a quarter of the paper's widths: CPU-sized baseline
    m.moco_momentum = 0.99  # unused: the half-life below sets it from the run length
    m.moco_half_life = 0.05  # about 150 demo steps: m = 0.91, the teacher follows within 8 steps
    t = cfg.train
    t.pretrain_epochs, t.epochs = 1, 12  # tuned on phantoms: docs/results.md
    t.batch_size = 4
    # backbone/FFA/SFA 10x below the head: at 3e-4 single fold models often ended at chance
    # or below (docs/results.md "Backbone learning rate"); SERes10 trains at lr_head
    t.lr_backbone, t.lr_head = 3e-5, 1e-3
    t.wd_backbone, t.wd_head = 0.05, 0.05
    return cfg


PRESETS = {"paper-vitb": _paper_vitb, "vits": _vits, "cpu-tiny": _cpu_tiny}


def get_preset(name: str) -> RunConfig:
    """A fresh copy of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
