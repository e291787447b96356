"""The bad-input corpus (issue 12): malformed cases, label files, configs and bundles.

``python -m mrn_engine.badinput`` (or ``docs/scripts/bad_inputs.py``) runs every scenario
through the ``mrn`` command line and prints the table of docs/reliability.md.
"""

from mrn_engine.badinput.corpus import SCENARIOS, Invocation, Scenario
from mrn_engine.badinput.runner import Outcome, run_corpus, table

__all__ = ["SCENARIOS", "Invocation", "Outcome", "Scenario", "run_corpus", "table"]
