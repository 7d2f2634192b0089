"""``python -m jaxpt.bench``: the benchmark command; see ``jaxpt.cli.bench``."""

import sys

from jaxpt.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
