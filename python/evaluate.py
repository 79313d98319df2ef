"""Mean ± std of ES, DD, LMP, ... over repeated samples of N_u edits: `dcedit evaluate`.

    python python/evaluate.py --help

Same flags as `dcedit evaluate` (see `dcedit_kernels/cli/`); works from a checkout without installing
the package.
"""

import sys

import _checkout  # noqa: F401 (puts the checkout on the path; before the package import)
from dcedit_kernels.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
