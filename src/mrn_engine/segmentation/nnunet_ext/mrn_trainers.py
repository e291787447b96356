"""nnU-Net v2 trainer used by ``mrn seg train`` (found by nnU-Net via ``nnUNet_extTrainer``).

This module must import nothing from ``mrn_engine``: nnU-Net imports it as a top-level module
from this folder when it rebuilds a network from a checkpoint (``nnUNetPredictor``).
"""

from __future__ import annotations

import numpy as np
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: the subject's left-right axis in nnU-Net's reader order (Z, Y, X) of a NIfTI file: X
READER_LR_AXIS = 2
#: largest rotation used for augmentation (degrees); small enough that right stays right
MAX_ROTATION_DEG = 15.0


class nnUNetTrainerMRN(nnUNetTrainer):  # noqa: N801 (nnU-Net's class naming)
    """nnU-Net's default trainer with label-safe augmentation for right/left labels.

    The challenge masks give right and left nuclei different labels (SN_R = 1, SN_L = 2 ...).
    nnU-Net's default augmentation mirrors along every axis and, for anisotropic data, rotates
    in-plane by up to 180 degrees: both turn a right nucleus into a left one without changing its
    label. This trainer never mirrors along the left-right axis (neither in training nor in
    test-time augmentation) and limits rotations to +-15 degrees. Schedule attributes
    (``num_epochs``, ``num_iterations_per_epoch``, ...) are set by the caller after construction.
    """

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):  # noqa: N802
        rotation, dummy_2d, _, mirror_axes = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        patch_size = self.configuration_manager.patch_size
        dim = len(patch_size)
        transpose = list(self.plans_manager.transpose_forward)
        lr_axis = transpose.index(READER_LR_AXIS) if dim == 3 else None
        mirror_axes = tuple(a for a in mirror_axes if a != lr_axis)
        limit = MAX_ROTATION_DEG / 360.0 * 2.0 * np.pi
        rotation = (max(rotation[0], -limit), min(rotation[1], limit))
        initial_patch_size = get_patch_size(
            patch_size[-dim:], rotation, rotation, rotation, (0.85, 1.25)
        )
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        self.inference_allowed_mirroring_axes = mirror_axes if mirror_axes else None
        self.print_to_log_file(
            f"MRN trainer: mirror axes {mirror_axes}, rotation +-{MAX_ROTATION_DEG} deg"
        )
        return rotation, dummy_2d, initial_patch_size, mirror_axes
