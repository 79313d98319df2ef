"""Mean ± std of ES, DD, LMP, ... over repeated samples of N_u edits: `dcedit evaluate`.

    python python/evaluate.py --help

Same flags as `dcedit evaluate` (see `dcedit_kernels/cli.py`); works from a checkout without installing
the package.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Python put this script's folder first on the path; drop it, so that this file (python/evaluate.py
# in particular) never shadows a package of the same name that a library looks for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dcedit_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
