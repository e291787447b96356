"""Per-slice evidence: leave-one-slice-out through the SFA key mask == a forward with the slice
deleted from SFA's input; attention; masked ROIs; models without slice tokens."""

from __future__ import annotations

import pytest
import torch

from mrn_engine.config import get_preset
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError
from mrn_engine.models import build_model
from mrn_engine.models.evidence import (
    capture_slice_tokens,
    slice_evidence,
    supports_slice_evidence,
)

SLICES = {"nm_sn": 3, "qsm_bg": 4, "qsm_midbrain": 2, "qsm_dentate": 3}


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(**model_overrides):
    cfg = get_preset("cpu-tiny").replace(roi={"image_size": 28, "slices": dict(SLICES)})
    cfg = cfg.replace(model={"allow_random_init": True, **model_overrides})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # LayerScale 0.01 at init: make SFA/FFA matter so evidence is not ~0
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(1.0)
    return cfg, model


def images(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.roi.image_size
    return {n: torch.rand(batch, k, s, s, generator=g) * 255 for n, k in cfg.roi.slices.items()}


def p_with_sfa_input(model, rois, roi, change):
    """From scratch: full model forward; SFA of ROI ``roi`` gets ``change(its input)``."""
    calls = {"n": 0}
    current = {"roi": None}

    def res_pre(module, args, kwargs):
        current["roi"] = args[1] if len(args) > 1 else kwargs["roi"]

    def pre_hook(module, args):
        calls["n"] += 1
        return (change(args[0]),) if current["roi"] == roi else None

    h1 = model.res.sfa.register_forward_pre_hook(pre_hook)
    h2 = model.res.register_forward_pre_hook(res_pre, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(rois)
    finally:
        h1.remove()
        h2.remove()
    assert calls["n"] == len(ROI_NAMES)
    return torch.softmax(out.logits, dim=-1)[:, 1]


def p_with_slice_deleted(model, rois, roi, s):
    """From scratch: SFA of ROI ``roi`` gets its input without slice ``s``."""
    return p_with_sfa_input(model, rois, roi, lambda x: torch.cat([x[:, :s], x[:, s + 1 :]], 1))


def p_with_slice_replaced(model, rois, roi, s, token):
    """From scratch: SFA of ROI ``roi`` gets its input with slice ``s`` set to ``token``."""

    def replace(x):
        x = x.clone()
        x[:, s] = token
        return x

    return p_with_sfa_input(model, rois, roi, replace)


def cached(model, rois):
    with torch.no_grad(), capture_slice_tokens(model) as store:
        out = model(rois)
    return out, dict(store)


def test_leave_one_slice_out_equals_forward_with_slice_deleted():
    cfg, model = tiny_model()
    rois = images(cfg)
    out, store = cached(model, rois)
    assert {n: tuple(t.shape) for n, t in store.items()} == {
        n: (2, k, model.token_dim) for n, k in SLICES.items()
    }
    ev = slice_evidence(model, store)
    p_full = torch.softmax(out.logits, dim=-1)[:, 1]
    torch.testing.assert_close(ev.p_full, p_full, atol=1e-6, rtol=0)
    spread = []
    for roi, k in SLICES.items():
        for s in range(k):
            ref = p_with_slice_deleted(model, rois, roi, s)
            assert torch.allclose(ev.p_without[roi][:, s], ref, atol=1e-5, rtol=0), (roi, s)
            torch.testing.assert_close(ev.evidence[roi][:, s], p_full - ref, atol=1e-5, rtol=0)
            spread.append((ref - p_full).abs().max().item())
    assert max(spread) > 1e-4  # leaving slices out does change P(PD): the check can fail


def test_evidence_with_masked_roi_follows_the_toggle():
    cfg, model = tiny_model()
    rois = images(cfg, batch=1, seed=3)
    _, store = cached(model, rois)
    ev = slice_evidence(model, store, masked={"qsm_bg"})
    assert torch.count_nonzero(ev.evidence["qsm_bg"]) == 0
    zeroed = dict(rois, qsm_bg=torch.zeros_like(rois["qsm_bg"]))  # masked = empty input volume
    with torch.no_grad():
        p_masked = torch.softmax(model(zeroed).logits, dim=-1)[:, 1]
    torch.testing.assert_close(ev.p_full, p_masked, atol=1e-5, rtol=0)
    ref = p_with_slice_deleted(model, zeroed, "nm_sn", 1)
    torch.testing.assert_close(ev.p_without["nm_sn"][:, 1], ref, atol=1e-5, rtol=0)
    unmasked = slice_evidence(model, store)
    assert not torch.allclose(unmasked.evidence["nm_sn"], ev.evidence["nm_sn"])
    # given empty tokens (a predictor's masking cache) are used instead of model.empty_token
    with torch.no_grad():
        empty = {"qsm_bg": model.empty_token("qsm_bg", 1).clone()}
    given = slice_evidence(model, store, masked={"qsm_bg"}, empty=empty)
    torch.testing.assert_close(given.evidence["nm_sn"], ev.evidence["nm_sn"], atol=1e-7, rtol=0)
    other = slice_evidence(model, store, masked={"qsm_bg"}, empty={"qsm_bg": empty["qsm_bg"] + 1})
    assert not torch.allclose(other.p_full, ev.p_full)  # the given token is the one used


def test_attention_is_the_roi_token_softmax_row():
    cfg, model = tiny_model()
    _, store = cached(model, images(cfg))
    ev = slice_evidence(model, store)
    for roi, k in SLICES.items():
        a = ev.attention[roi]
        assert a.shape == (2, k)
        assert (a > 0).all() and (a.sum(dim=1) < 1).all()  # the rest is on the ROI token
    # a key mask removes a slice from the softmax: its weight is 0, the others renormalise
    t = store["nm_sn"]
    keep = torch.tensor([[True, False, True]] * 2)
    with torch.no_grad():
        rows = model.res.sfa.roi_attention(t, keep)
        kept = model.res.sfa.roi_attention(t[:, [0, 2]])
    assert torch.all(rows[0][:, 2] == 0)
    torch.testing.assert_close(rows[:, :, [0, 1, 3]], kept, atol=1e-6, rtol=0)


def test_mean_pooling_ablation_and_unsupported_models():
    cfg, model = tiny_model(use_sfa=False)
    rois = images(cfg, batch=1)
    out, store = cached(model, rois)
    ev = slice_evidence(model, store)
    t = store["qsm_bg"]
    toks = {n: store[n].mean(dim=1) for n in ROI_NAMES}
    toks["qsm_bg"] = t[:, 1:].mean(dim=1)  # slice 0 left out of the mean
    with torch.no_grad():
        ref = torch.softmax(model.head(model.patient(toks)), dim=-1)[:, 1]
    torch.testing.assert_close(ev.p_without["qsm_bg"][:, 0], ref, atol=1e-6, rtol=0)
    _, base = tiny_model(dinov2_only=True)
    assert supports_slice_evidence(model) and not supports_slice_evidence(base)
    with pytest.raises(InputDataError, match="slice tokens"):
        slice_evidence(base, store)
    with pytest.raises(InputDataError, match="unknown masked"):
        slice_evidence(model, store, masked={"putamen"})


def test_content_free_roi_has_evidence_from_removal_and_slice_position():
    """Issue 15: leave-one-out is not content alone. With every slice the same neutral image, a
    slice still has evidence: an offset shared by all slices (one slice fewer in SFA's softmax
    shifts weight onto the ROI token) plus a profile that comes from the slice position
    embedding only (it vanishes when all positions share one embedding)."""
    cfg, model = tiny_model()
    rois = images(cfg, batch=1, seed=5)
    rois["nm_sn"] = torch.full_like(rois["nm_sn"], 25.5)  # content-free: neutral tissue
    with torch.no_grad():
        model.res.slice_pos.copy_(torch.randn(model.res.slice_pos.shape) * 0.5)
    _, store = cached(model, rois)
    ev = slice_evidence(model, store).evidence["nm_sn"][0]
    assert ev.abs().min() > 1e-4  # no content, yet every slice "moves" P(PD)
    assert ev.max() - ev.min() > 1e-4  # and the slices differ: by position
    ref = p_with_slice_deleted(model, rois, "nm_sn", 2)  # it is what a real deletion does
    torch.testing.assert_close(
        slice_evidence(model, store).p_without["nm_sn"][:, 2], ref, atol=1e-5, rtol=0
    )
    with torch.no_grad():
        model.res.slice_pos.copy_(model.res.slice_pos[:, :1].expand_as(model.res.slice_pos))
    _, store = cached(model, rois)
    same = slice_evidence(model, store).evidence["nm_sn"][0]
    torch.testing.assert_close(same, same[:1].expand_as(same), atol=1e-6, rtol=0)  # no profile
    assert same.abs().min() > 1e-4  # the removal offset stays


def test_healthy_reference_replaces_the_slice_token():
    """Evidence against a healthy reference == a forward whose SFA sees that slice's token
    swapped for the reference; a case that looks like the reference has no evidence."""
    cfg, model = tiny_model()
    rois = images(cfg)
    _, store = cached(model, rois)
    _, healthy = cached(model, images(cfg, batch=3, seed=9))
    reference = {n: t.mean(dim=0) for n, t in healthy.items()}  # (S, D) per ROI
    ev = slice_evidence(model, store, reference=reference)
    assert ev.method == "reference" and slice_evidence(model, store).method == "leave-out"
    for roi, k in SLICES.items():
        for s in range(k):
            p = p_with_slice_replaced(model, rois, roi, s, reference[roi][s])
            torch.testing.assert_close(ev.p_without[roi][:, s], p, atol=1e-5, rtol=0)
    assert max(ev.evidence[n].abs().max().item() for n in ROI_NAMES) > 1e-4  # can fail
    # not leave-one-out: the two measures differ
    assert not torch.allclose(ev.evidence["nm_sn"], slice_evidence(model, store).evidence["nm_sn"])
    # a case whose slice tokens are the reference: nothing to replace, evidence 0 everywhere
    same = {n: r[None].expand(2, -1, -1).clone() for n, r in reference.items()}
    zero = slice_evidence(model, same, reference=reference)
    for n in ROI_NAMES:
        torch.testing.assert_close(
            zero.evidence[n], torch.zeros_like(zero.evidence[n]), atol=1e-6, rtol=0
        )
    # masked ROIs still carry no evidence; a reference of another shape is refused
    masked = slice_evidence(model, store, masked={"qsm_bg"}, reference=reference)
    assert torch.count_nonzero(masked.evidence["qsm_bg"]) == 0
    bad = dict(reference, nm_sn=reference["nm_sn"][:2])
    with pytest.raises(InputDataError, match="healthy reference of ROI nm_sn"):
        slice_evidence(model, store, reference=bad)
