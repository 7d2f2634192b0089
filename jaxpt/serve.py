"""``python -m jaxpt.serve``: the OpenAI-compatible server; see ``jaxpt.cli.serve``."""

import sys

from jaxpt.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
