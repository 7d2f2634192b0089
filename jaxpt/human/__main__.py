"""``python -m jaxpt.human``: the human-evaluation command; see ``jaxpt.cli.human``."""

import sys

from jaxpt.cli.human import main

if __name__ == "__main__":
    sys.exit(main())
