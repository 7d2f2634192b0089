"""``python -m jaxpt.curate``: the data curation command; see ``jaxpt.cli.curate``."""

import sys

from jaxpt.cli.curate import main

if __name__ == "__main__":
    sys.exit(main())
