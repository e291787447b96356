"""Work-arounds for the environment the plugin runs in."""

from __future__ import annotations

import sys


def guard_triton() -> None:
    """Hide ``triton`` from torch on machines without CUDA.

    triton ships its own LLVM. Importing it (torch does so lazily, e.g. from ``torch._dynamo``
    via timm) after Mesa's software OpenGL (llvmpipe, also LLVM) has drawn napari's canvas
    crashes the process with a segmentation fault (seen under Xvfb and on VMs/remote desktops).
    triton only compiles GPU kernels, so without CUDA nothing is lost: torch treats it as absent.
    """
    if "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError
