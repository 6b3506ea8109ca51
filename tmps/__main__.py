"""``python -m tmps``: the command line (see :mod:`tmps.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
