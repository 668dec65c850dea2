"""`python -m telltale_norm ...`: the same as the `telltale-norm` command."""

import sys

from telltale_norm.cli import main

if __name__ == "__main__":  # vLLM starts processes: engines must not start on import
    sys.exit(main())
