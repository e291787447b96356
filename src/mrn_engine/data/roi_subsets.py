"""ROI masking vocabulary: short ROI names (paper Table 4) and the 16 masked subsets."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.errors import InputDataError

#: short column names of the ROIs in Table 4
ROI_SHORT: dict[str, str] = {
    "nm_sn": "NM",
    "qsm_bg": "QSM1",
    "qsm_midbrain": "QSM2",
    "qsm_dentate": "QSM3",
}

#: the 16 subsets: no masking, the 4 singles, 6 pairs, 4 triples, all four (Table 4 order)
MASK_SUBSETS: tuple[frozenset[str], ...] = tuple(
    frozenset(c)
    for size in range(len(ROI_NAMES) + 1)
    for c in itertools.combinations(ROI_NAMES, size)
)


def subset_key(masked: Iterable[str]) -> str:
    """Stable text key of a subset: ``none`` or short names joined by ``+`` in ROI order."""
    masked = set(masked)
    names = [ROI_SHORT[n] for n in ROI_NAMES if n in masked]
    return "+".join(names) if names else "none"


def parse_subset_key(key: str) -> frozenset[str]:
    """Inverse of :func:`subset_key`; ``InputDataError`` for an unknown short name."""
    if key == "none":
        return frozenset()
    inverse = {v: k for k, v in ROI_SHORT.items()}
    try:
        return frozenset(inverse[p] for p in key.split("+"))
    except KeyError:
        raise InputDataError(f"masking table: unknown ROI subset {key!r}") from None
