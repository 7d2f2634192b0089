"""``python -m jaxpt.eval``: the evaluation command; see ``jaxpt.cli.eval``."""

import sys

from jaxpt.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
