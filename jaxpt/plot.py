"""``python -m jaxpt.plot``: the plot command; see ``jaxpt.cli.plot``."""

import sys

from jaxpt.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
