"""DINO-style self-distillation beside AnatCL's loss (``PretrainOptions.distill``).

Caron et al., "Emerging properties in self-supervised vision transformers" (DINO): a teacher,
the exponential moving average of the student, maps one view of a case to a sharpened,
centred distribution over ``K`` prototypes; the student is trained to predict it from the
other view (cross-entropy, both directions). Here the student is the pretrained embedder's
pooled features (per ROI for AnatCL's ``roi`` variant, one head per ROI), so the term asks the
backbone for view-invariant features that no descriptor names.

The teacher's backbone and heads, and the centre, are buffers of this module (saved with the
pretraining checkpoints); only the student heads are trained here, the student backbone by the
sum of both losses.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: DINO's settings here (recorded in the weights card): prototypes, EMA momentum of the
#: teacher, student and teacher temperatures, centre momentum
PROTOTYPES, MOMENTUM, T_STUDENT, T_TEACHER, CENTER_MOMENTUM = 256, 0.99, 0.1, 0.04, 0.9


def card_entry(weight: float) -> dict:
    """What the weights card records of a run with this term at ``weight``."""
    return {
        "weight": weight,
        "method": "DINO (EMA teacher, centred and sharpened prototypes)",
        "prototypes": PROTOTYPES,
        "teacher_momentum": MOMENTUM,
        "temperatures": {"student": T_STUDENT, "teacher": T_TEACHER},
        "center_momentum": CENTER_MOMENTUM,
    }


class DinoHead(nn.Module):
    """``BN -> Linear -> GELU -> Linear -> L2 norm -> weight-normalised Linear`` (DINO's head,
    small). The input BatchNorm (batch statistics, no affine) is the projection head's reason
    (:func:`~mrn_engine.pretraining.encoder.projection_head`): a from-scratch ViT's pooled
    features differ across cases by ~2 %; without it every case maps to the same
    distribution, the centring flattens it and the loss sits at ``log(K)`` (measured)."""

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 128, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(in_dim, affine=False, track_running_stats=False),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.last = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, prototypes, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class SelfDistillation(nn.Module):
    """Student heads, an EMA teacher (backbone + heads) and the centre of DINO's loss.

    ``embedder`` is the student (a :mod:`mrn_engine.pretraining.encoder` embedder); ``parts``
    is 4 for one head per ROI (AnatCL ``roi``) or 1 for the whole pooled vector.
    """

    def __init__(
        self,
        embedder: nn.Module,
        feature_dim: int,
        parts: int,
        *,
        prototypes: int = PROTOTYPES,
        momentum: float = MOMENTUM,
        t_student: float = T_STUDENT,
        t_teacher: float = T_TEACHER,
        center_momentum: float = CENTER_MOMENTUM,
    ) -> None:
        super().__init__()
        self.parts = parts
        self.momentum = momentum
        self.t_student, self.t_teacher = t_student, t_teacher
        self.center_momentum = center_momentum
        per = feature_dim // parts
        self.student_heads = nn.ModuleList(DinoHead(per, prototypes) for _ in range(parts))
        self.teacher = copy.deepcopy(embedder).requires_grad_(False)
        self.teacher_heads = copy.deepcopy(self.student_heads).requires_grad_(False)
        self.register_buffer("center", torch.zeros(parts, prototypes))

    def _logits(self, heads: nn.ModuleList, f: torch.Tensor) -> list[torch.Tensor]:
        return [h(x) for h, x in zip(heads, f.split(f.shape[1] // self.parts, dim=1), strict=True)]

    def loss(
        self, student_features: torch.Tensor, views: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """DINO's loss for student features (2B, F) of two views stacked view-major, the
        teacher seeing the same ``views``; updates the centre."""
        self.teacher.eval()
        with torch.no_grad():
            teacher = self._logits(self.teacher_heads, self.teacher.features(views))
        student = self._logits(self.student_heads, student_features)
        losses = []
        for r, (t, s) in enumerate(zip(teacher, student, strict=True)):
            p_t = F.softmax((t - self.center[r]) / self.t_teacher, dim=1).chunk(2)
            log_s = F.log_softmax(s / self.t_student, dim=1).chunk(2)
            cross = -(p_t[0] * log_s[1]).sum(1).mean() - (p_t[1] * log_s[0]).sum(1).mean()
            losses.append(cross / 2)
            with torch.no_grad():
                self.center[r].mul_(self.center_momentum).add_(
                    t.mean(0), alpha=1 - self.center_momentum
                )
        return torch.stack(losses).mean()

    @torch.no_grad()
    def update_teacher(self, student: nn.Module) -> None:
        """``teacher <- m * teacher + (1 - m) * student``, backbone and heads."""
        pairs = [(self.teacher, student), (self.teacher_heads, self.student_heads)]
        for t_mod, s_mod in pairs:
            for t, s in zip(t_mod.parameters(), s_mod.parameters(), strict=True):
                t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)
