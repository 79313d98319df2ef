"""Edit data sets as lists of EditRequest: CounterFact (EasyEdit format) and zsRE (MEND format).

The files are not shipped in the repository.  `data_dir()` is where they are looked for:
`$DCEDIT_DATA_DIR` when set ("~" expanded), else `shared/data` beside the repository checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._records import check_limit
from .counterfact import load_counterfact
from .zsre import load_zsre

FILES = {
    "counterfact-train": "counterfact-train.json",
    "counterfact-val": "counterfact-val.json",
    "zsre-train": "zsre-train-1k.json",
}


def data_dir() -> Path:
    """Where the data files are looked for: `$DCEDIT_DATA_DIR` when set ("~" expanded), else
    `shared/data` beside the repository checkout (see the module docstring)."""
    env = os.environ.get("DCEDIT_DATA_DIR")
    if env:
        return Path(env).expanduser()  # "~/data" from an env file or quoted in a shell is not expanded there
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def data_path(name: str) -> Path:
    """Path of a known data file by name ("counterfact-train", "counterfact-val", "zsre-train")."""
    if not isinstance(name, str) or name not in FILES:
        raise ValueError(f"name must be one of {sorted(FILES)}, got {name!r}")
    return data_dir() / FILES[name]


def load_dataset(name: str, limit: int | None = None):
    """EditRequests of a known data file by name ("counterfact-train", "counterfact-val" or
    "zsre-train": `FILES`, in `data_dir()`).  `limit` counts records, as the loaders' does: for
    zsRE, whose blank-target records are skipped, that can be fewer requests (see `load_zsre`)."""
    path = data_path(name)
    check_limit(limit)  # before the file is looked for: without it, limit=0 was "not found"
    if not path.exists():  # a folder or a pipe of that name is there: the loaders say what it is
        # Without the variable, an installed copy looks in <site-packages>/../shared/data, which the
        # bare "(default: beside the checkout)" left unexplained (a user trial of an installed sdist).
        if os.environ.get("DCEDIT_DATA_DIR"):
            where = f"DCEDIT_DATA_DIR is {path.parent}"
        else:
            where = (f"DCEDIT_DATA_DIR is not set, and the default, shared/data beside the repository "
                     f"checkout, is {path.parent}; an installed copy has no checkout")
        raise FileNotFoundError(f"{path} not found ({where}; the data files are not shipped with the "
                                f"package): set DCEDIT_DATA_DIR to the folder that holds {FILES[name]}, "
                                "or load the file with load_counterfact / load_zsre")
    return load_zsre(path, limit=limit) if name.startswith("zsre") else load_counterfact(path, limit=limit)


__all__ = ["data_dir", "data_path", "load_counterfact", "load_dataset", "load_zsre", "FILES"]
