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

import errno
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mrn_engine.config import atomic_write_text
from mrn_engine.errors import ConfigError, MRNError, MRNWarning, WeightsError
from mrn_engine.fileio import make_temp_dir, make_temp_file, publish

LAST = "last.json"


class CheckpointWriteError(MRNError):
    """A checkpoint file could not be written (disk full, permissions); nothing was replaced."""


def _write_failed(path: Path, e: BaseException) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    full = getattr(e, "errno", None) == errno.ENOSPC or free == 0 or "unexpected pos" in str(e)
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
    return CheckpointWriteError(
        f"{path}: cannot write the checkpoint ({reason})"
        + (f"; the disk is full ({free} bytes free)" if full else "")
        + "; the previous checkpoint is intact, free space and rerun with --resume"
    )


def atomic_file(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)  # safetensors / torch.save write 0600: the umask's mode instead
    except (OSError, RuntimeError) as e:  # torch.save says "unexpected pos" on a full disk
        Path(tmp).unlink(missing_ok=True)
        raise _write_failed(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a ``state_dict`` as safetensors (with string ``metadata``), atomically (shared
    storage is copied)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = dict(metadata) if metadata is not None else None
    atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
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
    atomic_file(path, lambda tmp: torch.save(obj, tmp))
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
    tmp = Path(make_temp_dir(folder, prefix=f".{name}."))
    try:
        save_state_dict(state, tmp / "state.safetensors")
        save_torch(optimizer_state, tmp / "optimizer.pt")
        meta = {"epoch": epoch, "rng": rng_states(), **info}
        try:
            atomic_write_text(tmp / "state.json", json.dumps(meta))
        except OSError as e:
            raise _write_failed(tmp / "state.json", e) from e
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


def _check_info(info: Any, path: Path) -> dict[str, Any]:
    """The checkpoint info of ``state.json`` with the entries resume needs, or ``WeightsError``."""
    if not isinstance(info, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [k for k in ("epoch", "rng") if k not in info]
    if missing:
        raise WeightsError(
            f"{path}: checkpoint info lacks its {' and '.join(repr(k) for k in missing)} "
            "entr" + ("ies" if len(missing) > 1 else "y") + " (damaged or not written by mrn)"
        )
    rng = info["rng"]
    if not isinstance(rng, dict) or not all(k in rng for k in ("python", "numpy", "torch")):
        raise WeightsError(f"{path}: 'rng' must hold the python, numpy and torch RNG states")
    if not isinstance(info["epoch"], int) or info["epoch"] < 1:
        raise WeightsError(f"{path}: 'epoch' = {info['epoch']!r} is not an epoch number")
    return info


def load_checkpoint(
    target: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read an epoch folder: (state_dict, optimiser state, info incl. ``epoch`` and ``rng``)."""
    target = Path(target)
    try:
        info = json.loads((target / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{target / 'state.json'}: unreadable checkpoint info ({e})") from e
    info = _check_info(info, target / "state.json")
    return load_state_dict(target / "state.safetensors"), load_torch(target / "optimizer.pt"), info


def clean_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary epoch folders and files a killed checkpoint write left in ``folder``."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".epoch_") or (p.name.startswith(".") and p.name.endswith(".tmp")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def epoch_folders(folder: str | os.PathLike) -> list[Path]:
    """Complete-looking ``epoch_*`` folders of a checkpoint folder, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.glob("epoch_*") if p.is_dir() and (p / "state.json").is_file()),
        reverse=True,
    )


def load_latest_usable(
    folder: str | os.PathLike,
) -> tuple[Path, tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]] | None:
    """Newest loadable checkpoint of ``folder``: ``(epoch folder, load_checkpoint(...))``.

    Cleans orphaned temporary folders first. When the newest epoch is damaged (truncated
    file, missing entry), falls back to the older kept epoch with an :class:`MRNWarning`;
    raises the newest epoch's error when none can be read; ``None`` when there is no checkpoint.
    """
    folder = Path(folder)
    clean_orphans(folder)
    try:
        newest = latest_checkpoint(folder)
    except WeightsError as e:
        newest, first_error = None, e
    else:
        first_error = None
    candidates = ([newest] if newest is not None else []) + [
        p for p in epoch_folders(folder) if p != newest
    ]
    for target in candidates:
        try:
            loaded = load_checkpoint(target)
        except WeightsError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            warnings.warn(
                f"{first_error}; resuming from the older checkpoint {target}",
                MRNWarning,
                stacklevel=2,
            )
        return target, loaded
    if first_error is not None:
        raise first_error
    return None


def refuse_stale_checkpoints(folder: str | os.PathLike) -> None:
    """``ConfigError`` when a fresh (non-resumed) run would silently restart over checkpoints."""
    folder = Path(folder)
    epochs = epoch_folders(folder)
    if epochs or (folder / LAST).is_file():
        newest = epochs[0].name if epochs else LAST
        raise ConfigError(
            f"{folder}: holds checkpoints of an earlier run (newest {newest}); pass --resume to "
            "continue it or --overwrite to discard them and start from epoch 1"
        )
