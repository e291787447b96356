"""Temporary files and folders for atomic writes that end up with the umask's permissions.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 whatever the umask, and renaming them
into place would keep those modes, so colleagues on a shared server could not read the
results. These helpers chmod to ``0o666 & ~umask`` / ``0o777 & ~umask`` right after creation.
"""

from __future__ import annotations

import os
import tempfile
import threading

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it for other threads)."""
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def make_temp_file(dir: str | os.PathLike, prefix: str = "", suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file mode follows the umask (``0o666 & ~umask``)."""
    fd, path = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, path


def make_temp_dir(dir: str | os.PathLike, prefix: str = "", suffix: str = "") -> str:
    """``tempfile.mkdtemp`` whose folder mode follows the umask (``0o777 & ~umask``)."""
    path = tempfile.mkdtemp(dir=dir, prefix=prefix, suffix=suffix)
    os.chmod(path, 0o777 & ~current_umask())
    return path


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain ``open(..., "w")`` would (``0o666 & ~umask``).

    Writers such as safetensors and torch.save create 0600 files of their own.
    """
    os.chmod(path, 0o666 & ~current_umask())


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file into place with the umask's mode."""
    umask_mode(tmp)
    os.replace(tmp, path)
