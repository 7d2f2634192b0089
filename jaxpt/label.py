"""``python -m jaxpt.label``: AI preference labels from a judge model; see ``jaxpt.cli.label``."""

import sys

from jaxpt.cli.label import main

if __name__ == "__main__":
    sys.exit(main())
