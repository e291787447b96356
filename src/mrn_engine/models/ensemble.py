"""The one inference core: eval forward passes, bf16 autocast, mirror TTA and the fold loop.

Used by ``inference.MRNPredictor`` (fold ensemble of a bundle) and by the trainer's
out-of-fold prediction (one fold, the training objective): both go through
:func:`inference_step`, so autocast and the P(PD) read-out are defined once.

TTA = mirror: every ROI stack ``(1, S, H, W)`` gets its in-plane X-flipped copy (``H`` axis),
both views run as one batch, their P(PD) is averaged and the segmentation of the mirrored view
is flipped back before averaging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mrn_engine.errors import WeightsError
from mrn_engine.models.checkpoint import state_mismatch

#: the in-plane X axis of ``(B, S, H, W)`` ROI stacks and of ``(B, C, S, H, W)`` seg logits
MIRROR_DIM = -2


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; nothing elsewhere."""
    if device.type == "cuda" and amp:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def p_pd_of(logits: torch.Tensor) -> torch.Tensor:
    """P(PD) ``(B,)`` from ``(B, 2)`` logits ``[HC, PD]`` (float32 softmax)."""
    return torch.softmax(logits.float(), dim=-1)[:, 1]


def inference_step(
    forward: Callable[[Any], Any], inputs: Any, *, device: torch.device, amp: bool
) -> Any:
    """``forward(inputs)`` under ``inference_mode`` and :func:`autocast`."""
    with torch.inference_mode(), autocast(device, amp):
        return forward(inputs)


def mirror_views(x: torch.Tensor) -> torch.Tensor:
    """``(1, ...)`` -> ``(2, ...)``: the input and its mirror along the in-plane X axis."""
    return torch.cat([x, torch.flip(x, dims=(MIRROR_DIM,))], dim=0)


def merge_views(p: torch.Tensor) -> torch.Tensor:
    """``(V, C, S, H, W)`` per-view probabilities -> ``(C, S, H, W)``, mirrored view flipped back."""
    if p.shape[0] == 2:
        p = torch.stack([p[0], torch.flip(p[1], dims=(MIRROR_DIM,))])
    return p.mean(dim=0)


@dataclass
class FoldOutput:
    """One fold's forward pass over one case.

    Attributes
    ----------
    fold: fold index.
    p_pd: P(PD), mean over the TTA views.
    tokens: ROI name -> tokens ``(V, D)`` on CPU (float32), ``V`` = number of views.
    seg: ROI name -> class probabilities ``(C, S, H, W)`` on CPU (views merged), or None.
    p_views: P(PD) of each view (original, mirrored with TTA).
    """

    fold: int
    p_pd: float
    tokens: dict[str, torch.Tensor]
    seg: dict[str, torch.Tensor] | None
    p_views: tuple[float, ...] = ()


class FoldEnsemble:
    """One network whose per-fold weights are swapped in with ``load_state_dict``.

    Parameters
    ----------
    model: the network (``forward(images[, masks]) -> MRNOutput``).
    fold_states: fold index -> ``state_dict`` (kept in memory).
    device: where the network runs.
    amp: bf16 autocast on CUDA.
    tta: mirror test-time augmentation.
    describe: fold index -> where its weights came from (for error messages).
    """

    def __init__(
        self,
        model: nn.Module,
        fold_states: Mapping[int, Mapping[str, torch.Tensor]],
        *,
        device: torch.device,
        amp: bool = False,
        tta: bool = False,
        describe: Callable[[int], str] = lambda k: f"fold {k}",
    ) -> None:
        if not fold_states:
            raise WeightsError("predictor: no fold weights given")
        self.device = device
        self.model = model.to(device).eval()
        self.fold_states = {int(k): dict(v) for k, v in sorted(fold_states.items())}
        self.folds = list(self.fold_states)
        self.amp = amp
        self.tta = tta
        self.describe = describe
        self._loaded: int | None = None
        for k in self.folds:  # fail early on weights of another model
            self.load(k)

    def load(self, k: int) -> None:
        """Swap fold ``k``'s weights in (no-op when already loaded)."""
        if self._loaded == k:
            return
        try:
            self.model.load_state_dict(self.fold_states[k])
        except RuntimeError as e:
            raise WeightsError(
                f"{self.describe(k)}: weights do not fit the configured model "
                f"({state_mismatch(self.model, self.fold_states[k]) or str(e).splitlines()[0]})"
            ) from e
        self.model.eval()
        self._loaded = k

    def load_other(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights that are not a fold's as given (e.g. site-adapted ones); the next
        :meth:`load` reloads its fold."""
        self.model.load_state_dict(state)
        self.model.eval()
        self._loaded = None

    def step(self, forward: Callable[[Any], Any], inputs: Any) -> Any:
        """:func:`inference_step` on this ensemble's device and autocast setting."""
        return inference_step(forward, inputs, device=self.device, amp=self.amp)

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, ...)`` -> ``(V, ...)`` on the device (``V`` = 2 with TTA)."""
        return (mirror_views(x) if self.tta else x).to(self.device)

    def forward(
        self,
        images: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        with_seg: bool = True,
    ) -> FoldOutput:
        """The loaded fold on one case; inputs ``(1, S, H, W)`` per ROI (views added here).

        ``with_seg=False``: diagnosis only, the model's segmentation head is skipped.
        """
        x = {n: self.views(t) for n, t in images.items()}
        m = None if masks is None else {n: self.views(t) for n, t in masks.items()}
        kw = {} if with_seg else {"with_seg": False}  # stand-in models know only the default
        out = self.step(lambda i: self.model(i, **kw) if m is None else self.model(i, m, **kw), x)
        tokens = {k: v.detach().float().cpu() for k, v in (out.roi_tokens or {}).items()}
        seg = None
        if getattr(out, "seg_logits", None):
            seg = {
                n: merge_views(torch.softmax(lg.float(), dim=1)).cpu()
                for n, lg in out.seg_logits.items()
            }
        views = p_pd_of(out.logits)
        fold = -1 if self._loaded is None else self._loaded
        return FoldOutput(
            fold=fold,
            p_pd=float(views.mean()),
            tokens=tokens,
            seg=seg,
            p_views=tuple(float(v) for v in views),
        )

    def run(
        self,
        images: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        with_seg: bool = True,
    ) -> Iterator[FoldOutput]:
        """:meth:`forward` with every fold, in fold order."""
        for k in self.folds:
            self.load(k)
            yield self.forward(images, masks, with_seg=with_seg)
