"""Per-epoch training checkpoints: safetensors weights + JSON state + optimiser state.

Layout of a fold's checkpoint folder::

    checkpoints/epoch_0003/state.safetensors   # objective state_dict (student, teacher, banks)
    checkpoints/epoch_0003/state.json          # config, epoch, rng states (lists), metrics, weights provenance
    checkpoints/epoch_0003/optimizer.pt        # optimiser state_dict (load: weights_only=True)
    checkpoints/last.json                      # pointer to the newest complete epoch (written last)

Every file is written to a temporary name and moved in with ``os.replace``; ``last.json`` is
replaced only after the epoch's folder is complete, so a crash at any moment leaves the
previous checkpoint intact and never a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mrn_engine.config import atomic_write_text
from mrn_engine.errors import WeightsError

LAST = "last.json"


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a ``state_dict`` as safetensors, atomically (shared storage is copied)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp))
    return path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors ``state_dict``; a missing or damaged file raises ``WeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (for optimiser state dicts)."""
    path = Path(path)
    _atomic(path, lambda tmp: torch.save(obj, tmp))
    return path


def load_torch(path: str | os.PathLike) -> Any:
    """``torch.load(..., weights_only=True)`` with a clear error."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: file not found") from e
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here
        raise WeightsError(f"{path}: cannot be read as a weights-only torch file ({e})") from e


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON-serialisable lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = states["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))


def save_checkpoint(
    folder: str | os.PathLike,
    epoch: int,
    state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    info: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of a finished ``epoch`` (1-based) and point ``last.json`` to it.

    ``info`` (config, metrics ...) is stored in ``state.json`` with the epoch and RNG states.
    Older epoch folders beyond the ``keep`` newest are removed afterwards.
    """
    folder = Path(folder)
    name = f"epoch_{epoch:04d}"
    target = folder / name
    if target.exists():
        shutil.rmtree(target)
    # build the epoch folder under a temporary name, then move it in whole
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}."))
    try:
        save_state_dict(state, tmp / "state.safetensors")
        save_torch(optimizer_state, tmp / "optimizer.pt")
        meta = {"epoch": epoch, "rng": rng_states(), **info}
        atomic_write_text(tmp / "state.json", json.dumps(meta))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(folder / LAST, json.dumps({"epoch": epoch, "dir": name}))
    old = sorted(p for p in folder.glob("epoch_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return target


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The epoch folder ``last.json`` points to, or None when there is no checkpoint."""
    folder = Path(folder)
    pointer = folder / LAST
    if not pointer.is_file():
        return None
    try:
        target = folder / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightsError(f"{pointer}: damaged checkpoint pointer ({e})") from e
    if not (target / "state.json").is_file():
        raise WeightsError(f"{pointer}: points to {target.name}, which is incomplete or missing")
    return target


def load_checkpoint(
    target: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read an epoch folder: (state_dict, optimiser state, info incl. ``epoch`` and ``rng``)."""
    target = Path(target)
    try:
        info = json.loads((target / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{target / 'state.json'}: unreadable checkpoint info ({e})") from e
    return load_state_dict(target / "state.safetensors"), load_torch(target / "optimizer.pt"), info
