"""What MRN and SERes10 share: four ROI branches -> ROI tokens -> patient vector -> head.

Subclasses implement ``_encode(rois, masks, with_seg)`` (per-ROI tokens and segmentation);
this base class validates inputs, concatenates ROI tokens in ``ROI_NAMES`` order, and
implements ROI masking at inference (paper 4.3.2, Table 4): masking an ROI = its input
replaced by an empty (all-zero) volume. ROI branches are independent until the head, so
masked logits = ``classify_tokens(tokens, masked)`` with the masked ROI's token replaced by
``empty_token(name)`` -- one full forward + 16 head passes for all subsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from mrn_engine.config import ModelConfig, RoiConfig
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError
from mrn_engine.models.head import ClassificationHead
from mrn_engine.models.outputs import MRNOutput


class MultiRoiClassifier(nn.Module):
    """Base class: ROI tokens (B, D) x 4 -> patient (B, 4D) -> logits (B, 2).

    Attributes
    ----------
    arch: ``"mrn"`` or ``"seres10"``.
    needs_masks: whether ``forward`` needs nuclei masks as input (SERes10; MRN with
        ``model.nuclei_pool``).
    token_dim: ROI token width D.
    weights_provenance: where the pretrained weights came from (path, sha256) -- the
        trainer writes it into every checkpoint.
    """

    arch = "base"
    needs_masks = False

    def __init__(self, cfg: ModelConfig, roi_cfg: RoiConfig, token_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.roi_cfg = roi_cfg
        self.image_size = roi_cfg.image_size
        self.slices = dict(roi_cfg.slices)
        self.token_dim = token_dim
        self.head = ClassificationHead(
            len(ROI_NAMES) * token_dim,
            cfg.head_hidden,
            cfg.num_classes,
            cfg.dropout,
            input_norm=cfg.head_input_norm,
        )
        self.weights_provenance: dict = {"backbone": "random-init"}
        self._empty_cache: dict[tuple, torch.Tensor] = {}

    # -- subclass hook ---------------------------------------------------------------------
    def _encode(
        self,
        rois: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None,
        with_seg: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------
    def forward(
        self,
        rois: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        with_seg: bool = True,
    ) -> MRNOutput:
        """``rois[name]``: (B, S, H, W) in [0, 255]; ``masks`` (merged classes) for models with
        ``needs_masks`` (SERes10, MRN with ``nuclei_pool``).

        ``with_seg=False`` skips the DPT segmentation head (diagnosis only): the logits and ROI
        tokens are the same, ``seg_logits`` is None.
        """
        tokens, seg = self._encode(self.check_rois(rois), masks, with_seg)
        patient = self.patient(tokens)
        return MRNOutput(
            logits=self.head(patient), roi_tokens=tokens, seg_logits=seg, patient=patient
        )

    def encode_rois(
        self, rois: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-ROI tokens (B, D), without the segmentation head."""
        return self._encode(self.check_rois(rois), masks, False)[0]

    def patient(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, 4D) patient representation: ROI tokens concatenated in ``ROI_NAMES`` order."""
        return torch.cat([tokens[name] for name in ROI_NAMES], dim=1)

    def classify_tokens(
        self, tokens: Mapping[str, torch.Tensor], masked: Iterable[str] = frozenset()
    ) -> torch.Tensor:
        """Logits (B, 2) from ROI tokens, the ``masked`` ROIs replaced by their empty-volume token."""
        masked = frozenset(masked)
        unknown = masked - set(ROI_NAMES)
        if unknown:
            raise InputDataError(
                f"masked ROI(s) {sorted(unknown)} unknown; ROIs are {list(ROI_NAMES)}"
            )
        batch = next(iter(tokens.values())).shape[0]
        swapped = {n: (self.empty_token(n, batch) if n in masked else tokens[n]) for n in ROI_NAMES}
        return self.head(self.patient(swapped))

    def empty_token(self, name: str, batch: int = 1) -> torch.Tensor:
        """Token (batch, D) of ROI ``name`` when its input is an empty (all-zero) volume.

        Cached in eval mode per weights state (parameters' in-place version counters, device,
        dtype); recomputed in train mode or whenever the weights change.
        """
        if name not in ROI_NAMES:
            raise InputDataError(f"unknown ROI {name!r}; ROIs are {list(ROI_NAMES)}")
        ref = next(self.parameters())
        key = (name, ref.device, ref.dtype, self._weights_version())
        token = self._empty_cache.get(key) if not self.training else None
        if token is None:
            rois = self.empty_inputs(batch=1, device=ref.device)
            masks = self.empty_masks(batch=1, device=ref.device)
            with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
                token = self._encode({name: rois[name]}, {name: masks[name]}, False)[0][name]
            if not self.training:
                self._empty_cache = {k: v for k, v in self._empty_cache.items() if k[3] == key[3]}
                self._empty_cache[key] = token.detach()
        return token.expand(batch, -1)

    def empty_inputs(
        self, batch: int = 1, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All-zero ROI volumes of the configured sizes (what a masked ROI becomes)."""
        s = self.image_size
        return {n: torch.zeros(batch, self.slices[n], s, s, device=device) for n in ROI_NAMES}

    def empty_masks(
        self, batch: int = 1, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All-background masks matching :meth:`empty_inputs`."""
        s = self.image_size
        return {
            n: torch.zeros(batch, self.slices[n], s, s, dtype=torch.long, device=device)
            for n in ROI_NAMES
        }

    def check_rois(self, rois: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Raise :class:`InputDataError` unless ``rois`` has the four ROIs as (B, S, H, W)."""
        missing = [n for n in ROI_NAMES if n not in rois]
        if missing:
            raise InputDataError(
                f"model input: missing ROI(s) {missing}; expected {list(ROI_NAMES)}"
            )
        batch = None
        for name in ROI_NAMES:
            x = rois[name]
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputDataError(f"ROI {name!r}: expected a (B, S, H, W) tensor, got {shape}")
            if x.shape[-2:] != (self.image_size, self.image_size):
                raise InputDataError(
                    f"ROI {name!r}: slices are {tuple(x.shape[-2:])}, the model expects "
                    f"{self.image_size} x {self.image_size} (roi.image_size)"
                )
            if batch is not None and x.shape[0] != batch:
                raise InputDataError(
                    f"ROI {name!r}: batch size {x.shape[0]} differs from the other ROIs ({batch})"
                )
            batch = x.shape[0]
        return rois

    def _weights_version(self) -> int:
        """Fingerprint of the weights: in-place version counters of all parameters and buffers
        (bumped by optimiser steps, ``load_state_dict`` and any in-place edit)."""
        tensors = self.__dict__.get("_state_tensors")
        if tensors is None:
            tensors = [*self.parameters(), *self.buffers()]
            self.__dict__["_state_tensors"] = tensors
        return hash(tuple(t._version for t in tensors))

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): tensors may be replaced
        self.__dict__["_state_tensors"] = None
        self._empty_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group: ``backbone`` (lr_backbone) and ``head`` (lr_head)."""
        raise NotImplementedError
