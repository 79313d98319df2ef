"""Writing a safetensors file, as every checkpoint here does (`ModelEditor.save`,
`GroupedEditor.save`, the trainer's checkpoints), or any file written whole (`replace_atomically`:
the CLI's JSON records too); reading one, its config and tensors of one file (`read_safetensors`),
and the checks both editor loads make of one they read (`ModelEditor.load`, `GroupedEditor.load`)."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import torch

from ._checks import check_path


def folder_refusal(folder) -> str | None:
    """The OS's reason why nothing can be made in the existing folder `folder`, or None: a folder of
    a name of our own is made there and removed again.  os.access passes every folder for root and
    says nothing of a read-only mount's or /proc's refusal; a name of our own, so that checks of one
    folder at once (commands writing into the same new folder) do not remove each other's.  The
    CLI's --out check and a checkpoint_dir's (`train_checkpoint.check_checkpoint_dir`) ask it."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dcedit-write-check-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def replace_atomically(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file's content to `tmp`, a file beside `path` under a name of its own
    (threads and processes writing the same path do not share it), which is then moved over
    `path`: a failed or interrupted write leaves the previous file whole (the file is synced to disk
    before the move, and the folder after it, so a crash of the machine leaves the old file or the new
    one, not a partial one).  The file gets the mode
    any file this process creates gets (0o666 less the umask), or, written over an existing file,
    that file's mode (as torch.save's): safetensors 0.8 writes through a private temporary file
    and leaves its mode, 0600, so a checkpoint was unreadable to the user's group.  A file this
    user may not write is not replaced (PermissionError naming it, as torch.save's open()), nor is
    anything but a regular file (ValueError: a device such as /dev/null would be).  A symbolic
    link is followed: the file it points to is replaced, the link kept.  `path`'s
    folder must exist (FileNotFoundError naming it): a library call creates no folder, as torch.save
    and safetensors' save_file create none (a mistyped path would leave a new tree); the CLI, which
    checks its --out before any work, creates --out's folder."""
    check_path(path, "path")
    if os.fspath(path).endswith(("/", os.sep)):
        # A folder's name: pathlib drops the separator, so "e.safetensors/" wrote the file
        # e.safetensors, which a load of "e.safetensors/" then did not find (open() refuses it).
        raise IsADirectoryError(f"cannot save to {path}: it ends in a separator, as a folder does; give a file name")
    path = Path(path)
    if path.is_symlink():
        # Written where the link points, as torch.save's open() writes: the move replaced the link
        # itself with a file and left its target as it was (a "latest.safetensors" link cut off from
        # its run's file; as root, "--out /dev/stdout" sent to a file replaced /dev's own link).
        path = Path(os.path.realpath(path))
    if not path.parent.is_dir():  # safetensors would name its temporary file instead
        raise FileNotFoundError(f"cannot save to {path}: the folder {path.parent} does not exist")
    if path.is_dir():  # os.replace would name the temporary file ("Is a directory: '.x.<hex>.tmp' -> x")
        raise IsADirectoryError(f"cannot save to {path}: it is a folder; give a file name")
    if path.exists() and not path.is_file():
        # A device, a pipe or a socket (/dev/null, /dev/stdout): the move put a regular file in its
        # place, which as root replaced the system's /dev/null.  torch.save writes into it; a save
        # here moves a whole file over the path, so it refuses.
        raise ValueError(f"cannot save to {path}: it is not a regular file (a device, a pipe or a socket), "
                         "which a save would replace with one; give a file name")
    if path.is_file() and not os.access(path, os.W_OK) and not _on_a_read_only_mount(path):
        # open() refuses a file its user may not write (torch.save, numpy.save, the CLI's --out
        # check): moved over it, a checkpoint made read-only to keep it was replaced without a word.
        raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (a read-only file)", str(path))
    tmp = path.with_name(f".{path.name[:64]}.{uuid.uuid4().hex}.tmp")  # short: a long name still fits
    try:
        # Created as any new file is (the kernel applies the umask), to read the mode it gets; a
        # file saved over keeps its own mode, as torch.save's does (a 0600 checkpoint stays private).
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else None
        except OSError:
            mode = None
        if mode is None:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        _sync(tmp)  # its bytes on disk before the move: else a crash of the machine (not only of the
        # process) could leave the new name on an empty or partial file
        os.replace(tmp, path)
        _sync(path.parent)  # the move itself (best effort: not every system syncs a folder)
    except OSError as exc:
        if exc.filename not in (None, str(tmp)) or exc.errno is None:
            raise
        # The temporary file is no name the caller gave, and it is gone by now: a read-only folder
        # said "Permission denied: '<folder>/.x.<hex>.tmp'"; and a write cut short (a full disk)
        # named no file at all, so that `dcedit` showed a traceback.  The error names `path`.
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        # Only a file there: on a read-only mount, unlinking a missing one fails (EROFS, not ENOENT),
        # and that error, naming the temporary file, replaced the one above.
        if os.path.lexists(tmp):
            tmp.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """fsync `path` (a file, or a folder for the entries in it): a write of the data, then of the
    move, reaches the disk in that order.  A folder that cannot be opened or synced (Windows, some
    file systems: EINVAL) is left to the system.  Cost measured on this 2-core machine's ext4 disk
    (medians of 5 and 20 saves): a 64 MiB save 0.07 s without the syncs, 0.12-0.28 s with them; a
    4 KB one 0.45 ms and 1.45 ms, against training steps of seconds between checkpoints."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _on_a_read_only_mount(path: Path) -> bool:
    """Whether `path` lies on a file system mounted read-only (a container's read-only volume),
    where os.access refuses every file: the save's own error, "Read-only file system" naming the
    path as open()'s, says why, not "a read-only file".  False where that is unknown (no statvfs:
    Windows; a file system that answers none)."""
    try:
        return hasattr(os, "statvfs") and bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


VERSION_KEY = "dcedit_kernels_version"  # the metadata entry naming the release that wrote a file


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` to `path`, written beside it and moved over it, with the mode
    of a file this process creates, or of the file saved over (`replace_atomically`).

    save_file's own writes, cut short (a full disk, a file size limit), raise SafetensorError "Error
    while serializing: I/O error: ... (os error 27)" (0.4.5 and 0.5.3: "Error while serializing:
    IoError(Os { code: 27, kind: FileTooLarge, ... })"): no OSError and no file name (a traceback under
    `dcedit`, after the whole training run).  That error is the OSError it stands for, naming
    `path`.  Streamed by save_file, not serialized in memory first (safetensors.torch.save): that
    held the whole file's bytes beside the tensors, a checkpoint's size more at peak.  save_file
    streams from safetensors 0.8 on; before it save_file makes the tensors' bytes itself first
    (measured on 0.4.5, 0.5.3, 0.6.2 and 0.7.0: a 16 MiB peak saving one 16 MiB tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from . import __version__

    # Every file says which release wrote it: a helper's trials found files of 0.5.30 and of 0.5.38
    # alike byte for byte in their metadata, so a change of what a file means (a RaEditor's routing
    # draws changed in 0.5.8 and 0.5.36) could not be told from the file.
    # JSON, as the package's other entries are (a reader decoding each entry choked on a bare 0.5.39).
    metadata = {VERSION_KEY: json.dumps(__version__), **(metadata or {})}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            # "(os error 27)"; before safetensors 0.6 the error's Debug form, "IoError(Os { code: 27, ...".
            code = re.search(r"\(os error (\d+)\)|\bOs \{ code: (\d+),", str(exc))
            if code is None or os.name != "posix":  # Windows' "os error" is a Win32 code, not an errno
                raise
            errno_ = int(code.group(1) or code.group(2))
            raise OSError(errno_, os.strerror(errno_), str(tmp)) from None

    replace_atomically(path, write)


def read_safetensors(path, required: set, attempts: int = 3) -> tuple[dict, list, dict | None]:
    """(metadata, tensor names, tensors on the CPU) of the safetensors file at `path`, all of one
    file; the tensors are None, unread, where the metadata lacks a key of `required` (a foreign file
    is refused unread).  The OS's own error for a file this process cannot open (PermissionError
    naming it): safetensors reports any failure to open one as FileNotFoundError "No such file or
    directory", without errno or file name.  SafetensorError when it is not a safetensors file.

    safetensors' readers (safe_open, load_file: 0.8's under torch) parse the header of the file
    they open, then map the file at `path` again for the tensors (torch's UntypedStorage.from_file):
    a save over `path` in between (another process's: a save moves a whole new file over the path)
    gave one file's header the other's bytes, so a load read another editor's tensors without a word
    (a process loading while another saved two editors of one shape there in turn: 5 loads of 300
    under a single safe_open).  The read holds the file `path` names open while it reads, so that
    no other file can take its inode, and checks that `path` still names it after: if not, it reads
    again (the file now there, whole), and after `attempts` such reads raises OSError (EAGAIN)
    naming the path.  Not one read of the bytes (safetensors.torch.load): that held the file's bytes
    beside its tensors, a checkpoint's size more at peak."""
    from safetensors import safe_open

    for _ in range(attempts):
        with open(path, "rb") as held:
            before = os.fstat(held.fileno())
            # On the CPU whatever torch's default device: safetensors before 0.6 builds the tensors
            # with torch factories, which a set_default_device("meta") sent to "meta" (no data).
            with safe_open(os.fspath(path), framework="pt") as f, torch.device("cpu"):
                meta, names = f.metadata() or {}, list(f.keys())
                tensors = {k: f.get_tensor(k) for k in names} if required <= set(meta) else None
            after = os.stat(path)
        if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
            return meta, names, tensors
    # An OSError naming the path, as the OS's own errors of a load are: `dcedit` prints it in one line.
    raise OSError(errno.EAGAIN, f"saved over while it was read, {attempts} times running (another process "
                  "saving there?): load it again once that is done", str(path))


def json_metadata(path, key: str, text: str) -> dict:
    """A checkpoint's JSON metadata entry `key` (its `text`) as a dict; ValueError naming the file
    when it is not JSON or not a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested ~1000 deep
        raise ValueError(f"{path}: its {key} metadata is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: its {key} metadata must be a JSON object, got {type(value).__name__}")
    return value


def check_state(state: dict, expected: dict, mismatch: str, name) -> None:
    """ValueError unless `state` holds exactly `expected`'s keys, each of its shape: `mismatch` leads
    the message about keys, `name(key)` names a tensor of another shape."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{mismatch}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise ValueError(f"{name(k)} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
