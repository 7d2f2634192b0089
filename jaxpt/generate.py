"""``python -m jaxpt.generate``: the generation command; see ``jaxpt.cli.generate``."""

import sys

from jaxpt.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
