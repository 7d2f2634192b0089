"""``python -m jaxpt.plan``: per-device memory of a run on a topology; see ``jaxpt.cli.plan``."""

import sys

from jaxpt.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
