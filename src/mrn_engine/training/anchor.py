"""Each fold's out-of-fold controls, summarised for site harmonisation.

At the end of a fold the trainer predicts its validation (out-of-fold) cases anyway; the mean
patient vector (the classification head's input) of those labelled HC is written to
``fold_k/anchor_controls.safetensors`` (tensor ``mean``; metadata: the case ids). ``mrn
site-adapt`` anchors a new scanner's controls on it (``inference/site_adaptation.py``), so a
bundle shipped without its training cases can still be harmonised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mrn_engine.errors import WeightsError
from mrn_engine.training.checkpoint import save_state_dict

ANCHOR_FILE = "anchor_controls.safetensors"


def write_anchor(
    fold_dir: str | os.PathLike, patients: Mapping[str, torch.Tensor], controls: Sequence[str]
) -> Path | None:
    """Write the mean patient vector of ``controls`` (None, nothing written, if there are none)."""
    ids = [c for c in controls if c in patients]
    if not ids:
        return None
    mean = torch.stack([patients[c].float() for c in ids]).mean(dim=0).contiguous()
    meta = {"case_ids": json.dumps(ids)}
    return save_state_dict({"mean": mean}, Path(fold_dir) / ANCHOR_FILE, meta)


def read_anchor(fold_dir: str | os.PathLike) -> tuple[torch.Tensor, list[str]] | None:
    """``(mean, case ids)`` of a fold's anchor controls; None when the fold has no file."""
    from safetensors import safe_open

    path = Path(fold_dir) / ANCHOR_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            mean = f.get_tensor("mean")
            ids = json.loads((f.metadata() or {})["case_ids"])
    except Exception as e:  # safetensors / JSON / missing key
        raise WeightsError(f"{path}: damaged anchor file ({e})") from e
    if mean.ndim != 1 or not torch.isfinite(mean).all():
        raise WeightsError(f"{path}: damaged anchor file (mean of shape {tuple(mean.shape)})")
    return mean, [str(c) for c in ids]
