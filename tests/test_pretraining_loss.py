"""AnatCL's kernelised (y-aware) contrastive loss: limits, gradients, learning (models/yaware.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mrn_engine.errors import ConfigError
from mrn_engine.models.yaware import (
    anatcl_floor,
    anatcl_loss,
    rbf_kernel,
    weight_entropy,
    yaware_loss,
)


def supcon_reference(z: torch.Tensor, groups: list[int], tau: float) -> float:
    """SupCon L_out (Khosla et al., Eq. 2), written out with loops."""
    z = F.normalize(z.double(), dim=1)
    n = len(groups)
    total = 0.0
    for i in range(n):
        others = [k for k in range(n) if k != i]
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in others)
        pos = [p for p in others if groups[p] == groups[i]]
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
    return total / n


def test_indicator_kernel_gives_supervised_contrastive():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 5, generator=g)
    groups = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 1]
    w = torch.tensor([[float(a == b) for b in groups] for a in groups])
    got = float(yaware_loss(z, w, temperature=0.2))
    assert got == pytest.approx(supcon_reference(z, groups, 0.2), rel=1e-5)


def test_rbf_on_grouped_descriptors_gives_supcon_on_those_groups():
    """Descriptors equal within a group and far apart between: the RBF kernel is 1 / ~0."""
    g = torch.Generator().manual_seed(1)
    case_group = [0, 1, 0, 2, 1, 2]  # 6 cases, 2 views each
    desc = torch.tensor([[10.0 * k, -5.0 * k] for k in case_group])
    z = torch.randn(12, 4, generator=g)
    got = float(anatcl_loss(z, desc, sigma=0.5, temperature=0.1, variant="global"))
    assert got == pytest.approx(supcon_reference(z, case_group * 2, 0.1), rel=1e-5)
    # the local variant with one region holding every column is the global one
    local = anatcl_loss(z, desc, sigma=0.5, temperature=0.1, variant="local", groups=[[0, 1]])
    assert float(local) == pytest.approx(got, rel=1e-6)


def test_view_pairs_only_gives_nt_xent():
    """Distinct descriptors at a tiny sigma: only the other view of the same case is positive."""
    g = torch.Generator().manual_seed(2)
    desc = torch.arange(5, dtype=torch.float32)[:, None] * 100.0
    z = torch.randn(10, 3, generator=g)
    got = float(anatcl_loss(z, desc, sigma=1e-3, temperature=0.5))
    assert got == pytest.approx(supcon_reference(z, list(range(5)) * 2, 0.5), rel=1e-5)


def test_kernel_weights_change_the_loss_and_sigma_interpolates():
    g = torch.Generator().manual_seed(3)
    desc = torch.randn(8, 6, generator=g)
    z = torch.randn(16, 4, generator=g)
    k = rbf_kernel(desc, 1.0)
    assert torch.allclose(k.diagonal(), torch.ones(8)) and torch.allclose(k, k.t())
    assert float(k.min()) > 0 and float(k.max()) <= 1.0
    values = [float(anatcl_loss(z, desc, sigma=s)) for s in (1e-3, 1.0, 1e3)]
    assert len({round(v, 6) for v in values}) == 3  # the kernel matters
    # sigma -> infinity: every pair equally weighted (uniform over the 2B - 1 others)
    uniform = yaware_loss(z, torch.ones(16, 16), 0.1)
    assert values[2] == pytest.approx(float(uniform), rel=1e-4)


def test_local_variant_averages_one_loss_per_region():
    g = torch.Generator().manual_seed(4)
    desc = torch.randn(6, 4, generator=g)
    z = torch.randn(12, 3, generator=g)
    groups = [[0, 1], [2, 3]]
    local = anatcl_loss(z, desc, variant="local", groups=groups)
    parts = [anatcl_loss(z, desc[:, grp], variant="global") for grp in groups]
    assert float(local) == pytest.approx(float(sum(parts) / 2), rel=1e-6)
    assert float(local) != pytest.approx(float(anatcl_loss(z, desc, variant="global")), rel=1e-3)


def test_gradients_are_finite_even_without_positives():
    z = torch.randn(8, 4, requires_grad=True)
    w = torch.zeros(8, 8)
    w[0, 1] = w[1, 0] = 1.0  # anchors 2..7 have no positive: they contribute 0
    loss = yaware_loss(z, w, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    z2 = torch.zeros(4, 3, requires_grad=True)  # degenerate embeddings
    anatcl_loss(z2, torch.randn(2, 3), variant="local", groups=[[0], [1, 2]]).backward()
    assert torch.isfinite(z2.grad).all()


def test_loss_decreases_and_embedding_follows_the_descriptor():
    """Free embeddings of 16 cases (2 noisy views each) trained on a 1-D descriptor."""
    torch.manual_seed(0)
    desc = torch.linspace(-2, 2, 16)[:, None]
    base = torch.nn.Parameter(torch.randn(16, 8))
    opt = torch.optim.Adam([base], lr=0.05)
    losses = []
    for _ in range(150):
        z = torch.cat([base + 0.05 * torch.randn_like(base) for _ in range(2)])
        loss = anatcl_loss(z, desc, sigma=0.5, temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3
    zn = F.normalize(base.detach(), dim=1)
    sim = zn @ zn.t()
    near = torch.stack([sim[i, i + 1] for i in range(15)]).mean()
    far = torch.stack([sim[i, 15 - i] for i in range(6)]).mean()  # opposite ends
    assert float(near) > float(far) + 0.3


def test_bad_arguments_are_config_errors():
    z, d = torch.randn(6, 3), torch.randn(3, 2)
    with pytest.raises(ConfigError, match="variant"):
        anatcl_loss(z, d, variant="regional")
    with pytest.raises(ConfigError, match="groups"):
        anatcl_loss(z, d, variant="local")
    with pytest.raises(ConfigError, match="whole number of views"):
        anatcl_loss(torch.randn(7, 3), d)
    with pytest.raises(ConfigError, match="sigma"):
        rbf_kernel(d, 0.0)


def test_floor_bounds_the_loss_and_flags_an_uninformative_kernel():
    g = torch.Generator().manual_seed(5)
    desc = torch.randn(8, 5, generator=g)
    assert float(weight_entropy(torch.ones(16, 16))) == pytest.approx(math.log(15), rel=1e-6)
    for sigma in (0.3, 1.0, 5.0):
        floor = float(anatcl_floor(desc, sigma=sigma))
        for _ in range(5):
            z = torch.randn(16, 4, generator=g)
            assert float(anatcl_loss(z, desc, sigma=sigma)) >= floor - 1e-5
    # wide kernels approach the collapsed value log(2B - 1); narrow ones approach log(1) = 0
    assert float(anatcl_floor(desc, sigma=100.0)) == pytest.approx(math.log(15), abs=1e-3)
    assert float(anatcl_floor(desc, sigma=0.01)) == pytest.approx(0.0, abs=1e-3)
    local = anatcl_floor(desc, sigma=1.0, variant="local", groups=[[0, 1], [2, 3, 4]])
    parts = [anatcl_floor(desc[:, grp], sigma=1.0) for grp in ([0, 1], [2, 3, 4])]
    assert float(local) == pytest.approx(float(sum(parts) / 2), rel=1e-6)


def test_roi_variant_scores_each_roi_embedding_against_its_own_kernel():
    torch.manual_seed(0)
    desc = torch.randn(6, 5)
    groups = [[0, 1], [2, 3, 4]]
    z = torch.randn(2, 12, 8)  # two ROIs, 2 views x 6 cases each
    got = anatcl_loss(z, desc, sigma=0.5, variant="roi", groups=groups)
    want = [anatcl_loss(z[r], desc[:, g], sigma=0.5) for r, g in enumerate(groups)]
    assert float(got) == pytest.approx(float(torch.stack(want).mean()), rel=1e-6)
    # each ROI answers to its own descriptors: swapping the kernels changes the loss
    swapped = anatcl_loss(z.flip(0), desc, sigma=0.5, variant="roi", groups=groups)
    assert float(swapped) != pytest.approx(float(got), rel=1e-3)
    with pytest.raises(ConfigError, match="one embedding per ROI"):
        anatcl_loss(z[0], desc, variant="roi", groups=groups)  # a case-level embedding
    with pytest.raises(ConfigError, match="one embedding per ROI"):
        anatcl_loss(z, desc, variant="roi", groups=[[0, 1]])  # too few groups
