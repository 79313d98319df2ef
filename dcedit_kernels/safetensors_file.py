"""Writing a safetensors file, as every checkpoint here does (`ModelEditor.save`,
`GroupedEditor.save`, the trainer's checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` to `path`, with the mode any file this process creates gets
    (0o666 less the umask, as torch.save's): safetensors 0.8 writes through a private temporary
    file and leaves its mode, 0600, so a checkpoint was unreadable to the user's group.  Written
    beside `path` and moved over it, so a failed write leaves the previous file."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():  # safetensors would name its temporary file instead
        raise FileNotFoundError(f"cannot save to {path}: the folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """This process's umask: from /proc on Linux, else by setting it and back (os.umask has no getter)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
