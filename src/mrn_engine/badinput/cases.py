"""Small valid inputs the bad-input corpus corrupts: a case folder and a cpu-tiny model bundle."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

#: (y range, z range) of each right-side QSM structure; right copy at x 18-25, left at 38-45
LAYOUT = {
    1: ((30, 34), (14, 18)),
    3: ((35, 39), (14, 18)),
    5: ((40, 43), (14, 18)),
    7: ((44, 49), (14, 18)),
    9: ((20, 22), (8, 11)),
    11: ((23, 26), (8, 11)),
    13: ((27, 29), (8, 11)),
    15: ((8, 13), (2, 6)),
}
SHAPE = (64, 64, 24)


def case_affine() -> np.ndarray:
    """LAS-like affine of the synthetic cases (0.8 x 0.8 x 2 mm)."""
    affine = np.diag([-0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = (25.0, -25.0, -20.0)
    return affine


def case_arrays(seed: int = 0, pd: int = 0) -> dict[str, np.ndarray]:
    """NM, QSM, T1 and both masks of a tiny co-registered case with every nucleus label."""
    rng = np.random.default_rng(seed)
    qmask = np.zeros(SHAPE, np.uint8)
    for right, ((y0, y1), (z0, z1)) in LAYOUT.items():
        qmask[18:25, y0:y1, z0:z1] = right
        qmask[38:45, y0:y1, z0:z1] = right + 1
    nmask = np.zeros(SHAPE, np.uint8)
    nmask[qmask == 11] = 1
    nmask[qmask == 12] = 2
    qsm = rng.normal(0, 10, SHAPE) + 80.0 * (qmask > 0) + 40.0 * pd * np.isin(qmask, (11, 12))
    nm = 6000 + rng.normal(0, 300, SHAPE) + 14000.0 * (nmask > 0) * (1 - 0.3 * pd)
    t1 = 1000 + rng.normal(0, 50, SHAPE)
    return {
        "NM": nm.astype(np.float32),
        "QSM": qsm.astype(np.float32),
        "T1": t1.astype(np.float32),
        "NM_mask": nmask,
        "QSM_mask": qmask,
    }


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save ``array`` as NIfTI-1 with the case affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, case_affine() if affine is None else affine), str(path))
    return path


def write_case(
    folder: Path, *, seed: int = 0, pd: int = 0, t1: bool = False, masks: bool = True
) -> Path:
    """A valid case folder (NM, QSM; both masks unless ``masks=False``; T1 on request)."""
    skip = ({"T1"} if not t1 else set()) | ({"NM_mask", "QSM_mask"} if not masks else set())
    for stem, arr in case_arrays(seed, pd).items():
        if stem not in skip:
            write_nifti(folder / f"{stem}.nii.gz", arr)
    return folder


def write_bundle(root: Path, folds: tuple[int, ...] = (0,)) -> Path:
    """A model bundle as ``mrn train`` writes it, random cpu-tiny weights (28-pixel slices)."""
    import torch

    from mrn_engine.config import get_preset
    from mrn_engine.data.labels import ROI_NAMES
    from mrn_engine.models import build_model, save_model

    cfg = get_preset("cpu-tiny").replace(
        roi={"image_size": 28, "slices": dict.fromkeys(ROI_NAMES, 4)}
    )
    root.mkdir(parents=True)
    cfg.save(root / "config.json")
    info = {"folds": [{"fold": k, "train": ["RJPD_001"], "val": ["RJPD_002"]} for k in folds]}
    (root / "bundle.json").write_text(json.dumps(info))
    for k in folds:
        torch.manual_seed(10 + k)
        save_model(
            build_model(cfg, pretrained=False), root / f"fold_{k}" / "model.safetensors", cfg
        )
    return root
