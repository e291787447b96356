"""ROI masking analysis (paper Table 4): metrics with every subset of the four ROIs masked.

A masked ROI's input is replaced by an empty (all-zero) volume. The predictor computes the
masked probabilities from cached ROI tokens (``MRNPredictor.masking_table``); this module
turns the per-case records of the 16 subsets (Table 4 order, ``mrn_engine.data.roi_subsets``)
into a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mrn_engine.analysis.metrics import binary_metrics
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.data.roi_subsets import MASK_SUBSETS, ROI_SHORT, subset_key
from mrn_engine.errors import InputDataError
from mrn_engine.results import THRESHOLD, Probabilities


def masking_metrics(
    case_tables: Mapping[str, Sequence[Probabilities]],
    labels: Mapping[str, int],
    *,
    threshold: float = THRESHOLD,
) -> list[dict[str, object]]:
    """Table 4: one row per subset with accuracy / ROC AUC / F1 of the fold ensemble.

    Parameters
    ----------
    case_tables: case id -> the predictor's ``masking_table`` (one record per subset).
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
        for probs in case_tables[cid]:
            by_subset.setdefault(probs.masked, {})[cid] = probs.p_pd
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
