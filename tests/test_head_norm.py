"""The head's input BatchNorm (cpu-tiny) and its precise statistics after each epoch."""

from __future__ import annotations

import torch

from mrn_engine.config import get_preset
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.models import build_model
from mrn_engine.models.head import ClassificationHead
from mrn_engine.training.dataset import RoiStackDataset
from mrn_engine.training.head_norm import head_input_norm, recalibrate_head_norm


def test_head_input_norm_is_a_config_switch():
    assert not get_preset("paper-vitb").model.head_input_norm  # the paper's head
    assert get_preset("cpu-tiny").model.head_input_norm
    plain = ClassificationHead(8, 4)
    normed = ClassificationHead(8, 4, input_norm=True)
    assert head_input_norm(plain) is None and isinstance(normed.mlp[0], torch.nn.BatchNorm1d)


def test_head_input_norm_accepts_a_single_case_in_training():
    head = ClassificationHead(8, 4, input_norm=True).train()
    x = torch.randn(1, 8)
    out = head(x)
    assert out.shape == (1, 2) and torch.isfinite(out).all()


def test_input_norm_standardises_tiny_case_differences():
    """Patient vectors that differ by 1 % of their size reach the head standardised."""
    torch.manual_seed(0)
    base = torch.randn(1, 16) * 10
    x = base + 0.1 * torch.randn(32, 16)
    norm = ClassificationHead(16, 4, input_norm=True).mlp[0].train()
    z = norm(x)
    assert torch.allclose(z.std(0), torch.ones(16), atol=0.05)
    assert z.mean(0).abs().max() < 1e-4


def _dataset(cfg, n=6):
    s = cfg.roi.image_size
    g = torch.Generator().manual_seed(1)
    data = {
        f"C{i}": {
            name: {
                "image": (torch.rand(cfg.roi.slices[name], s, s, generator=g) * 255).numpy(),
                "mask": torch.zeros(cfg.roi.slices[name], s, s, dtype=torch.long).numpy(),
            }
            for name in ROI_NAMES
        }
        for i in range(n)
    }
    labels = {c: i % 2 for i, c in enumerate(data)}
    return RoiStackDataset(sorted(data), labels, data.__getitem__), data


def test_recalibrate_sets_running_stats_to_the_training_set_features():
    torch.manual_seed(0)
    cfg = get_preset("cpu-tiny")
    model = build_model(cfg, pretrained=False)
    ds, data = _dataset(cfg)
    assert recalibrate_head_norm(model, ds, batch_size=4)
    model.eval()
    with torch.no_grad():
        rois = {
            n: torch.stack([torch.as_tensor(data[c][n]["image"]) for c in ds.case_ids])
            for n in ROI_NAMES
        }
        patient = model.patient(model.encode_rois(rois))
    norm = head_input_norm(model)
    assert torch.allclose(norm.running_mean, patient.mean(0), atol=1e-4)
    assert torch.allclose(norm.running_var, patient.var(0), rtol=1e-3, atol=1e-6)
    assert model.training is False  # mode restored (it was eval)


def test_recalibrate_is_a_no_op_without_input_norm():
    cfg = get_preset("cpu-tiny").replace(model={"head_input_norm": False})
    model = build_model(cfg, pretrained=False)
    ds, _ = _dataset(cfg, n=2)
    assert not recalibrate_head_norm(model, ds)
