"""mSupMoCo: multi-ROI supervised momentum contrast (paper 3.3.2, Eq. 8-9; MoCo + C3R).

Pieces, each matching the paper:

- :class:`ProjectionHead` -- z = MLP(patient representation), 2 layers, L2-normalised.
- a teacher ("momentum MRN") = deep copy of the student network + projection head, no
  gradients, updated by EMA (Eq. 9): ``teacher = m * teacher + (1 - m) * student``.
- :class:`CategoryMemoryBank` -- one FIFO queue of size K per class, filled with the
  teacher's normalised projections.
- :func:`supervised_contrastive_loss` -- Eq. 8 (below).

Trainer-facing API: ``MSupMoCo(model, cfg).step(batch)`` runs the EMA update, the teacher
keys, the student forward and the contrastive loss, enqueues the keys, and returns the
student's :class:`MRNOutput` with ``contrastive`` set; the trainer then calls
:func:`mrn_engine.models.losses.compute_losses` and steps its optimiser. During inference the
teacher, the projection head and the banks are discarded (only ``wrapper.model`` is saved).

Under DDP (``training/distributed.py``) the batch's keys and labels are all-gathered from every
rank before they enter the loss and the banks (MoCo v2's ``concat_all_gather``), so every rank
sees the global batch's keys and holds the same banks; the EMA update is the same on every rank
because DDP leaves the student's parameters equal after each step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mrn_engine.config import ModelConfig
from mrn_engine.models.multiroi import MultiRoiClassifier
from mrn_engine.models.outputs import MRNOutput


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B, ...) of every rank concatenated in rank order; itself without DDP.

    Every rank must pass the same shape (the trainer gives every rank an equal batch). No
    gradient flows through the result (it is used for the teacher's keys only).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def momentum_for_steps(half_life: float, planned_steps: int) -> float:
    """EMA momentum whose half-life is ``half_life`` x the planned optimiser steps.

    After ``h = half_life * planned_steps`` steps the teacher keeps half of its old weights:
    ``m = 0.5 ** (1 / h)``. With a fixed m = 0.999 and the ~156 steps of ``mrn demo`` the
    teacher would still be 0.999^156 = 86 % its random initialisation; with half_life 0.05 it
    follows the student within a few epochs whatever the run length.
    """
    if not 0 < half_life <= 1:
        raise ValueError(f"moco half-life must be in (0, 1] of the run, not {half_life}")
    steps = max(1.0, half_life * max(int(planned_steps), 1))
    return float(0.5 ** (1.0 / steps))


@torch.no_grad()
def key_spread(keys: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean pairwise cosine of normalised keys within a class and between the classes.

    A collapsed bank (all keys alike, e.g. a teacher that is still its random
    initialisation) has both near 1; keys that carry the diagnosis have within >> between.
    NaN where a class has fewer than two keys (within) or a class is missing (between).
    """
    nan = float("nan")
    out = {"key_cos_within": nan, "key_cos_between": nan}
    if keys.numel() == 0:
        return out
    k = F.normalize(keys.float(), dim=1)
    sim = k @ k.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(k), dtype=torch.bool, device=k.device)
    within = same & off_diag
    if within.any():
        out["key_cos_within"] = float(sim[within].mean())
    if (~same).any():
        out["key_cos_between"] = float(sim[~same].mean())
    return out


class ProjectionHead(nn.Module):
    """Two-layer non-linear MLP (C3R / MoCo v2) -> L2-normalised projection z."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, patient: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(patient), dim=1)


class CategoryMemoryBank(nn.Module):
    """One FIFO queue of ``size`` keys per class (buffers, so they follow ``.to(device)``).

    Attributes
    ----------
    keys: (num_classes, size, dim) stored keys.
    ptr: (num_classes,) next write position per class.
    count: (num_classes,) number of valid entries per class (<= size).
    """

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``keys`` (B, dim) to the queue of their class, oldest entries overwritten."""
        for c in range(self.keys.shape[0]):
            new = keys[labels == c].to(self.keys.dtype)
            if len(new) == 0:
                continue
            new = new[-self.size :]
            idx = (self.ptr[c] + torch.arange(len(new), device=self.keys.device)) % self.size
            self.keys[c, idx] = new
            self.ptr[c] = (self.ptr[c] + len(new)) % self.size
            self.count[c] = torch.clamp(self.count[c] + len(new), max=self.size)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All valid keys (M, dim) and their class labels (M,)."""
        keys, labels = [], []
        for c in range(self.keys.shape[0]):
            n = int(self.count[c])
            keys.append(self.keys[c, :n])
            labels.append(torch.full((n,), c, dtype=torch.long, device=self.keys.device))
        return torch.cat(keys), torch.cat(labels)


def supervised_contrastive_loss(
    q: torch.Tensor,
    labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    r"""Supervised momentum-contrastive loss (paper Eq. 8).

    For every anchor q (student projection, normalised) with class y, positives P(q) are
    the keys of class y and negatives N(q) the keys of the other class (keys = memory
    bank entries + the teacher's keys of the batch, all normalised):

    .. math::
        L = \frac{1}{B}\sum_q -\frac{1}{|P(q)|}\sum_{k^+\in P(q)}
            \log\frac{\exp(q\cdot k^+/\tau)}{\exp(q\cdot k^+/\tau)+\sum_{k^-\in N(q)}\exp(q\cdot k^-/\tau)}

    Anchors without positives are skipped; with no negatives a term is log 1 = 0.

    Parameters
    ----------
    q: (B, P) anchors; labels: (B,) their classes.
    keys: (M, P) keys; key_labels: (M,) their classes.
    temperature: tau (paper 0.1).
    """
    logits = q @ keys.T / temperature  # (B, M)
    pos = labels[:, None] == key_labels[None, :]
    neg_lse = torch.logsumexp(logits.masked_fill(pos, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    log_prob = logits - torch.logaddexp(logits, neg_lse)  # log exp(l+)/(exp(l+) + sum exp(l-))
    n_pos = pos.sum(dim=1)
    per_anchor = -(log_prob * pos).sum(dim=1) / n_pos.clamp(min=1)
    valid = n_pos > 0
    if not valid.any():
        return q.sum() * 0.0
    return per_anchor[valid].mean()


class MSupMoCo(nn.Module):
    """Student network + projection head, EMA teacher and per-class memory banks.

    Parameters
    ----------
    model: the student (MRN or SERes10); trained by the optimiser.
    cfg: model config (``proj_dim``, ``head_hidden``, ``moco_momentum``, ``moco_bank_size``,
        ``moco_temperature``).
    """

    def __init__(self, model: MultiRoiClassifier, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = model
        in_dim = model.token_dim * 4
        self.projection = ProjectionHead(in_dim, max(cfg.head_hidden, cfg.proj_dim), cfg.proj_dim)
        self.teacher = copy.deepcopy(model)
        self.teacher_projection = copy.deepcopy(self.projection)
        for p in [*self.teacher.parameters(), *self.teacher_projection.parameters()]:
            p.requires_grad_(False)
        self.bank = CategoryMemoryBank(cfg.num_classes, cfg.moco_bank_size, cfg.proj_dim)
        self.momentum = cfg.moco_momentum
        self.half_life = cfg.moco_half_life
        self.temperature = cfg.moco_temperature

    def plan_steps(self, planned_steps: int) -> float:
        """Set the EMA momentum for a run of ``planned_steps`` optimiser steps (when the config
        gives ``moco_half_life``; else the fixed ``moco_momentum`` stays). Returns the momentum."""
        if self.half_life is not None:
            self.momentum = momentum_for_steps(self.half_life, planned_steps)
        return self.momentum

    def key_spread(self) -> dict[str, float]:
        """:func:`key_spread` of the memory banks' keys (logged per epoch in metrics.csv)."""
        return key_spread(*self.bank.entries())

    def train(self, mode: bool = True) -> MSupMoCo:
        """The teacher always stays in eval mode (deterministic keys: no dropout / drop-path)."""
        super().train(mode)
        self.teacher.eval()
        self.teacher_projection.eval()
        return self

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Eq. 9: teacher <- m * teacher + (1 - m) * student (parameters); buffers copied."""
        m = self.momentum
        for student, teacher in (
            (self.model, self.teacher),
            (self.projection, self.teacher_projection),
        ):
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
            for bs, bt in zip(student.buffers(), teacher.buffers(), strict=True):
                bt.copy_(bs)

    @torch.no_grad()
    def teacher_keys(
        self, rois: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """Normalised teacher projections (B, P) of a batch."""
        tokens = self.teacher.encode_rois(rois, masks)
        return self.teacher_projection(self.teacher.patient(tokens))

    def step(self, batch: Mapping) -> MRNOutput:
        """One training forward: EMA update, keys, student output + contrastive loss, enqueue.

        ``batch``: ``images`` {name: (B, S, H, W)}, ``label`` (B,), optional ``masks``.
        Call once per optimiser step (MoCo order: the EMA update uses the student after the
        previous optimiser step).
        """
        rois, masks, labels = batch["images"], batch.get("masks"), batch["label"]
        self.momentum_update()
        keys = self.teacher_keys(rois, masks if self.model.needs_masks else None)
        out = self.model(rois, masks if self.model.needs_masks else None)
        q = self.projection(out.patient)
        bank_keys, bank_labels = self.bank.entries()
        # the global batch's keys (all ranks, rank order) under DDP; this batch's otherwise
        keys = concat_all_gather(keys.detach().to(bank_keys.dtype))
        key_labels = concat_all_gather(labels.to(bank_labels.device))
        all_keys = torch.cat([bank_keys, keys])
        all_labels = torch.cat([bank_labels, key_labels])
        out.contrastive = supervised_contrastive_loss(
            q.float(), labels, all_keys.float(), all_labels, self.temperature
        )
        self.bank.enqueue(keys, key_labels)
        return out

    def forward(self, batch: Mapping) -> MRNOutput:
        """Same as :meth:`step` (so the wrapper can be called like a module)."""
        return self.step(batch)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Student groups, the projection (contrastive) head added to ``head``."""
        groups = self.model.lr_groups()
        groups["head"] = groups["head"] + list(self.projection.parameters())
        return groups


class PlainStep(nn.Module):
    """The same ``step(batch)`` API as :class:`MSupMoCo` without contrastive learning
    (``use_moco=False``): ``contrastive`` stays None."""

    def __init__(self, model: MultiRoiClassifier) -> None:
        super().__init__()
        self.model = model

    def step(self, batch: Mapping) -> MRNOutput:
        masks = batch.get("masks") if self.model.needs_masks else None
        return self.model(batch["images"], masks)

    def forward(self, batch: Mapping) -> MRNOutput:
        return self.step(batch)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.model.lr_groups()
