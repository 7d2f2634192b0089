"""``python -m jaxpt.train``: the training command; see ``jaxpt.cli.train``."""

import sys

from jaxpt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
