"""Per-slice evidence: how much each slice's token moves P(PD), head-side only.

SFA (paper 3.2) pools the slice tokens of one ROI into its ROI token. Leaving slice ``s`` out
of that pooling is a key mask over the slice tokens (:meth:`SFA.forward` ``keep``), run on the
cached FFA outputs (the slice tokens that entered SFA) -- no new backbone pass. The FFA outputs
of the other slices are unchanged (they saw slice ``s`` in FFA's global attention); "left out"
means left out of SFA, exactly what a forward with slice ``s`` deleted from SFA's input gives.

Definitions, per case (batch row), ROI ``r`` and slice ``s``:

- ``p_full``: P(PD) with every slice (and the ``masked`` ROIs replaced by their empty token);
- ``p_without[r][s]``: P(PD) with slice ``s`` of ROI ``r`` left out of SFA;
- ``evidence[r][s] = p_full - p_without[r][s]``: > 0 the slice pushes towards PD, < 0 towards HC;
- ``attention[r][s]``: the SFA ROI token's attention on slice ``s`` in the last SFA block,
  averaged over heads (the remaining mass is on the ROI token itself).

With a **healthy reference** (``reference``: ROI -> (S, D) tokens, the mean slice token of
healthy training cases at each position, ``training/reference_slices.py``) slice ``s`` is not
left out but **replaced** by its reference token, every slice still attended:

- ``p_without[r][s]``: P(PD) with slice ``s`` of ROI ``r`` looking healthy;
- ``evidence[r][s] = p_full - p_without[r][s]``: what this slice's departure from healthy adds.

A case whose slice tokens equal the reference has evidence 0 everywhere. A masked ROI's token
is its empty-volume token whatever its slices: its evidence is 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError


@dataclass
class SliceEvidence:
    """Leave-one-slice-out evidence of a batch.

    Attributes
    ----------
    p_full: (B,) P(PD) with all slices.
    p_without: ROI name -> (B, S) P(PD) with that slice left out of SFA.
    evidence: ROI name -> (B, S) ``p_full - p_without`` (PD-ward > 0, HC-ward < 0).
    attention: ROI name -> (B, S) SFA ROI-token attention on each slice (last block).
    masked: ROIs replaced by their empty-volume token (their evidence is 0).
    method: ``"reference"`` (slice replaced by its healthy reference) or ``"leave-out"``.
    """

    p_full: torch.Tensor
    p_without: dict[str, torch.Tensor]
    evidence: dict[str, torch.Tensor]
    attention: dict[str, torch.Tensor]
    masked: frozenset[str]
    method: str = "leave-out"


def _res(model: nn.Module) -> nn.Module:
    res = getattr(model, "res", None)
    if res is None or getattr(res, "slice_pos", None) is None:
        raise InputDataError(
            f"per-slice evidence needs MRN slice tokens; model {type(model).__name__} "
            "(baseline or DINOv2-only) has none"
        )
    return res


def supports_slice_evidence(model: nn.Module) -> bool:
    """Whether ``model`` has MRN slice tokens (per-slice evidence); False for baselines (SERes10)."""
    res = getattr(model, "res", None)
    return res is not None and getattr(res, "slice_pos", None) is not None


@contextlib.contextmanager
def capture_slice_tokens(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every RES forward stores its SFA input (B, S, D) under the ROI name.

    A forward hook on the shared RES: the prediction forward also fills the evidence cache.
    """
    res = _res(model)
    store: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        name = args[1] if len(args) > 1 else kwargs.get("roi")
        tokens = getattr(out, "slice_tokens", None)
        if name is not None and tokens is not None:
            store[str(name)] = tokens.detach()

    handle = res.register_forward_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def pool_slices(model: nn.Module, slice_tokens: torch.Tensor, keep: torch.Tensor | None = None):
    """ROI token (B, D) from slice tokens (B, S, D), only the ``keep`` (B, S) slices attended."""
    res = _res(model)
    if res.sfa is not None:
        return res.sfa(slice_tokens, keep)
    if keep is None:
        return slice_tokens.mean(dim=1)
    w = keep.to(slice_tokens.dtype)[..., None]
    return (slice_tokens * w).sum(dim=1) / w.sum(dim=1)


def pool_with_attention(
    model: nn.Module, slice_tokens: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pool_slices` and the (B, S) last-block ROI-token attention, in one SFA pass."""
    res = _res(model)
    if res.sfa is None or not len(res.sfa.blocks):
        b, s = slice_tokens.shape[:2]
        uniform = torch.full((b, s), 1.0 / s, device=slice_tokens.device)
        return pool_slices(model, slice_tokens, keep), uniform
    token, rows = res.sfa.forward_with_attention(slice_tokens, keep)
    return token, rows[-1][:, 1:]


def _p_pd(model: nn.Module, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
    logits = model.head(model.patient(tokens))
    return torch.softmax(logits.float(), dim=-1)[:, 1]


def with_slice_copies(
    t: torch.Tensor, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B + B*S, S, D)`` rows: the case ``t`` (B, S, D), then per case one copy per slice ``j``
    with slice ``j`` replaced by ``reference[j]`` (``reference`` (S, D)); without a reference
    the copies are the case again and the returned key mask leaves slice ``j`` out."""
    b, s, d = t.shape
    if reference is not None:
        copies = t[:, None].expand(b, s, s, d).clone()
        idx = torch.arange(s, device=t.device)
        copies[:, idx, idx] = reference.to(device=t.device, dtype=t.dtype)
        return torch.cat([t, copies.reshape(b * s, s, d)]), None
    drop = ~torch.eye(s, dtype=torch.bool, device=t.device)
    keep = torch.cat([torch.ones(b, s, dtype=torch.bool, device=t.device), drop.repeat(b, 1)])
    return torch.cat([t, t.repeat_interleave(s, dim=0)]), keep


def slice_evidence(
    model: nn.Module,
    slice_tokens: Mapping[str, torch.Tensor],
    masked: Iterable[str] = (),
    empty: Mapping[str, torch.Tensor] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> SliceEvidence:
    """P(PD) with each ROI slice left out (or made healthy), from cached SFA inputs.

    Parameters
    ----------
    model: an MRN (eval mode) whose RES produced ``slice_tokens``.
    slice_tokens: ROI name -> (B, S, D) slice tokens after FFA (:func:`capture_slice_tokens`).
    masked: ROIs replaced by their empty-volume token (``model.empty_token``).
    empty: ROI name -> (1, D) empty-volume tokens already computed for these weights (e.g. the
        predictor's masking cache): used instead of ``model.empty_token``, which would run the
        ROI encoder again after a fold swap.
    reference: ROI name -> (S, D) healthy reference tokens of these weights: replace each
        slice by its reference instead of leaving it out (module docstring).

    Cost: per ROI one SFA pass over the case and its B*S copies, one head pass over all
    copies; no backbone.
    """
    masked = frozenset(masked)
    unknown = masked - set(ROI_NAMES)
    missing = [n for n in ROI_NAMES if n not in slice_tokens]
    if unknown or missing:
        raise InputDataError(
            f"slice evidence: unknown masked ROI(s) {sorted(unknown)} / missing slice tokens "
            f"{missing}; ROIs are {list(ROI_NAMES)}"
        )
    if reference is not None:
        check_reference(reference, slice_tokens)
    with torch.inference_mode():
        batch = next(iter(slice_tokens.values())).shape[0]

        def empty_token(n: str, like: torch.Tensor) -> torch.Tensor:
            if empty is not None and n in empty:
                return empty[n].to(device=like.device, dtype=like.dtype).expand(batch, -1)
            return model.empty_token(n, batch)

        # per ROI one SFA pass: the case's own row(s), then one copy per slice with that slice
        # replaced by its reference (or left out by the key mask)
        pooled, attention, sizes = {}, {}, {}
        for name in ROI_NAMES:
            t = slice_tokens[name]
            x, keep = t, None
            if name not in masked and (reference is not None or t.shape[1] > 1):
                sizes[name] = t.shape[1]
                x, keep = with_slice_copies(t, None if reference is None else reference[name])
            token, att = pool_with_attention(model, x, keep)
            pooled[name] = token
            attention[name] = att[:batch].float()
        base = {
            n: (empty_token(n, slice_tokens[n]) if n in masked else pooled[n][:batch])
            for n in ROI_NAMES
        }
        p_full = _p_pd(model, base)
        p_without, evidence = {}, {}
        if sizes:  # one head pass for every ROI's copies, the other ROIs at their own token
            toks = {
                n: torch.cat(
                    [
                        pooled[n][batch:] if n == r else base[n].repeat_interleave(k, dim=0)
                        for r, k in sizes.items()
                    ]
                )
                for n in ROI_NAMES
            }
            p_copies = _p_pd(model, toks).split([batch * k for k in sizes.values()])
            p_without = {
                r: p.reshape(batch, k) for (r, k), p in zip(sizes.items(), p_copies, strict=True)
            }
        for name in ROI_NAMES:
            if name not in p_without:  # masked (empty token) or nothing to leave out
                s = slice_tokens[name].shape[1]
                p_without[name] = p_full[:, None].expand(batch, s).clone()
            evidence[name] = p_full[:, None] - p_without[name]
    method = "leave-out" if reference is None else "reference"
    return SliceEvidence(p_full, p_without, evidence, attention, masked, method)


def check_reference(
    reference: Mapping[str, torch.Tensor], slice_tokens: Mapping[str, torch.Tensor]
) -> None:
    """``InputDataError`` unless every ROI has a reference of shape (S, D) of its slice tokens."""
    for name, t in slice_tokens.items():
        ref = reference.get(name)
        if ref is None or tuple(ref.shape) != tuple(t.shape[1:]):
            got = "none" if ref is None else tuple(ref.shape)
            raise InputDataError(
                f"slice evidence: the healthy reference of ROI {name} has shape {got}, the "
                f"slice tokens (S, D) = {tuple(t.shape[1:])}; refit it for these weights"
            )
