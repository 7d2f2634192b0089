"""``python -m jaxpt.quickstart``: the SFT -> GRPO demo; see ``jaxpt.cli.quickstart``."""

import sys

from jaxpt.cli.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
