"""The bad-input corpus (docs/reliability.md): every malformed case, label file, config and bundle
gives a specific message naming the file and the problem, no traceback, no partial output, and
leaves the inputs byte-identical. ``python -m mrn_engine.badinput`` prints the same table."""

from __future__ import annotations

import pytest

from mrn_engine.badinput import SCENARIOS
from mrn_engine.badinput.cases import write_bundle
from mrn_engine.badinput.runner import run_scenario

pytestmark = pytest.mark.slow


def test_corpus_is_large_enough():
    assert len(SCENARIOS) >= 40
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    return root, write_bundle(root / "_shared_bundle")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_bad_input(scenario, shared, one_torch_thread):
    workdir, bundle = shared
    outcome = run_scenario(scenario, workdir, bundle)
    assert outcome.ok, f"{outcome.problems}\n{outcome.message}"
