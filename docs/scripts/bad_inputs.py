"""Rerun the bad-input corpus and print (or write) the table of docs/reliability.md.

    PYTHONPATH=src python docs/scripts/bad_inputs.py [--out table.md] [SCENARIO ...]

Same as ``python -m mrn_engine.badinput``; exits 1 when a scenario fails its checks.
"""

import sys

from mrn_engine.badinput.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
