"""Apply edits, print before/after completions and scores, undo: `dcedit edit`.

    python python/edit.py --help

Same flags as `dcedit edit` (see `dcedit_kernels/cli/`); works from a checkout without installing
the package.
"""

import sys

import _checkout  # noqa: F401 (puts the checkout on the path; before the package import)
from dcedit_kernels.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["edit", *sys.argv[1:]]))
