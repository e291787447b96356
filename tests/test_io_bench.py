"""``mrn bench io``: the ISA-L gzip path against nibabel's zlib on one phantom case."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mrn_engine.cli import cli


def test_bench_io_one_case(tmp_path):
    out = tmp_path / "io.json"
    res = CliRunner().invoke(cli, ["bench", "io", "--cases", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "same voxels both ways: yes" in res.output
    figures = json.loads(out.read_text())
    med = figures["median"]
    assert figures["identical"] is True
    for key in ("make_s", "write_case_s", "isal_s", "zlib_s", "fast_s", "nibabel_s", "rois_s"):
        assert med[key] > 0, key
    # the ISA-L files are no larger than zlib level 1's (a few per cent smaller on phantoms)
    assert 0 < med["isal_mb"] <= med["zlib_mb"] * 1.02
    assert figures["write_speedup"] == med["zlib_s"] / med["isal_s"]
