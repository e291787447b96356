"""Classification head (paper 3.3.1, Eq. 6-7): a 2-layer MLP with dropout on the patient vector."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Linear(4D, hidden) -> ReLU -> Dropout(p) -> Linear(hidden, 2)."""

    def __init__(
        self, in_dim: int, hidden: int, num_classes: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, patient: torch.Tensor) -> torch.Tensor:
        return self.mlp(patient)
