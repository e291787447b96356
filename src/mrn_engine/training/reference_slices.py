"""Each fold's healthy reference slice tokens: the baseline of per-slice evidence.

Per-slice evidence asks "how would P(PD) change if this slice looked healthy?". The healthy
look of slice ``s`` of ROI ``r`` is the mean SFA input token (the slice token after FFA) at
that position over the fold's **training controls** (label 0), each case seen as is and
mirrored (the two views of test-time augmentation). At the end of a fold the trainer writes
them to ``fold_k/reference_slices.safetensors`` (one ``(S, D)`` tensor per ROI; metadata:
the case ids and the definition); ``mrn calibrate BUNDLE --reference-cases ROOT`` adds them
to a bundle trained before they existed. ``inference/evidence.py`` replaces one slice token
at a time by its reference (``models/evidence.py``); without the file it falls back to
leaving the slice out of SFA.

Why not leave-one-out alone: a model that reads pigment as healthy moves P(PD) towards PD when
a pigmented slice is removed, so the "most PD-ward" slice of a PD case was a margin slice
without nucleus (docs/results.md, issue 15). Against the healthy reference a depigmented slice
is what differs, and its replacement moves P(PD) towards HC.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mrn_engine.bundle import fold_dir
from mrn_engine.errors import WeightsError
from mrn_engine.models.ensemble import mirror_views
from mrn_engine.models.evidence import capture_slice_tokens, supports_slice_evidence
from mrn_engine.training.checkpoint import save_state_dict
from mrn_engine.training.dataset import RoiStackDataset
from mrn_engine.training.head_norm import plain_view

REFERENCE_FILE = "reference_slices.safetensors"
#: what the tensors are (written into the file's metadata)
DEFINITION = (
    "mean SFA input token per ROI slice over the fold's training controls (label 0), "
    "each case as is and mirrored"
)


@torch.no_grad()
def fit_reference_slices(
    model: nn.Module, dataset: RoiStackDataset, *, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """ROI -> (S, D) mean slice token over the controls of ``dataset`` (un-augmented).

    Returns ``(means, control ids)``; None for models without MRN slice tokens or a dataset
    without controls.
    """
    if not supports_slice_evidence(model):
        return None
    controls = [c for c in dataset.case_ids if dataset.labels[c] == 0]
    if not controls:
        return None
    view = plain_view(dataset)
    needs_masks = getattr(model, "needs_masks", False)
    sums: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for i, cid in enumerate(view.case_ids):
            if view.labels[cid] != 0:
                continue
            rois = view[i]["rois"]
            images = {n: mirror_views(r["image"][None]).to(device) for n, r in rois.items()}
            masks = {n: mirror_views(r["mask"][None]).to(device) for n, r in rois.items()}
            with capture_slice_tokens(model) as store:
                model.encode_rois(images, masks if needs_masks else None)
            for n, t in store.items():  # (2, S, D): the case and its mirror
                sums[n] = sums.get(n, 0) + t.float().sum(dim=0).cpu()
    finally:
        model.train(was_training)
    return {n: s / (2 * len(controls)) for n, s in sums.items()}, controls


def write_reference_slices(
    fold_dir: str | os.PathLike, means: Mapping[str, torch.Tensor], controls: Sequence[str]
) -> Path:
    """Write ``means`` (ROI -> (S, D)) atomically to ``fold_dir/reference_slices.safetensors``."""
    meta = {"case_ids": json.dumps(list(controls)), "definition": DEFINITION}
    tensors = {n: t.float() for n, t in means.items()}
    return save_state_dict(tensors, Path(fold_dir) / REFERENCE_FILE, meta)


def read_reference_slices(
    fold_dir: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """``(ROI -> (S, D), control ids)`` of a fold; None when the fold has no file."""
    from safetensors import safe_open

    path = Path(fold_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            means = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open API
            ids = json.loads((f.metadata() or {})["case_ids"])
    except Exception as e:  # safetensors / JSON / missing key
        raise WeightsError(f"{path}: damaged reference file ({e})") from e
    bad = [n for n, t in means.items() if t.ndim != 2 or not torch.isfinite(t).all()]
    if not means or bad:
        raise WeightsError(f"{path}: damaged reference file (ROI tensors {bad or 'missing'})")
    return means, [str(c) for c in ids]


def load_reference_slices(
    bundle_root: str | os.PathLike, folds: Sequence[int]
) -> dict[int, dict[str, torch.Tensor]]:
    """Fold -> ROI -> (S, D) healthy reference of a bundle; empty unless every fold has one."""
    found = {}
    for k in folds:
        ref = read_reference_slices(fold_dir(bundle_root, k))
        if ref is None:
            return {}
        found[int(k)] = ref[0]
    return found
