"""Scoped nnU-Net environment: its three folders (and worker counts) set only for one call.

nnU-Net v2 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the
environment (``nnunetv2.paths``; since 2.8 lazily, at use time — which this module relies on). :func:`nnunet_environment` sets them for the duration of a ``with`` block and restores
the caller's environment afterwards, so the user's global setup is never changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: folder holding our nnU-Net trainer module (found by nnU-Net through ``nnUNet_extTrainer``)
EXT_TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_ext"

#: sub-folders of a workspace, one per nnU-Net environment variable
WORKSPACE_DIRS = {
    "nnUNet_raw": "nnUNet_raw",
    "nnUNet_preprocessed": "nnUNet_preprocessed",
    "nnUNet_results": "nnUNet_results",
}


def workspace_paths(workspace: str | os.PathLike) -> dict[str, Path]:
    """The nnU-Net folders inside ``workspace`` (variable name -> folder)."""
    ws = Path(workspace)
    return {var: ws / sub for var, sub in WORKSPACE_DIRS.items()}


@contextmanager
def nnunet_environment(
    workspace: str | os.PathLike | None = None, *, n_proc_da: int | None = None
) -> Iterator[dict[str, Path]]:
    """Set nnU-Net's environment variables for a ``with`` block, then restore them.

    Parameters
    ----------
    workspace
        Folder that receives ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``
        (created). ``None`` sets only the trainer lookup path (enough for inference).
    n_proc_da
        Data-augmentation worker processes (``nnUNet_n_proc_DA``); 0 = in the main process.

    Yields
    ------
    dict
        Variable name -> folder (empty when ``workspace`` is None).
    """
    new: dict[str, str] = {"nnUNet_extTrainer": str(EXT_TRAINER_DIR)}
    paths: dict[str, Path] = {}
    if workspace is not None:
        paths = workspace_paths(workspace)
        for var, folder in paths.items():
            folder.mkdir(parents=True, exist_ok=True)
            new[var] = str(folder.resolve())
    if n_proc_da is not None:
        new["nnUNet_n_proc_DA"] = str(int(n_proc_da))
    saved = {key: os.environ.get(key) for key in new}
    os.environ.update(new)
    try:
        yield paths
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
