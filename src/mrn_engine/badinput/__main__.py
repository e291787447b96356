"""``python -m mrn_engine.badinput [NAME ...] [--out table.md]``: run the corpus, print the table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrn_engine.badinput", description=__doc__)
    parser.add_argument("names", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--keep", type=Path, help="build the scenarios in this folder and keep it")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from mrn_engine.badinput import run_corpus, table

    t0 = time.perf_counter()
    outcomes = run_corpus(args.names or None, args.keep)
    text = table(outcomes) + f" ({time.perf_counter() - t0:.0f} s)"
    print(text)
    if args.out is not None:
        from mrn_engine.config import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
