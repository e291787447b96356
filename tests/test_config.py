import json

import pytest

from mrn_engine.config import PRESETS, RunConfig, get_preset
from mrn_engine.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trip(tmp_path, name):
    cfg = get_preset(name)
    path = cfg.save(tmp_path / "config.json")
    back = RunConfig.load(path)
    assert back == cfg
    assert back.preset == name
    assert isinstance(back.model.dpt_channels, tuple)


def test_replace_nested_and_unknown_key(tmp_path):
    cfg = get_preset("cpu-tiny").replace(train={"epochs": 3})
    assert cfg.train.epochs == 3 and cfg.model.backbone == "tiny"
    bad = cfg.to_dict()
    bad["model"]["not_a_field"] = 1
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="not_a_field"):
        RunConfig.load(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="broken.json"):
        RunConfig.load(tmp_path / "broken.json")


def test_roi_slice_policy_default_old_files_and_validation(tmp_path):
    cfg = get_preset("paper-vitb")  # cpu-tiny uses "resample" (tests/test_real_geometry.py)
    assert cfg.roi.slice_policy == "pad"
    # a config.json written before the field existed loads with the old behaviour ("pad")
    old = cfg.to_dict()
    del old["roi"]["slice_policy"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = RunConfig.load(tmp_path / "old.json")
    assert back.roi.slice_policy == "pad" and back == cfg
    # "resample" round-trips through config.json
    res = cfg.replace(roi={"slice_policy": "resample"})
    assert RunConfig.load(res.save(tmp_path / "res.json")).roi.slice_policy == "resample"
    # a bad value is rejected on load with a clear message
    bad = cfg.to_dict()
    bad["roi"]["slice_policy"] = "stretch"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(
        ConfigError, match=r"roi\.slice_policy must be one of 'pad', 'resample', not 'stretch'"
    ):
        RunConfig.load(tmp_path / "bad.json")
