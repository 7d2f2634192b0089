"""``python -m jaxpt.winrate``: the winrate command; see ``jaxpt.cli.winrate``."""

import sys

from jaxpt.cli.winrate import main

if __name__ == "__main__":
    sys.exit(main())
