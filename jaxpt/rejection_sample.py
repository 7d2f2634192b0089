"""``python -m jaxpt.rejection_sample``: rejection-sampling data generation; see
``jaxpt.cli.rejection_sample``."""

import sys

from jaxpt.cli.rejection_sample import main

if __name__ == "__main__":
    sys.exit(main())
