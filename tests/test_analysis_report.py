"""HTML run report (write_report / mrn report) on a fabricated run folder."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from click.testing import CliRunner

from mrn_engine.analysis import MASK_SUBSETS, subset_key, write_report
from mrn_engine.config import get_preset
from mrn_engine.data.tables import write_csv
from mrn_engine.errors import InputDataError


def make_run_dir(root, *, folds=2, n_val=6, seed=0):
    """A run folder like a training bundle: config.json, bundle.json, fold_k/{metrics,oof}.csv."""
    rng = np.random.default_rng(seed)
    get_preset("cpu-tiny").save(root / "config.json")
    (root / "bundle.json").write_text('{"folds": [{"fold": 0, "train": ["a"], "val": ["b"]}]}')
    for k in range(folds):
        d = root / f"fold_{k}"
        d.mkdir(parents=True)
        ep = np.arange(1, 6)
        write_csv(
            [
                {
                    "epoch": int(e),
                    "stage": "pretrain" if e < 3 else "full",
                    "loss_cls": "" if e < 3 else float(1 / e),
                    "loss_seg": float(2 / e + k),
                    "val_auc": 0.5 + 0.05 * e,
                    "lr_head": 1e-3,
                    "seconds": 1.0,
                }
                for e in ep
            ],
            d / "metrics.csv",
        )
        labels = [i % 2 for i in range(n_val)]
        write_csv(
            [
                {
                    "case_id": f"RJPD_{k}{i:02d}",
                    "label": y,
                    "p_pd": float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2), 0, 1)),
                }
                for i, y in enumerate(labels)
            ],
            d / "oof.csv",
        )
    return root


def held_out_rows(n=10):
    return [
        {
            "case_id": f"RJPD_{i:03d}",
            "label": i % 2,
            "p_pd_fold0": 0.2 + 0.5 * (i % 2),
            "p_pd_fold1": 0.45 + 0.1 * (i % 2) - 0.01 * i,
        }
        for i in range(n)
    ]


def masking_rows():
    return [
        {
            "masked": subset_key(s),
            "accuracy": 0.9 - 0.1 * len(s),
            "auc": 0.95 - 0.1 * len(s),
            "f1": float("nan") if len(s) == 4 else 0.9 - 0.1 * len(s),
            "delta_accuracy": -0.1 * len(s),
            "n": 10,
        }
        for s in MASK_SUBSETS
    ]


def _images(text):
    return re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)


def test_full_report_embeds_pngs_and_tables(tmp_path):
    run = make_run_dir(tmp_path / "run")
    out = write_report(
        run,
        tmp_path / "r" / "report.html",
        eval_predictions=held_out_rows(),
        masking_table=masking_rows(),
        png_dir=tmp_path / "png",
    )
    text = out.read_text()
    imgs = dict(_images(text))
    assert set(imgs) == {"roc", "confusion", "masking", "losses", "reliability"}
    for b64 in imgs.values():
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pooled OOF" in text and "ensemble" in text and "fold 1" in text
    assert "NM+QSM1+QSM2+QSM3" in text
    assert "&quot;preset&quot;: &quot;cpu-tiny&quot;" in text and "<b>cpu-tiny</b>" in text
    assert 'src="http' not in text and "<script" not in text  # self-contained
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "report_confusion.png",
        "report_losses.png",
        "report_masking.png",
        "report_reliability.png",
        "report_roc.png",
    ]


def test_report_confusion_counts_of_the_held_out_ensemble(tmp_path):
    run = make_run_dir(tmp_path / "run")
    rows = held_out_rows()
    text = write_report(run, tmp_path / "report.html", eval_predictions=rows).read_text()
    # ensemble = mean of the two folds; compute expected confusion counts
    p = np.array([(r["p_pd_fold0"] + r["p_pd_fold1"]) / 2 for r in rows])
    y = np.array([r["label"] for r in rows])
    call = p >= 0.5
    tp = int((call & (y == 1)).sum())
    fp = int((call & (y == 0)).sum())
    ens_row = re.search(r"<tr><td>ensemble</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", ens_row)
    # columns after set: n accuracy auc f1 f1_pd tn fp fn tp note
    assert int(cells[0]) == 10 and int(cells[6]) == fp and int(cells[8]) == tp


def test_report_reads_ablation_folder_by_default_and_minimal_run(tmp_path):
    run = make_run_dir(tmp_path / "run", folds=1)
    write_csv(held_out_rows(), run / "ablation" / "predictions.csv")
    write_csv(masking_rows(), run / "ablation" / "masking_table.csv")
    text = write_report(run, tmp_path / "a.html").read_text()
    assert {"roc", "masking", "losses", "confusion"} <= set(dict(_images(text)))
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty, tmp_path / "b.html").read_text()
    assert "No out-of-fold or held-out predictions" in text and not _images(text)
    with pytest.raises(InputDataError, match="run folder not found"):
        write_report(tmp_path / "nope", tmp_path / "c.html")


def test_report_cli(tmp_path):
    from mrn_engine.cli import cli

    run = make_run_dir(tmp_path / "run")
    write_csv(masking_rows(), tmp_path / "m.csv")
    res = CliRunner().invoke(cli, ["report", str(run), "--masking", str(tmp_path / "m.csv")])
    assert res.exit_code == 0, res.output
    assert (run / "report.html").is_file()
    assert "masking" in dict(_images((run / "report.html").read_text()))


def test_report_accepts_case_predictions(tmp_path):
    from mrn_engine.inference import CasePrediction, Probabilities

    run = make_run_dir(tmp_path / "run", folds=1)
    preds = [
        CasePrediction(
            case_id=f"RJPD_{i:03d}",
            probabilities=Probabilities.from_folds([0, 1], [p, p]),
            roi_tokens=[],
            nuclei=np.zeros((1, 1, 1)),
            nm_nuclei=np.zeros((1, 1, 1)),
            boxes={},
            label=lab,
        )
        for i, (p, lab) in enumerate([(0.9, 1), (0.2, 0), (0.6, 0), (0.4, None)])
    ]
    text = write_report(run, tmp_path / "r.html", eval_predictions=preds).read_text()
    row = re.search(r"<tr><td>ensemble</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert cells[0] == "3" and cells[1] == "66.7%"  # unlabelled case ignored; one false positive
