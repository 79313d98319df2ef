"""Run the `python/` programs from a checkout without installing the package: `import _checkout`
first (Python put this folder first on the path, so it is found) puts the repository root on the
path and drops this folder from it, so that a program here (python/evaluate.py in particular) never
shadows a package of the same name that a library looks for."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
