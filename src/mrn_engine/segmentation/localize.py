"""Boxes and tile selection for the localised sliding window (no nnU-Net import here).

All coordinates are nnU-Net's preprocessed grid (after cropping to the non-zero region and
resampling to the model spacing), axis order (Z, Y, X). A *box* / *window* is a tuple of
``slice`` objects with explicit start and stop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = tuple[slice, ...]


def foreground_box(labels: np.ndarray) -> Box | None:
    """Bounding box of the non-zero voxels of a label map (None when there are none)."""
    idx = np.nonzero(np.asarray(labels))
    if not idx or idx[0].size == 0:
        return None
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def grow_box(box: Box, patch: Sequence[int], margin_patches: float, shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin_patches`` x the patch size on every side, clipped to ``shape``."""
    out = []
    for sl, p, n in zip(box, patch, shape, strict=True):
        m = int(np.ceil(margin_patches * p))
        out.append(slice(max(0, sl.start - m), min(int(n), sl.stop + m)))
    return tuple(out)


def box_fraction(box: Box | None, shape: Sequence[int]) -> float:
    """Volume of ``box`` as a fraction of the grid (1.0 for None = whole volume)."""
    if box is None:
        return 1.0
    vox = np.prod([s.stop - s.start for s in box], dtype=float)
    return float(vox / np.prod(shape, dtype=float))


def tile_intersects(tile: Sequence[slice], window: Box, offset: Sequence[int]) -> bool:
    """Whether a tile's spatial slices overlap ``window`` (shifted by ``offset``: padding)."""
    for t, w, o in zip(tile, window, offset, strict=True):
        if t.stop <= w.start + o or t.start >= w.stop + o:
            return False
    return True


def select_tiles(slicers: Sequence[tuple], window: Box, offset: Sequence[int]) -> list[tuple]:
    """The nnU-Net tile slicers (``(slice(None), sz, sy, sx)``) that overlap ``window``.

    Keeping the full-volume tiles (same positions, same order) instead of laying a new grid
    over the window makes every voxel inside the window receive exactly the tiles, Gaussian
    weights and summation order of the full-volume run, so its logits are identical.
    """
    return [s for s in slicers if tile_intersects(s[1:], window, offset)]


def outside(window: Box, shape: Sequence[int]) -> np.ndarray:
    """Boolean map of the voxels of ``shape`` outside ``window``."""
    keep = np.ones(tuple(int(n) for n in shape), dtype=bool)
    keep[window] = False
    return keep


def _linear_weights(n_in: int, n_out: int, window: slice) -> tuple[slice, np.ndarray, slice]:
    """Linear resampling ``n_in -> n_out`` (half-pixel centres, edge-clamped) restricted to the
    output voxels whose source position lies inside ``window``.

    Returns ``(out_slice, weights, in_slice)``: ``weights[o, i]`` maps the input block
    ``in_slice`` to the output block ``out_slice`` (the mapping of ``scipy.ndimage.zoom`` with
    ``grid_mode=True``, which nnU-Net's ``resample_data_or_seg_to_shape`` uses with order 1).
    """
    if n_in == n_out:
        idx = np.arange(window.start, window.stop)
        return slice(window.start, window.stop), np.eye(idx.size, dtype=np.float32), window
    scale = n_in / n_out
    out = np.arange(n_out)
    src = np.clip((out + 0.5) * scale - 0.5, 0, n_in - 1)
    keep = np.nonzero((src >= window.start) & (src <= window.stop - 1))[0]
    if keep.size == 0:
        return slice(0, 0), np.zeros((0, 0), np.float32), slice(0, 0)
    o0, o1 = int(keep[0]), int(keep[-1]) + 1
    s = src[o0:o1]
    i0 = np.floor(s).astype(int)
    i1 = np.minimum(i0 + 1, window.stop - 1)
    w1 = (s - i0).astype(np.float32)
    weights = np.zeros((o1 - o0, window.stop - window.start), np.float32)
    rows = np.arange(o1 - o0)
    np.add.at(weights, (rows, i0 - window.start), 1 - w1)
    np.add.at(weights, (rows, i1 - window.start), w1)
    return slice(o0, o1), weights, window


def resample_window(logits, window: Box, out_shape: Sequence[int]):
    """Linear resampling of ``logits[:, window]`` (C, Z, Y, X) onto the output grid ``out_shape``.

    Returns ``(out_box, block)``: the output voxels whose source position lies inside the
    window, and their resampled logits (float32 tensor). The axis order is that of nnU-Net's
    preprocessed grid; axes whose size does not change are copied.
    """
    import torch

    block = logits[(slice(None), *window)].float()
    out_box = []
    for axis, (w, n_out) in enumerate(zip(window, out_shape, strict=True)):
        n_in = logits.shape[axis + 1]
        o_sl, weights, _ = _linear_weights(n_in, int(n_out), w)
        out_box.append(o_sl)
        block = torch.movedim(
            torch.tensordot(block, torch.from_numpy(weights), dims=([axis + 1], [1])),
            -1,
            axis + 1,
        )
    return tuple(out_box), block
