"""`python -m mmar ...` is `mmar ...` (torchrun launches the runtime this way: `torchrun ... -m mmar train DIR`)."""

import sys

from mmar.cli import main

if __name__ == "__main__":
    sys.exit(main())
