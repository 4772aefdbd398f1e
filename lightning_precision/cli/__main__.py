"""``python -m lightning_precision.cli``: the same as the ``lightning-precision`` console script."""

import sys

from lightning_precision.cli import main

if __name__ == "__main__":
    sys.exit(main())
