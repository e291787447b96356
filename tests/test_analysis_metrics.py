"""Metrics, masking-table aggregation and table helpers of mrn_engine.analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mrn_engine.analysis import (
    MASK_SUBSETS,
    binary_metrics,
    ensemble_metrics,
    fold_metrics,
    masking_metrics,
    subset_key,
)
from mrn_engine.data.roi_subsets import parse_subset_key
from mrn_engine.data.tables import read_csv, to_markdown, write_csv, write_json
from mrn_engine.errors import InputDataError
from mrn_engine.results import Probabilities


def test_binary_metrics_values():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.6, 0.3, 0.8, 0.4, 0.9]
    m = binary_metrics(y, p)
    # calls: 0 1 0 1 0 1 -> TN=2 FP=1 FN=1 TP=2
    assert m.confusion == [[2, 1], [1, 2]]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.auc == pytest.approx(roc_auc_score(y, p))
    assert m.f1_pd == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)  # macro of HC 2/3 and PD 2/3
    assert (m.n, m.n_pd, m.note) == (6, 3, "")


def test_threshold_inclusive_and_macro_f1_differs_from_pd_f1():
    m = binary_metrics([0, 1, 1, 1], [0.5, 0.5, 0.9, 0.2])
    # P >= 0.5 is PD: calls 1 1 1 0
    assert m.confusion == [[0, 1], [1, 2]]
    assert m.f1_pd == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx((0 + 2 / 3) / 2)


def test_one_class_gives_nan_auc_with_note():
    m = binary_metrics([1, 1, 1], [0.7, 0.2, 0.9])
    assert math.isnan(m.auc)
    assert "one class" in m.note
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.confusion == [[0, 0], [1, 2]]


@pytest.mark.parametrize(
    ("labels", "probs", "msg"),
    [
        ([0, 1], [0.2], "2 labels but 1"),
        ([0, 2], [0.1, 0.2], "labels must be 0"),
        ([0, 1], [0.1, 1.5], "within [0, 1]"),
        ([], [], "no labelled"),
    ],
)
def test_bad_inputs_raise_input_error(labels, probs, msg):
    with pytest.raises(InputDataError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        binary_metrics(labels, probs, where="x.csv")


def test_fold_metrics_per_fold_and_pooled():
    oof = {
        0: [{"label": 0, "p_pd": 0.2}, {"label": 1, "p_pd": 0.7}],
        1: [{"label": 0, "p_pd": 0.6}, {"label": 1, "p_pd": 0.9}],
    }
    rows = fold_metrics(oof)
    assert [r["set"] for r in rows] == ["fold 0", "fold 1", "pooled OOF"]
    assert rows[0]["accuracy"] == 1.0 and rows[1]["accuracy"] == 0.5
    assert rows[2]["n"] == 4 and rows[2]["accuracy"] == pytest.approx(0.75)
    assert rows[2]["auc"] == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.2, 0.7, 0.6, 0.9]))
    assert (rows[1]["fp"], rows[1]["tp"]) == (1, 1)


def test_ensemble_metrics_uses_mean_of_folds():
    y = [0, 1, 1]
    pf = [[0.2, 0.6], [0.4, 0.8], [0.9, 0.3]]
    rows = ensemble_metrics(y, pf)
    assert [r["set"] for r in rows] == ["fold 0", "fold 1", "ensemble"]
    assert rows[-1]["accuracy"] == pytest.approx(binary_metrics(y, np.mean(pf, axis=1)).accuracy)
    assert rows[0]["accuracy"] == pytest.approx(2 / 3)  # calls 0 0 1
    with pytest.raises(InputDataError, match="expected"):
        ensemble_metrics([0, 1], [[0.1], [0.2], [0.3]])


def test_mask_subsets_cover_all_16_in_table_order():
    assert len(MASK_SUBSETS) == 16 and len(set(MASK_SUBSETS)) == 16
    assert MASK_SUBSETS[0] == frozenset()
    assert [len(s) for s in MASK_SUBSETS] == [0] + [1] * 4 + [2] * 6 + [3] * 4 + [4]
    assert subset_key(MASK_SUBSETS[1]) == "NM"
    assert subset_key({"qsm_dentate", "nm_sn"}) == "NM+QSM3"
    for s in MASK_SUBSETS:
        assert parse_subset_key(subset_key(s)) == s
    with pytest.raises(InputDataError, match="unknown ROI subset"):
        parse_subset_key("NM+QSM9")


def test_masking_metrics_table():
    labels = {"a": 0, "b": 1, "c": 1, "d": 0}
    base = {"a": 0.2, "b": 0.8, "c": 0.7, "d": 0.3}
    tables = {}
    for cid, p in base.items():
        rows = []
        for s in MASK_SUBSETS:
            # masking NM flips every call; other subsets keep the base probability
            q = 1 - p if "nm_sn" in s else p
            rows.append(Probabilities.from_folds([0], [q], masked=s))
        tables[cid] = rows
    tables["unlabelled"] = tables["a"]
    out = masking_metrics(tables, labels)
    assert len(out) == 16
    by = {r["masked"]: r for r in out}
    assert by["none"]["accuracy"] == 1.0 and by["none"]["delta_accuracy"] == 0.0
    assert by["NM"]["accuracy"] == 0.0 and by["NM"]["NM"] == "x" and by["NM"]["QSM1"] == ""
    assert by["QSM1+QSM2"]["accuracy"] == 1.0
    assert by["NM+QSM1+QSM2+QSM3"]["delta_accuracy"] == -1.0
    assert by["none"]["n"] == 4
    del tables["b"][3]
    with pytest.raises(InputDataError, match="missing for some cases"):
        masking_metrics(tables, labels)


def test_tables_roundtrip_and_markdown(tmp_path):
    rows = [{"set": "fold 0", "accuracy": 0.8333333, "auc": float("nan"), "n": 6}]
    path = write_csv(rows, tmp_path / "t.csv")
    back = read_csv(path, required=("set", "auc"))
    assert back == [{"set": "fold 0", "accuracy": "0.833333", "auc": "nan", "n": "6"}]
    with pytest.raises(InputDataError, match="missing column"):
        read_csv(path, required=("p_pd",))
    md = to_markdown(rows, ("set", "accuracy", "auc"), percent=("accuracy", "auc"))
    assert md.splitlines()[2] == "| fold 0 | 83.3% | n/a |"
    write_json({"x": float("nan"), "y": np.float32(0.5)}, tmp_path / "j.json")
    assert (tmp_path / "j.json").read_text().replace(" ", "").replace(
        "\n", ""
    ) == '{"x":null,"y":0.5}'
    assert not list(tmp_path.glob(".*tmp"))
