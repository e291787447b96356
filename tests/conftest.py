"""Shared fixtures: a small synthetic cohort in the exact challenge layout (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

#: size of the shared test cohort (balanced PD/HC; train + val CSVs)
TEST_COHORT_SIZE = 8


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A deterministic 8-case phantom cohort written in the challenge layout."""
    from mrn_engine.phantom import generate_cohort

    out = tmp_path_factory.mktemp("phantom_cohort")
    generate_cohort(out, n=TEST_COHORT_SIZE, seed=123, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one torch thread is far faster than two oversubscribed ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
