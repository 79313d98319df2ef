"""Train an editor and save it (safetensors): `dcedit train`.

    python python/train_editor.py --help

Same flags as `dcedit train` (see `dcedit_kernels/cli/`); works from a checkout without installing
the package.
"""

import sys

import _checkout  # noqa: F401 (puts the checkout on the path; before the package import)
from dcedit_kernels.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
