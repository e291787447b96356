"""Classification head (paper 3.3.1, Eq. 6-7): a 2-layer MLP with dropout on the patient vector."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """[BatchNorm1d] -> Linear(4D, hidden) -> ReLU -> Dropout(p) -> Linear(hidden, 2).

    ``input_norm`` (``ModelConfig.head_input_norm``) standardises each feature of the patient
    vector across cases (BatchNorm1d, running statistics at inference), like the feature
    scaling in front of a linear classifier. The paper's head has none: with a pretrained
    DINOv2 the ROI tokens already differ between patients. A randomly initialised backbone
    (``cpu-tiny``) gives tokens that differ between cases by about 5 % of their magnitude;
    unscaled, the head's ReLUs die and the network predicts one class (docs/results.md).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        num_classes: int = 2,
        dropout: float = 0.5,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)] if input_norm else []
        layers += [
            nn.Linear(in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        ]
        self.mlp = nn.Sequential(*layers)

    def forward(self, patient: torch.Tensor) -> torch.Tensor:
        norm = self.mlp[0]
        if isinstance(norm, nn.BatchNorm1d) and self.training and patient.shape[0] == 1:
            # one case has no batch statistics: use the running ones for this step
            return self.mlp[1:](
                nn.functional.batch_norm(
                    patient,
                    norm.running_mean,
                    norm.running_var,
                    norm.weight,
                    norm.bias,
                    False,
                    0.0,
                    norm.eps,
                )
            )
        return self.mlp(patient)
