"""Cohort-scale `mrn predict`: streaming loader, shards + merge, resume, per-stage timing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mrn_engine.badinput.cases import write_bundle, write_case
from mrn_engine.cli import cli
from mrn_engine.data import load_case
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.inference import MRNPredictor, predict_cases
from mrn_engine.inference.cohort import Shard, default_workers, parse_shard
from mrn_engine.inference.manifest import STAGE_DIR, out_dir_lock
from mrn_engine.inference.merge import merge_shards
from mrn_engine.inference.timing import STAGES, stage_line
from mrn_engine.models import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: what a merge must reproduce byte for byte (besides the case folders)
SUBMISSION = (
    "label_predict.csv",
    "probabilities.csv",
    "probabilities.json",
    "errors.json",
    "config.json",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("c") / "cases"
    for i in range(1, 6):
        write_case(root / f"RJPD_00{i}", seed=i, pd=i % 2)
    (root / "RJPD_004" / "NM.nii.gz").write_bytes(b"not a nifti")  # a failed case
    return root


@pytest.fixture(scope="module")
def predictor(bundle):
    return MRNPredictor.from_bundle(bundle, device="cpu")


@pytest.fixture(scope="module")
def single(predictor, cases, tmp_path_factory):
    """One plain run over the whole cohort (in-process reading)."""
    out = tmp_path_factory.mktemp("single") / "out"
    predict_cases(predictor, cases, out, progress=False, workers=0)
    return out


class Counting:
    """Wraps ``predictor.predict_prepared``: records the case ids the model ran on."""

    def __init__(self, predictor, monkeypatch, stop_after: int | None = None):
        self.seen: list[str] = []
        real = predictor.predict_prepared

        def wrapped(prepared, **kw):
            if stop_after is not None and len(self.seen) == stop_after:
                raise KeyboardInterrupt  # the run is killed
            self.seen.append(prepared.case.case_id)
            return real(prepared, **kw)

        monkeypatch.setattr(predictor, "predict_prepared", wrapped)


def submission_bytes(out: Path) -> dict[str, bytes]:
    """Every submission file (tables and case folders) by relative path."""
    files = {name: (out / name).read_bytes() for name in SUBMISSION}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        for f in sorted(folder.iterdir()):
            files[f"{folder.name}/{f.name}"] = f.read_bytes()
    return files


def test_shard_syntax_and_split():
    assert parse_shard(None) == Shard(1, 1) and parse_shard(" 2 / 3 ") == Shard(2, 3)
    for bad in ("2", "0/2", "3/2", "a/b", "1/0", "-1/2", "1/2/3"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    ids = [f"RJPD_{i:03d}" for i in range(11, 0, -1)]
    parts = [Shard(i, 3).select(ids) for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(ids)  # every case in exactly one shard
    assert parts[0] == ["RJPD_001", "RJPD_004", "RJPD_007", "RJPD_010"]


def test_bad_shard_is_a_clear_cli_error(bundle, cases, tmp_path):
    args = ["predict", str(cases), "--model", str(bundle), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, [*args, "--shard", "3/2", "--quiet"])
    assert res.exit_code != 0
    assert "--shard '3/2': I must be between 1 and N" in str(res.exception)
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(cli, [*args, "--workers", "-1", "--quiet"])
    assert res.exit_code == 2 and "--workers" in res.output


def test_default_workers_follow_the_cores():
    assert default_workers(cores=1, free=1) == 0
    assert default_workers(cores=2, free=2) == 0
    assert default_workers(cores=4, free=1) == 1
    assert default_workers(cores=8, free=6) == 3
    assert default_workers(cores=64, free=60) == 4


def test_two_shards_merged_equal_a_single_run(predictor, cases, single, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    r1 = predict_cases(predictor, cases, s1, progress=False, workers=0, shard="1/2")
    r2 = predict_cases(predictor, cases, s2, progress=False, workers=1, shard="2/2")
    assert [r["case_id"] for r in r1.rows] == ["RJPD_001", "RJPD_003", "RJPD_005"]
    assert [r["case_id"] for r in r2.rows] == ["RJPD_002", "RJPD_004"]
    assert [e["case_id"] for e in r2.errors] == ["RJPD_004"]
    res = CliRunner().invoke(cli, ["merge-shards", str(s2), str(s1), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "merged 2 shard(s): 5 case(s), 1 failed" in res.output
    merged, ref = submission_bytes(tmp_path / "m"), submission_bytes(single)
    assert sorted(merged) == sorted(ref) and len(ref) == 5 + 4 * 3  # 4 ok cases x 3 files
    assert merged == ref  # byte for byte (shard 2 went through a loader worker process)
    assert not [p for p in (tmp_path / "m").rglob(".*")]


def test_merge_refuses_shards_that_do_not_fit(predictor, bundle, cases, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    predict_cases(predictor, cases, s1, progress=False, workers=0, shard="1/2")
    predict_cases(predictor, cases, s2, progress=False, workers=0, shard="2/2")
    out = tmp_path / "m"
    with pytest.raises(InputDataError, match=r"missing shard\(s\) 2/2 of 2"):
        merge_shards([s1], out)
    with pytest.raises(InputDataError, match=r"shard 1/2 given twice"):
        merge_shards([s1, s2, s1], out)
    # shard 2 of another bundle (other weights): refused, naming both digests
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    cfg = predictor.config
    save_model(build_model(cfg, pretrained=False), other / "fold_0" / "model.safetensors", cfg)
    p2 = MRNPredictor.from_bundle(other, device="cpu")
    predict_cases(p2, cases, tmp_path / "o2", progress=False, workers=0, shard="2/2")
    with pytest.raises(InputDataError, match=r"o2: shards made with different bundles: .*bundle "):
        merge_shards([s1, tmp_path / "o2"], out)
    # shards of different splits (a 1/1 run holds every case)
    predict_cases(predictor, cases, tmp_path / "all", progress=False, workers=0)
    with pytest.raises(InputDataError, match="shards of different splits"):
        merge_shards([s1, s2, tmp_path / "all"], out)
    # a case folder changed after the shard was written
    (s2 / "RJPD_002" / "PD_pred.txt").write_text(
        "1" if (s2 / "RJPD_002" / "PD_pred.txt").read_text() == "0" else "0"
    )
    with pytest.raises(InputDataError, match=r"s2/RJPD_002: output files missing or changed"):
        merge_shards([s1, s2], out)
    # an unfinished shard: only its staging folder exists
    (tmp_path / "killed" / STAGE_DIR).mkdir(parents=True)
    with pytest.raises(InputDataError, match="did not finish: rerun the same mrn predict"):
        merge_shards([s1, tmp_path / "killed"], out)
    assert not out.exists() or not any(out.iterdir())  # nothing written by a refused merge


def test_merge_refuses_missing_and_duplicate_cases(predictor, cases, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    predict_cases(predictor, cases, s1, progress=False, workers=0, shard="1/2")
    predict_cases(predictor, cases, s2, progress=False, workers=0, shard="2/2")
    original = (s2 / "predict.json").read_text()
    manifest = json.loads(original)
    manifest["cases"] = [c for c in manifest["cases"] if c["case_id"] != "RJPD_002"]
    (s2 / "predict.json").write_text(json.dumps(manifest))
    with pytest.raises(InputDataError, match=r"1 case\(s\) of the cohort in no shard: RJPD_002"):
        merge_shards([s1, s2], tmp_path / "m")
    manifest = json.loads(original)  # RJPD_001 (shard 1) also listed by shard 2
    manifest["cases"].append(json.loads((s1 / "predict.json").read_text())["cases"][0])
    shutil.copytree(s1 / "RJPD_001", s2 / "RJPD_001")
    (s2 / "predict.json").write_text(json.dumps(manifest))
    with pytest.raises(InputDataError, match=r"RJPD_001: case in two shards, .*s1 and .*s2"):
        merge_shards([s1, s2], tmp_path / "m")


def test_killed_run_resumes_and_skips_done_cases(predictor, cases, single, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        killed = Counting(predictor, m, stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            predict_cases(predictor, cases, out, progress=False, workers=0)
    assert killed.seen == ["RJPD_001", "RJPD_002"]
    assert sorted(p.name for p in out.iterdir()) == [STAGE_DIR]  # no table: not a submission
    # a kill while writing RJPD_003: its folder exists in the stage but has no record
    shutil.copytree(out / STAGE_DIR / "RJPD_002", out / STAGE_DIR / "RJPD_003")
    # ... or killed inside write_case_outputs; and a staged case no longer in the cohort
    shutil.copytree(out / STAGE_DIR / "RJPD_002", out / STAGE_DIR / ".RJPD_005.x1.tmp")
    shutil.copytree(out / STAGE_DIR / "RJPD_002", out / STAGE_DIR / "RJPD_099")
    rerun = Counting(predictor, monkeypatch)
    result = predict_cases(predictor, cases, out, progress=False, workers=0)
    assert rerun.seen == ["RJPD_003", "RJPD_005"]  # 001, 002 done; 004 fails before the model
    assert result.skipped == ["RJPD_001", "RJPD_002"]
    assert submission_bytes(out) == submission_bytes(single)
    assert not (out / STAGE_DIR).exists() and not [p for p in out.rglob(".*")]
    # a finished run: nothing to do; a damaged output is predicted again; --overwrite: all
    rerun.seen.clear()
    assert predict_cases(predictor, cases, out, progress=False, workers=0).skipped == [
        "RJPD_001",
        "RJPD_002",
        "RJPD_003",
        "RJPD_005",
    ]
    assert rerun.seen == []
    nm = out / "RJPD_005" / "NM_pred.nii.gz"
    nm.write_bytes(nm.read_bytes()[:50])
    predict_cases(predictor, cases, out, progress=False, workers=0)
    assert rerun.seen == ["RJPD_005"]
    assert submission_bytes(out) == submission_bytes(single)
    rerun.seen.clear()
    res = CliRunner().invoke(
        cli,
        ["predict", str(cases), "--model", str(predictor.bundle.root), "--out", str(out)]
        + ["--device", "cpu", "--quiet", "--overwrite", "--allow-partial", "--workers", "0"],
    )
    assert res.exit_code == 0, res.output
    assert "4 case(s) predicted -> " in res.output


def test_other_settings_are_not_resumed(predictor, cases, single, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    p = MRNPredictor.from_bundle(predictor.bundle.root, device="cpu", tta=True)
    seen = Counting(p, monkeypatch)
    predict_cases(p, cases, out, progress=False, workers=0)
    assert seen.seen == ["RJPD_001", "RJPD_002", "RJPD_003", "RJPD_005"]


def test_a_second_run_into_the_same_out_is_refused(predictor, cases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with out_dir_lock(out), pytest.raises(InputDataError, match="another mrn predict is writing"):
        predict_cases(predictor, cases, out, progress=False, workers=0)


def test_stage_timings_in_the_result_files_and_summary(predictor, cases, single, tmp_path):
    pred = predictor.predict_case(load_case(cases / "RJPD_001"))
    assert set(pred.timings) == {"masks", "crop", "model", "paste"}
    assert all(v >= 0 for v in pred.timings.values()) and pred.timings["model"] > 0
    line = stage_line(pred.timings)  # the panel's status line
    assert (
        line.startswith("masks ")
        and ", model " in line
        and line.index("crop") < line.index("model")
    )
    assert stage_line({"wait": 0.3, "read": 1.0}) == "read 1.0 s, wait 0.3 s"
    assert stage_line({}) == ""
    rows = list(csv.DictReader(open(single / "timing.csv")))
    assert [r["case_id"] for r in rows] == ["RJPD_001", "RJPD_002", "RJPD_003", "RJPD_005"]
    assert list(rows[0]) == ["case_id", *STAGES, "wait", "total"]
    for r in rows:
        assert float(r["read"]) > 0 and float(r["model"]) > 0 and float(r["write"]) > 0
        total = sum(float(r[s]) for s in STAGES)
        assert float(r["total"]) == pytest.approx(total, abs=1e-5)
    summary = json.loads((single / "timing.json").read_text())
    assert summary["cases"] == 4 and summary["workers"] == 0
    assert summary["stages"]["model"]["total_s"] == pytest.approx(
        sum(float(r["model"]) for r in rows), abs=1e-4
    )
    res = CliRunner().invoke(
        cli,
        ["predict", str(cases), "--model", str(predictor.bundle.root), "--out", str(tmp_path / "o")]
        + ["--device", "cpu", "--quiet", "--allow-partial", "--shard", "1/2", "--workers", "0"],
    )
    assert res.exit_code == 0, res.output
    assert "timing: 3 case(s) in " in res.output and "cases/s" in res.output
    assert [line.split()[0] for line in res.output.splitlines() if line.startswith("  ")] == list(
        STAGES
    )


def test_cases_needing_the_segmenter_are_prepared_in_the_main_process(bundle, cases, tmp_path):
    class OwnMasks:
        """Stand-in segmenter: the case files' masks (so predictions can be compared)."""

        calls: list[str] = []

        def predict(self, case):
            self.calls.append(case.case_id)
            ref = load_case(cases / case.case_id)
            return ref.nm_mask, ref.qsm_mask

    seg = OwnMasks()
    p = MRNPredictor.from_bundle(bundle, device="cpu", segmenter=seg, ignore_masks=True)
    result = predict_cases(p, cases, tmp_path / "o", progress=False, workers=1, shard="1/2")
    assert seg.calls == ["RJPD_001", "RJPD_003", "RJPD_005"]  # in this process
    direct = p.predict_case(load_case(cases / "RJPD_003"))
    row = {r["case_id"]: r for r in result.rows}["RJPD_003"]
    assert row["mask_source"] == "segmenter" and row["p_pd"] == direct.p_pd


@pytest.mark.parametrize("shared", [True, False])
def test_worker_items_equal_in_process_items(predictor, cases, monkeypatch, shared):
    import numpy as np

    import mrn_engine.inference.cohort as cohort
    from mrn_engine.data import discover_cases

    monkeypatch.setattr(cohort, "shared_memory_ok", lambda: shared)
    files = [f for f in discover_cases(cases) if f.case_id in ("RJPD_002", "RJPD_004")]
    stream = cohort.CaseStream(files, predictor.config.roi)
    here, there = list(cohort.stream_cases(stream, 0)), list(cohort.stream_cases(stream, 1))
    assert [i.error for i in there] == [i.error for i in here]
    assert here[1].error.startswith("RJPD_004: ") and here[0].error is None
    a, b = here[0], there[0]
    assert type(b.case.nm.array) is np.ndarray and b.case.t1 is None
    for k in ("nm", "qsm", "nm_mask", "qsm_mask"):
        x, y = getattr(a.case, k).array, getattr(b.case, k).array
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert b.prepared.case is b.case and b.prepared.mask_source == "case"
    for name, x in a.prepared.images.items():
        assert torch.equal(x, b.prepared.images[name])
    assert set(b.prepared.timings) == {"read", "masks", "crop"}


def test_a_forked_child_never_keeps_the_output_locked(tmp_path):
    import multiprocessing

    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    started, stop = ctx.Event(), ctx.Event()

    def worker():  # a loader worker, say, still running after the run released its lock
        started.set()
        stop.wait(10)

    with out_dir_lock(out):
        child = ctx.Process(target=worker)
        child.start()
        assert started.wait(10)
    try:
        with out_dir_lock(out):  # the child inherited the descriptor but closed it
            pass
    finally:
        stop.set()
        child.join()


def test_nnunet_settings_are_part_of_the_run_fingerprint(predictor):
    """Other nnU-Net settings give other masks: a rerun with them must not resume."""
    from mrn_engine.inference.manifest import run_fingerprint
    from mrn_engine.segmentation.settings import SegInferenceSettings

    before = run_fingerprint(predictor, nuclei=True)
    try:
        predictor.masks.seg_settings = SegInferenceSettings()
        assert run_fingerprint(predictor, nuclei=True) == before  # the defaults, spelled out
        predictor.masks.seg_settings = SegInferenceSettings(use_mirroring=True)
        changed = run_fingerprint(predictor, nuclei=True)
    finally:
        predictor.masks.seg_settings = None
    assert changed != before and changed["seg"]["use_mirroring"] is True
