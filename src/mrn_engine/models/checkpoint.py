"""Model state dicts as safetensors with ``config.json`` beside (atomic writes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mrn_engine.config import RunConfig
from mrn_engine.errors import ConfigError, WeightsError
from mrn_engine.fileio import make_temp_file, publish
from mrn_engine.models.factory import build_model
from mrn_engine.models.multiroi import MultiRoiClassifier

PROVENANCE_KEY = "weights_provenance"


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` does not fit ``model``: shape mismatches (key, file vs model shape),
    missing and unexpected keys; ``""`` when it fits."""
    expected = model.state_dict()
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if not (wrong or missing or unexpected):
        return ""
    return (
        f"{len(wrong)} shape mismatch(es) {wrong[:3]}, {len(missing)} missing key(s) "
        f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
    )


def check_state_fits(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> None:
    """:class:`WeightsError` naming ``path`` and the mismatching keys and shapes, if any."""
    problem = state_mismatch(model, state)
    if problem:
        raise WeightsError(f"{path}: weights do not fit the configured model: {problem}")


def save_model(model: MultiRoiClassifier, path: str | os.PathLike, run_cfg: RunConfig) -> Path:
    """Write ``model``'s state dict to ``path`` (``.safetensors``) and ``config.json`` beside it.

    Both files go through a temporary file + ``os.replace``; the weights' provenance is stored
    in the safetensors metadata. Returns ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: model files must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {PROVENANCE_KEY: json.dumps(model.weights_provenance), "arch": model.arch}
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        publish(tmp, path)  # safetensors writes 0600: give the file the umask's mode
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    run_cfg.save(path.parent / "config.json")
    return path


def load_model(
    path: str | os.PathLike, run_cfg: RunConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[MultiRoiClassifier, RunConfig]:
    """Rebuild a model from ``path`` (.safetensors) and ``config.json`` beside it (or ``run_cfg``).

    Returns the model in eval mode on ``device`` and its configuration.

    Raises
    ------
    WeightsError: missing/corrupt file or weights that do not fit the configuration.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: model file not found")
    if run_cfg is None:
        run_cfg = RunConfig.load(path.parent / "config.json")
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"{path}: cannot read model weights ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    model = build_model(run_cfg, pretrained=False)
    problem = state_mismatch(model, state)
    if problem:
        raise WeightsError(
            f"{path}: weights do not fit the configuration in config.json "
            f"(preset {run_cfg.preset!r}): {problem}"
        )
    model.load_state_dict(state, strict=True)
    if PROVENANCE_KEY in metadata:
        model.weights_provenance = json.loads(metadata[PROVENANCE_KEY])
    return model.to(device).eval(), run_cfg
