"""The bundle layout module (mrn_engine.bundle) and the shared run-time helpers."""

from __future__ import annotations

import json

import pytest
import torch

from mrn_engine import bundle as B
from mrn_engine.config import get_preset
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.runtime import file_sha256, resolve_device


def write_oof(root, k, text):
    d = B.fold_dir(root, k)
    d.mkdir(parents=True, exist_ok=True)
    (d / B.OOF_FILE).write_text(text)


def test_read_oof_of_an_unfinished_run(tmp_path):
    write_oof(tmp_path, 0, "case_id,label,p_pd,fold\nA,1,0.8,0\nB,0,0.25,0\n")
    write_oof(tmp_path, 2, "case_id,label,p_pd\nC,1,0.4\n")  # older files have no fold column
    B.fold_dir(tmp_path, 1).mkdir()  # a fold still training: no oof.csv yet
    (tmp_path / "fold_x").mkdir()  # not a fold folder
    oof = B.read_oof(tmp_path)
    assert sorted(oof) == [0, 2]
    assert oof[0][1] == {"case_id": "B", "label": 0, "p_pd": 0.25, "fold": 0}
    assert oof[2] == [{"case_id": "C", "label": 1, "p_pd": 0.4, "fold": 2}]
    assert sorted(B.fold_dirs(tmp_path)) == [0, 1, 2]


def test_read_oof_names_the_bad_file(tmp_path):
    write_oof(tmp_path, 0, "case_id,label,p_pd\nA,yes,0.8\n")
    with pytest.raises(InputDataError, match=r"fold_0/oof.csv: bad label or probability"):
        B.read_oof(tmp_path)
    write_oof(tmp_path, 0, "case_id,p_pd\nA,0.8\n")
    with pytest.raises(InputDataError, match=r"fold_0/oof.csv: missing column\(s\) \['label'\]"):
        B.read_oof(tmp_path)


def test_create_open_and_weights_sha(tmp_path):
    cfg = get_preset("cpu-tiny")
    info = {"folds": [{"fold": 0, "train": ["A"], "val": ["B"]}], "weights_provenance": {"x": 1}}
    root = B.create_bundle(tmp_path / "b", cfg, info)
    assert B.create_bundle(root, cfg, info) == root  # same run again: accepted
    with pytest.raises(ConfigError, match="other folds or another configuration"):
        B.create_bundle(root, cfg.replace(train={"seed": 99}), info)
    with pytest.raises(InputDataError, match="no fold_\\*/model.safetensors"):
        B.open_bundle(root)
    w = B.fold_dir(root, 0) / B.WEIGHTS_FILE
    w.parent.mkdir()
    w.write_bytes(b"weights")
    B.update_bundle_weights(root)
    b = B.open_bundle(root)
    assert b.folds == [0] and b.splits == {0: {"train": ["A"], "val": ["B"]}}
    assert b.weights_sha256 == {"fold_0": file_sha256(w)} and b.weights_provenance == {"x": 1}
    (root / B.INFO_FILE).write_text("{not json")
    with pytest.raises(InputDataError, match="bundle.json: not valid JSON"):
        B.open_bundle(root)


def test_demo_record_lives_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MRN_CACHE_DIR", str(tmp_path / "cache"))
    assert B.last_demo_bundle() is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / B.CONFIG_FILE).write_text("{}")
    record = B.record_demo_bundle(tmp_path / "b")
    assert record == tmp_path / "cache" / B.DEMO_BUNDLE_RECORD
    assert B.last_demo_bundle() == (tmp_path / "b").resolve()
    json.loads(record.read_text())


def test_resolve_device_one_rule():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    mps = getattr(torch.backends, "mps", None)
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if mps is not None and mps.is_available()
        else "cpu"
    )
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
