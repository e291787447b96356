"""The uncertainty flag rule and the confident/uncertain summary."""

from __future__ import annotations

import math

import pytest

from mrn_engine.inference.uncertainty import (
    FOLD_SPREAD,
    MARGIN,
    TTA_SPREAD,
    assess,
    assess_row,
    confidence_summary,
)


def test_confident_case():
    u = assess(0.9, [0.88, 0.9, 0.92], [0.01, 0.02, 0.0])
    assert not u.uncertain and u.reasons == () and u.label == "confident"
    assert u.distance == pytest.approx(0.4) and u.tta_spread == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("p", "folds", "tta", "reasons"),
    [
        (0.5 + MARGIN - 0.01, [0.59, 0.59], None, ("near-threshold",)),
        (0.5 - MARGIN + 0.01, [0.41], None, ("near-threshold",)),
        (0.5 + MARGIN + 0.01, [0.61, 0.61], None, ()),  # just outside the band
        (0.8, [0.45, 0.8, 1.0, 0.95], None, ("fold-spread",)),
        (0.8, [0.8, 0.8], [0.0, TTA_SPREAD + 0.01], ("tta-spread",)),
        (0.8, [0.8, 0.8], [TTA_SPREAD - 0.01], ()),
        (0.55, [0.1, 1.0], [0.5], ("near-threshold", "fold-spread", "tta-spread")),
    ],
)
def test_rule(p, folds, tta, reasons):
    u = assess(p, folds, tta)
    assert u.reasons == reasons and u.uncertain == bool(reasons)
    if reasons:
        assert u.label.startswith("uncertain (")


def test_fold_spread_threshold_is_the_std():
    d = FOLD_SPREAD + 0.01  # two folds at p +- d: std = d
    assert assess(0.8, [0.8 - d, 0.8 + d]).reasons == ("fold-spread",)
    d = FOLD_SPREAD - 0.01
    assert assess(0.8, [0.8 - d, 0.8 + d]).reasons == ()


def test_row_and_summary():
    rows = [
        {"p_pd": 0.95, "p_pd_fold0": 0.95, "p_pd_fold1": 0.95, "label": 1},  # confident, right
        {"p_pd": 0.1, "p_pd_fold0": 0.1, "p_pd_fold1": 0.1, "label": 0},  # confident, right
        {"p_pd": 0.55, "p_pd_fold0": 0.5, "p_pd_fold1": 0.6, "label": 0},  # uncertain, wrong
        {"p_pd": 0.2, "p_pd_fold0": 0.0, "p_pd_fold1": 0.4, "label": 1, "tta_spread": ""},
    ]
    flags = [assess_row(r) for r in rows]
    assert [f.uncertain for f in flags] == [False, False, True, True]
    assert flags[3].reasons == ("fold-spread",)
    s = confidence_summary([r["label"] for r in rows], flags, [r["p_pd"] for r in rows])
    assert s["n"] == 4 and s["n_uncertain"] == 2 and s["share_uncertain"] == 0.5
    assert s["accuracy_confident"] == 1.0 and s["accuracy_uncertain"] == 0.0
    assert s["accuracy_all"] == 0.5
    s = confidence_summary([1], [assess(0.9)], [0.9])
    assert math.isnan(s["accuracy_uncertain"]) and s["accuracy_confident"] == 1.0
