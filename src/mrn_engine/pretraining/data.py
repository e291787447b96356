"""Two augmented views per case of its ROI image stacks (no masks, no labels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mrn_engine.training.augment import RoiAugmenter
from mrn_engine.training.dataset import RoiLoader


class TwoViewDataset(Dataset):
    """``{"index", "v0": {roi: (S,H,W)}, "v1": {...}}``; the draw depends on (seed, epoch, index).

    The augmentation is the training one without the left/right mirror (asymmetry is one of
    the weak labels); ``intensity=False`` keeps only its geometry and mild noise (the mean
    contrasts are weak labels too). Stacks are kept in memory after the first read.
    """

    def __init__(
        self, case_ids: Sequence[str], load_rois: RoiLoader, seed: int = 0, intensity: bool = True
    ) -> None:
        self.case_ids = list(case_ids)
        self.load_rois = load_rois
        self.augmenter = RoiAugmenter(seed, mirror=False, intensity=intensity)
        self.epoch = 0
        self._memo: dict[str, Mapping[str, Mapping[str, np.ndarray | None]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids)

    def images(self, index: int) -> dict[str, dict[str, np.ndarray | None]]:
        """Un-augmented ROI images of case ``index`` (masks dropped)."""
        cid = self.case_ids[index]
        if cid not in self._memo:
            rois = self.load_rois(cid)
            self._memo[cid] = {n: {"image": r["image"], "mask": None} for n, r in rois.items()}
        return {n: dict(r) for n, r in self._memo[cid].items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        rois = self.images(index)
        out: dict[str, Any] = {"index": index}
        for v in (0, 1):
            aug = self.augmenter(rois, key=(self.epoch * 1_000_003 + index) * 2 + v)
            out[f"v{v}"] = {n: torch.as_tensor(aug[n]["image"]) for n in sorted(aug)}
        return out
