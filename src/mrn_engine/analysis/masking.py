"""ROI masking analysis (paper Table 4): metrics with every subset of the four ROIs masked.

A masked ROI's input is replaced by an empty (all-zero) volume. The predictor computes the
masked probabilities from cached ROI tokens (``MRNPredictor.masking_table``); this module
orders the 16 subsets like the paper and turns per-case probabilities into a table.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from mrn_engine.analysis.metrics import THRESHOLD, binary_metrics
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


def subset_key(masked: Sequence[str] | frozenset[str]) -> str:
    """Stable text key of a subset: ``none`` or short names joined by ``+`` in ROI order."""
    names = [ROI_SHORT[n] for n in ROI_NAMES if n in masked]
    return "+".join(names) if names else "none"


def parse_subset_key(key: str) -> frozenset[str]:
    """Inverse of :func:`subset_key`."""
    if key == "none":
        return frozenset()
    inverse = {v: k for k, v in ROI_SHORT.items()}
    try:
        return frozenset(inverse[p] for p in key.split("+"))
    except KeyError:
        raise InputDataError(f"masking table: unknown ROI subset {key!r}") from None


def masking_metrics(
    case_tables: Mapping[str, Sequence[Mapping[str, object]]],
    labels: Mapping[str, int],
    *,
    threshold: float = THRESHOLD,
) -> list[dict[str, object]]:
    """Table 4: one row per subset with accuracy / ROC AUC / F1 of the fold ensemble.

    Parameters
    ----------
    case_tables: case id -> the predictor's ``masking_table`` rows (``masked``, ``p_pd``).
    labels: case id -> 0/1 truth; cases without a label are skipped.

    Returns
    -------
    Rows with ``masked`` (key), an ``x``/blank column per ROI (NM, QSM1, QSM2, QSM3), the
    metrics (``accuracy``, ``auc``, ``f1`` ...) and ``delta_accuracy`` vs. no masking.
    """
    cases = [c for c in case_tables if c in labels]
    if not cases:
        raise InputDataError("masking analysis: no labelled case among the predicted cases")
    by_subset: dict[frozenset[str], dict[str, float]] = {s: {} for s in MASK_SUBSETS}
    for cid in cases:
        for row in case_tables[cid]:
            masked = row["masked"]
            key = parse_subset_key(masked) if isinstance(masked, str) else frozenset(masked)  # type: ignore[arg-type]
            by_subset.setdefault(key, {})[cid] = float(row["p_pd"])  # type: ignore[arg-type]
    out: list[dict[str, object]] = []
    base_acc = math.nan
    for subset in MASK_SUBSETS:
        probs = by_subset.get(subset, {})
        if set(probs) != set(cases):
            raise InputDataError(
                f"masking analysis: subset {subset_key(subset)} missing for some cases"
            )
        m = binary_metrics(
            [labels[c] for c in cases],
            [probs[c] for c in cases],
            threshold=threshold,
            where=f"masking {subset_key(subset)}",
        )
        row = {"masked": subset_key(subset)}
        row.update({ROI_SHORT[n]: ("x" if n in subset else "") for n in ROI_NAMES})
        row.update(m.as_row())
        if not subset:
            base_acc = m.accuracy
        row["delta_accuracy"] = m.accuracy - base_acc
        out.append(row)
    return out


#: columns of the markdown / CSV table
TABLE_COLUMNS = (
    "masked",
    "NM",
    "QSM1",
    "QSM2",
    "QSM3",
    "accuracy",
    "auc",
    "f1",
    "delta_accuracy",
    "n",
    "note",
)
