"""Run-time helpers every layer shares: the torch device, RNG seeding, file hashes."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

from mrn_engine.errors import ConfigError, WeightsError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda[:n]`` / ``mps`` into a ``torch.device`` that exists.

    ``auto`` = CUDA, then Apple MPS, then CPU. ``ConfigError`` for an unknown name or a
    device this machine does not have.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: not a device name (auto, cpu, cuda, mps)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"device {device!r}: MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_finite_state(
    state: dict[str, torch.Tensor], path: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """``state`` unchanged; :class:`WeightsError` naming ``path`` and every NaN/Inf tensor."""
    bad = [
        f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()} values)"
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and (v.is_floating_point() or v.is_complex())
        and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise WeightsError(
            f"{path}: non-finite (NaN/Inf) weights in {len(bad)} tensor(s): "
            + ", ".join(bad[:5])
            + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
            + "; the file is corrupt or training diverged"
        )
    return state
