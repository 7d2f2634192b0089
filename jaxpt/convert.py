"""``python -m jaxpt.convert SRC OUT_DIR``: write a Hugging Face dir; see ``jaxpt.cli.convert``."""

import sys

from jaxpt.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
