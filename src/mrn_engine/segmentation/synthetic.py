"""nnU-Net model folders with random weights (benchmarks, GPU checks and tests; no training).

A folder written here has the bundle layout of ``mrn seg train --bundle`` (``plans.json``,
``dataset.json``, ``fold_k/model.safetensors`` + ``model.json``, ``mrn_nnunet.json`` with the
sha256 of every file) and loads through the same checked path. Its masks are meaningless: use
it to measure speed and memory, never quality. ``mrn_nnunet.json`` says ``"random_weights":
true``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from mrn_engine.bundle import NNUNET_DIR
from mrn_engine.data.labels import NM_LABELS, QSM_LABELS
from mrn_engine.errors import ConfigError
from mrn_engine.runtime import file_sha256
from mrn_engine.segmentation.safe_model import (
    PROVENANCE_FILE,
    SAFE_META,
    SAFE_WEIGHTS,
    build_network,
    check_plans_safe,
)

#: the tiny CPU models of ``mrn seg train --tiny`` on the challenge grid (Z, Y, X order)
TINY = {"patch": (16, 64, 64), "spacing": (2.0, 1.3334, 1.3334), "features": (8, 16, 32, 64, 64)}
#: a full-width nnU-Net 3d_fullres network (nnU-Net's default widths 32..320) at the
#: challenge's native spacing; the patch is our choice, not nnU-Net's planner's
FULL = {
    "patch": (32, 160, 160),
    "spacing": (2.0, 0.6667, 0.6667),
    "features": (32, 64, 128, 256, 320, 320),
}
PRESETS = {"tiny": TINY, "full": FULL}


def _strides(patch: Sequence[int], n_stages: int) -> list[list[int]]:
    size, out = list(patch), [[1, 1, 1]]
    for _ in range(1, n_stages):
        s = [2 if v >= 8 else 1 for v in size]
        size = [v // k for v, k in zip(size, s, strict=True)]
        out.append(s)
    return out


def plans_for(patch: Sequence[int], spacing: Sequence[float], features: Sequence[int]) -> dict:
    """A minimal nnU-Net v2 plans file with one ``3d_fullres`` PlainConvUNet configuration."""
    n = len(features)
    conf = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [int(p) for p in patch],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {
            "is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None,
        },
        "resampling_fn_seg_kwargs": {
            "is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None,
        },
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None,
        },
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": [int(f) for f in features],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n,
                "strides": _strides(patch, n),
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }  # fmt: skip
    return {
        "dataset_name": "Dataset999_Random",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(p) for p in patch],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": conf},
        "experiment_planner_used": "mrn_engine.segmentation.synthetic",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                "percentile_00_5": -1.0, "percentile_99_5": 1.0, "std": 1.0,
            }
        },
    }  # fmt: skip


def write_random_model(
    model_dir: str | os.PathLike,
    modality: str,
    *,
    preset: str = "tiny",
    folds: Sequence[int] = (0,),
    seed: int = 0,
    patch: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    features: Sequence[int] | None = None,
) -> Path:
    """Write ``model_dir`` (e.g. ``BUNDLE/nnunet/NM``) with seeded random weights per fold."""
    import torch
    from safetensors.torch import save_file

    if modality not in ("NM", "QSM"):
        raise ConfigError(f"modality must be NM or QSM, not {modality!r}")
    if preset not in PRESETS:
        raise ConfigError(f"random nnU-Net preset {preset!r}: choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    plans = plans_for(patch or p["patch"], spacing or p["spacing"], features or p["features"])
    labels = NM_LABELS if modality == "NM" else QSM_LABELS
    dataset = {
        "channel_names": {"0": modality},
        "labels": {"background": 0, **{name: v for v, name in labels.items()}},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    meta = {
        "trainer_name": "nnUNetTrainer",
        "configuration": "3d_fullres",
        "inference_allowed_mirroring_axes": [0, 1],  # never left-right (X = last axis)
    }
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    check_plans_safe(plans, d / "plans.json")
    (d / "plans.json").write_text(json.dumps(plans, indent=1))
    (d / "dataset.json").write_text(json.dumps(dataset, indent=1))
    sums = {n: file_sha256(d / n) for n in ("plans.json", "dataset.json")}
    for fold in folds:
        torch.manual_seed(seed * 1000 + int(fold))
        net, _, _ = build_network(plans, dataset, meta, d)
        state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
        fd = d / f"fold_{fold}"
        fd.mkdir(exist_ok=True)
        save_file(state, str(fd / SAFE_WEIGHTS))
        (fd / SAFE_META).write_text(json.dumps(meta, indent=2))
        for n in (SAFE_WEIGHTS, SAFE_META):
            sums[f"fold_{fold}/{n}"] = file_sha256(fd / n)
    prov = {"modality": modality, "random_weights": True, "preset": preset, "sha256": sums}
    (d / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2))
    return d


def write_random_bundle(
    bundle: str | os.PathLike,
    *,
    preset: str = "tiny",
    folds: Sequence[int] = (0,),
    seed: int = 0,
    **overrides: Sequence,
) -> Path:
    """``BUNDLE/nnunet/{NM,QSM}`` with random weights; returns the ``nnunet`` folder.

    ``overrides``: ``patch``, ``spacing``, ``features`` instead of the preset's.
    """
    root = Path(bundle) / NNUNET_DIR
    for i, mod in enumerate(("NM", "QSM")):
        write_random_model(root / mod, mod, preset=preset, folds=folds, seed=seed + i, **overrides)
    return root
