"""Datasets of cached ROI stacks for training and evaluation.

A sample is ``{"case_id": str, "label": int, "rois": {name: {"image": (S,H,W) float32,
"mask": (S,H,W) int64}}}``; ``torch.utils.data.default_collate`` batches it to
``(B, S, H, W)`` tensors, the input the models take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    default_collate,
)

from mrn_engine.errors import InputDataError
from mrn_engine.training.augment import RoiAugmenter
from mrn_engine.training.distributed import RankBatchSampler

#: case id -> {roi name: {"image": (S,H,W), "mask": (S,H,W) | None}}
RoiLoader = Callable[[str], Mapping[str, Mapping[str, np.ndarray | None]]]


class RoiStackDataset(Dataset):
    """Labelled cases as ROI stacks, augmented when an augmenter is given.

    Parameters
    ----------
    case_ids : the cases, in a fixed order.
    labels : case id -> 0/1.
    load_rois : returns a case's ROI stacks (e.g. from a ``RoiCache``).
    augmenter : training augmentation, or None for evaluation.
    require_masks : raise ``InputDataError`` for a case whose ROI has no mask.
    in_memory : keep loaded stacks in memory (small presets) instead of re-reading each epoch.
    """

    def __init__(
        self,
        case_ids: Sequence[str],
        labels: Mapping[str, int],
        load_rois: RoiLoader,
        augmenter: RoiAugmenter | None = None,
        *,
        require_masks: bool = True,
        in_memory: bool = True,
    ) -> None:
        missing = [c for c in case_ids if c not in labels]
        if missing:
            raise InputDataError(f"{missing[0]}: case has no label ({len(missing)} unlabelled)")
        self.case_ids = list(case_ids)
        self.labels = {c: int(labels[c]) for c in self.case_ids}
        self.load_rois = load_rois
        self.augmenter = augmenter
        self.require_masks = require_masks
        self.in_memory = in_memory
        self.epoch = 0
        self._memo: dict[str, Mapping[str, Mapping[str, np.ndarray | None]]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (deterministic per epoch and index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids)

    def _rois(self, case_id: str) -> Mapping[str, Mapping[str, np.ndarray | None]]:
        if case_id in self._memo:
            return self._memo[case_id]
        rois = self.load_rois(case_id)
        if self.require_masks:
            for name, roi in rois.items():
                if roi.get("mask") is None:
                    raise InputDataError(f"{case_id}: ROI {name} has no mask; training needs masks")
        if self.in_memory:
            self._memo[case_id] = rois
        return rois

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self.case_ids[index]
        rois = self._rois(case_id)
        if self.augmenter is not None:
            rois = self.augmenter(rois, key=self.epoch * 1_000_003 + index)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in sorted(rois):
            image = torch.as_tensor(np.asarray(rois[name]["image"], dtype=np.float32))
            item = {"image": image}
            mask = rois[name].get("mask")
            item["mask"] = (
                torch.as_tensor(np.asarray(mask, dtype=np.int64))
                if mask is not None
                else torch.zeros(image.shape, dtype=torch.int64)
            )
            out[name] = item
        return {"case_id": case_id, "label": self.labels[case_id], "rois": out}


def make_loader(
    dataset: RoiStackDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A ``DataLoader`` whose order depends only on ``(seed, epoch)`` (reproducible on resume).

    With ``world_size > 1`` ``batch_size`` is the global batch: rank ``rank`` gets its
    contiguous ``batch_size / world_size`` piece of each batch of the single-process order
    (``distributed.RankBatchSampler``), and a short last batch is always dropped.
    """
    dataset.set_epoch(epoch)
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    if world_size > 1:
        # the same sampler and generator use as DataLoader(shuffle=...) builds for one process
        order = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_sampler=RankBatchSampler(order, batch_size, rank, world_size),
            generator=gen,
            num_workers=num_workers,
            collate_fn=default_collate,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        collate_fn=default_collate,
        drop_last=drop_last and len(dataset) > batch_size,
    )
