"""``python -m mrn_engine.cli`` = ``mrn`` (for ``torchrun -m mrn_engine.cli train ...``)."""

from mrn_engine.cli import main

if __name__ == "__main__":
    main()
