"""AnatCL's kernelised (y-aware) supervised contrastive loss, global and local variants.

AnatCL (Barbano et al., "Anatomical foundation models for brain MRIs") pretrains an encoder
with the y-aware InfoNCE of Dufumier et al.: the positives of an anchor are not a hard set
but every other sample, weighted by a kernel on continuous weak labels (there: age and
per-region cortical thickness, grey-matter volume, surface area; here: per-nucleus volume,
contrast and asymmetry, :mod:`mrn_engine.pretraining.descriptors`).

For ``2B`` embeddings ``z`` (two views of ``B`` cases, L2-normalised) with similarities
``s_ij = z_i . z_j / tau`` and kernel weights ``w_ij = K(d_i, d_j)`` on the cases' descriptors:

    L = -1/(2B) sum_i sum_{j != i} (w_ij / sum_{k != i} w_ik) log( exp(s_ij) / sum_{k != i} exp(s_ik) )

The other view of the same case has ``w = 1`` (identical descriptors), so with a kernel that
is 1 for equal descriptors and 0 otherwise this is SupCon's L_out (Khosla et al.) on the
groups of equal descriptors, and with only the view pairs at 1 it is SimCLR's NT-Xent.

``K`` is an RBF kernel ``exp(-||d_i - d_j||^2 / (2 sigma^2 * n_dims))``: the squared distance is
averaged over the descriptor dimensions, so ``sigma`` is in units of cohort standard
deviations whatever the number of descriptors (equivalent to the plain RBF with bandwidth
``sigma * sqrt(n_dims)``).

Variants (AnatCL 3.2: "local" and "global" descriptors):

* ``global``: one kernel on the whole descriptor vector of a case (all regions together);
* ``local``: one kernel per region on that region's descriptors alone, one loss per region,
  averaged over the regions: two subjects are pulled together by each region in which they
  are anatomically alike, rather than only when alike everywhere.
* ``roi`` (ours): one embedding per MRN ROI (``z`` of shape ``(R, N, d)``), each with the
  kernel of the nuclei inside that ROI only, losses averaged. With one case-level embedding,
  the cpu-tiny ViT learns only the midbrain crop, and nothing when the midbrain nuclei are of
  the challenge's size (docs/pretraining.md, "Per-ROI kernels").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mrn_engine.errors import ConfigError

VARIANTS = ("global", "local", "roi")


def rbf_kernel(desc: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, N) ``exp(-mean_d (x_i - x_j)^2 / (2 sigma^2))`` for descriptors ``desc`` (N, D)."""
    if not sigma > 0:
        raise ConfigError(f"kernel sigma must be > 0, got {sigma}")
    desc = desc.float()
    d2 = (desc[:, None, :] - desc[None, :, :]).pow(2).mean(dim=-1)
    return torch.exp(-d2 / (2.0 * float(sigma) ** 2))


def yaware_loss(z: torch.Tensor, weights: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Kernel-weighted InfoNCE of embeddings ``z`` (N, d) with weights (N, N) >= 0.

    Self-pairs are excluded from numerator and denominator; an anchor whose weights to all
    other samples are 0 contributes 0 (it has no positive).
    """
    n = z.shape[0]
    if weights.shape != (n, n):
        raise ConfigError(f"weights must be ({n}, {n}), got {tuple(weights.shape)}")
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.t() / float(temperature)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    w = weights.to(z.device).float().masked_fill(eye, 0.0)
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-12), torch.zeros_like(w))
    per_anchor = -(w * log_prob.masked_fill(eye, 0.0)).sum(dim=1)
    return per_anchor.mean()


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of the entropy of the normalised off-diagonal weights.

    The kernel-weighted cross-entropy of an anchor is at least this entropy (reached when its
    softmax equals its normalised weights), so it is the loss's floor for these weights; at
    ``log(N - 1)`` (uniform weights, sigma too wide) the kernel carries no information.
    """
    n = weights.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=weights.device)
    w = weights.float().masked_fill(eye, 0.0)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(w * torch.log(w.clamp_min(1e-30))).sum(dim=1).mean()


def anatcl_floor(
    desc: torch.Tensor,
    views: int = 2,
    *,
    sigma: float = 1.0,
    variant: str = "global",
    groups: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The floor of :func:`anatcl_loss` for a batch of descriptors (:func:`weight_entropy`)."""
    full = desc.float().repeat(views, 1)
    if variant == "global" or not groups:
        return weight_entropy(rbf_kernel(full, sigma))
    return torch.stack([weight_entropy(rbf_kernel(full[:, list(g)], sigma)) for g in groups]).mean()


def anatcl_loss(
    z: torch.Tensor,
    desc: torch.Tensor,
    *,
    sigma: float = 1.0,
    temperature: float = 0.1,
    variant: str = "global",
    groups: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """AnatCL loss of ``z`` (V*B, d), views stacked view-major, for case descriptors (B, D).

    Parameters
    ----------
    z: embeddings of ``V`` views of ``B`` cases: rows ``v*B + b``; for ``"roi"``, one such
        matrix per ROI, stacked: ``(R, V*B, d)``.
    desc: standardised descriptors of the ``B`` cases (missing values imputed beforehand).
    sigma: RBF bandwidth in cohort SDs (module docstring).
    variant: ``"global"`` (one kernel on all descriptors), ``"local"`` (one per group) or
        ``"roi"`` (group ``r``'s kernel for ROI embedding ``r``).
    groups: for ``"local"``, the descriptor column indices of each region.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown AnatCL variant {variant!r}; choose one of {VARIANTS}")
    if variant == "roi":
        if not groups or z.ndim != 3 or z.shape[0] != len(groups):
            raise ConfigError(
                "the roi AnatCL variant needs one embedding per ROI (R, N, d) and R groups"
            )
        return torch.stack(
            [
                anatcl_loss(z_r, desc[:, list(g)], sigma=sigma, temperature=temperature)
                for z_r, g in zip(z, groups, strict=True)
            ]
        ).mean()
    b = desc.shape[0]
    if z.shape[0] % b:
        raise ConfigError(f"{z.shape[0]} embeddings for {b} cases: not a whole number of views")
    views = z.shape[0] // b
    full = desc.to(z.device).float().repeat(views, 1)  # (V*B, D), same layout as z
    if variant == "global":
        return yaware_loss(z, rbf_kernel(full, sigma), temperature)
    if not groups:
        raise ConfigError("the local AnatCL variant needs the descriptor groups (regions)")
    losses = [yaware_loss(z, rbf_kernel(full[:, list(g)], sigma), temperature) for g in groups]
    return torch.stack(losses).mean()
