"""Scanner sites of the phantom cohort (issue 13): what a site changes, and what it must not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mrn_engine.errors import InputDataError
from mrn_engine.phantom import make_phantom_case
from mrn_engine.phantom.cohort import plan_cohort
from mrn_engine.phantom.site import SITES, Site, parse_sites


@pytest.fixture(scope="module")
def site_a():
    return make_phantom_case(1, seed=21)


def test_default_is_site_a(site_a):
    again = make_phantom_case(1, seed=21, site=SITES["A"])
    assert site_a.site == again.site == "A"
    for k in ("nm", "qsm", "t1", "nm_mask", "qsm_mask"):
        np.testing.assert_array_equal(getattr(site_a, k), getattr(again, k))


def test_gain_offset_and_unit_change_only_the_values(site_a):
    site = dataclasses.replace(SITES["A"], name="X", gain=0.6, offset=2000.0, qsm_unit="ppm")
    x = make_phantom_case(1, seed=21, site=site)
    np.testing.assert_array_equal(x.nm, np.rint(np.float32(0.6) * site_a.nm + np.float32(2000)))
    np.testing.assert_allclose(x.qsm, np.round(site_a.qsm / 1000.0, 4), atol=1e-6)
    np.testing.assert_array_equal(x.nm_mask, site_a.nm_mask)
    np.testing.assert_array_equal(x.qsm_mask, site_a.qsm_mask)
    np.testing.assert_array_equal(x.t1, site_a.t1)
    for k in ("severity", "age"):  # the class latents (the oracle's input) are untouched
        assert x.latents[k] == site_a.latents[k]


def test_noise_contrast_and_bias_change_the_images_not_the_subject(site_a):
    b = make_phantom_case(1, seed=21, site=SITES["B"])
    assert b.site == "B"
    assert b.latents["severity"] == site_a.latents["severity"]
    assert b.latents["age"] == site_a.latents["age"]
    np.testing.assert_array_equal(b.qsm_mask, site_a.qsm_mask)
    # site B: 0.8 x NM contrast, 1.5 x NM noise, offset 2000 -> the NM floor is above site A's
    assert b.nm.min() >= 2000.0 and site_a.nm.min() < 2000.0
    assert b.latents["nm_contrast_factor"] == pytest.approx(
        0.8 * site_a.latents["nm_contrast_factor"]
    )
    noise_a = np.std(site_a.qsm[site_a.qsm_mask == 7])
    noise_b = np.std(b.qsm[b.qsm_mask == 7])
    assert noise_b > 1.1 * noise_a  # 1.4 x QSM noise (thalamus: flat susceptibility)


def test_plan_sites_balanced_and_independent_of_labels():
    base = plan_cohort(40, 3, 1 / 3)
    mixed = plan_cohort(40, 3, 1 / 3, sites=["A", "B", "C", "D"])
    for a, b in zip(base, mixed, strict=True):
        assert {k: a[k] for k in a} == {k: b[k] for k in a}  # labels, splits, seeds unchanged
    counts = {s: sum(p["site"] == s for p in mixed) for s in "ABCD"}
    assert counts == {"A": 10, "B": 10, "C": 10, "D": 10}
    assert "site" not in base[0]


def test_parse_sites():
    assert [s.name for s in parse_sites("A, C")] == ["A", "C"]
    assert isinstance(parse_sites(["B"])[0], Site)
    with pytest.raises(InputDataError, match="unknown site"):
        parse_sites("A,Z")
    with pytest.raises(InputDataError, match="named twice"):
        parse_sites("A,A")
    with pytest.raises(InputDataError, match="at least one"):
        parse_sites(" , ")
