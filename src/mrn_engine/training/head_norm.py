"""Precise statistics for the head's input BatchNorm (``ModelConfig.head_input_norm``).

During training the BatchNorm's running mean/variance follow augmented batches of 4 while the
backbone moves, so at inference they lag the features the head sees and the decision
threshold drifts (ROC AUC fine, accuracy at chance). After every epoch the statistics are
recomputed from the un-augmented training cases in eval mode (the "precise BN" of
detectron2/fvcore), so the saved model classifies with the features it will meet.
"""

from __future__ import annotations

import torch
from torch import nn

from mrn_engine.training.dataset import RoiStackDataset, make_loader


def head_input_norm(student: nn.Module) -> nn.BatchNorm1d | None:
    """The BatchNorm1d in front of ``student.head`` or None."""
    mlp = getattr(getattr(student, "head", None), "mlp", None)
    first = mlp[0] if isinstance(mlp, nn.Sequential) and len(mlp) else None
    return first if isinstance(first, nn.BatchNorm1d) else None


def plain_view(dataset: RoiStackDataset) -> RoiStackDataset:
    """The same cases without augmentation (sharing the in-memory stacks)."""
    view = RoiStackDataset(
        dataset.case_ids,
        dataset.labels,
        dataset.load_rois,
        None,
        require_masks=dataset.require_masks,
        in_memory=dataset.in_memory,
    )
    view._memo = dataset._memo
    return view


@torch.no_grad()
def recalibrate_head_norm(
    student: nn.Module,
    dataset: RoiStackDataset,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> bool:
    """Set the head BatchNorm's running statistics to those of ``dataset``'s patient vectors.

    Returns False (and does nothing) when the head has no input norm or the set has < 2 cases.
    """
    norm = head_input_norm(student)
    if norm is None or len(dataset) < 2:
        return False
    was_training = student.training
    student.eval()
    try:
        vectors = []
        for batch in make_loader(plain_view(dataset), batch_size, shuffle=False):
            rois = batch["rois"]
            images = {n: r["image"].to(device) for n, r in rois.items()}
            masks = {n: r["mask"].to(device) for n, r in rois.items()}
            needs = getattr(student, "needs_masks", False)
            tokens = student.encode_rois(images, masks if needs else None)
            vectors.append(student.patient(tokens).float())
        x = torch.cat(vectors)
        norm.running_mean.copy_(x.mean(0))
        norm.running_var.copy_(x.var(0, unbiased=True))
    finally:
        student.train(was_training)
    return True
