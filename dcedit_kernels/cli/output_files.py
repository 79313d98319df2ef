"""The files `dcedit` writes: --out, checked before any work, and the JSON record of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..safetensors_file import folder_refusal
from .inputs import named_data_file
from .user_error import UserError, check_path


def train_out(args) -> str:
    """Where `dcedit train` saves the editor: --out, else <method>-editor.safetensors here."""
    return args.out or f"{args.method}-editor.safetensors"


def check_out(path: str, flag: str = "--out", in_folder: bool = False) -> None:
    """Refuse an --out that cannot be written before any work is done (`flag`: the program's name
    for it in the error; `in_folder`: `flag` names the folder `path` is written in, as report.py's
    --out-dir and edit_demo.py's --out, not the file itself).  A folder of its path that does not
    exist yet is not made here but when the file is written (`write_json`, train's save): a command
    refused after this check (a bad --seed or data file, a layer name the model lacks, a failed edit)
    left the empty folders behind (`dcedit edit --seed 1 --out new/run.json`: new/)."""
    check_path(path, "path")
    out = Path(path)
    if out.is_symlink():  # the save writes where it points (replace_atomically): the checks are of that file
        out = Path(os.path.realpath(out))
    try:
        is_dir = out.is_dir()
    except OSError as exc:  # a name too long, ...: pathlib raises for all but "missing"
        raise UserError(f"{flag} {path}: {exc.strerror or exc}") from None
    # Not "give a file name" for a folder flag: given one (`--out-dir r.json`), the run writes r.json/report.json.
    fix = f"move it away, or give another {flag}" if in_folder else "give a file name"
    if is_dir:
        raise UserError(f"{flag} {path}: is a folder; {fix}")
    if out.exists() and not out.is_file():  # the open below blocked on a pipe; the save would replace a device
        raise UserError(f"{flag} {path}: is not a regular file (a device, a pipe or a socket), which the run "
                        f"would replace with one; {fix}")
    folder = _nearest_existing(out.parent)  # (a name too long was refused by is_dir above)
    if not folder.is_dir():  # a file, or a symbolic link to nothing, where a folder would be made
        raise UserError(f"{flag} {path}: cannot create its folder ({folder} is not a folder)")
    if folder != out.parent:
        _check_folder_can_be_made(path, folder, flag)
        return
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"{flag} {path}: its folder is not writable")
    existed = out.exists()
    try:  # os.access passes for root, and says nothing of the file itself: open it as the write will
        with open(out, "ab"):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot be written ({exc.strerror or exc})") from None


def _nearest_existing(folder: Path) -> Path:
    """`folder`, or its nearest ancestor that exists (a dangling symbolic link counts: mkdir refuses it)."""
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_folder_can_be_made(path: str, folder: Path, flag: str) -> None:
    """UserError unless --out's missing folders can be made in `folder`, the nearest that exists
    (`folder_refusal`)."""
    why = folder_refusal(folder)
    if why is not None:
        raise UserError(f"{flag} {path}: cannot create its folder in {folder} ({why})")


def check_checkpoint_dir(path: str, writes: bool = True) -> None:
    """Refuse, before the model loads, a --checkpoint-dir that is a file or under one (every process
    makes the folder), and one the run may not write (a read-only folder, or one under it; a
    checkpoint file in it made read-only) where `writes` (under torchrun, rank 0 alone writes): the
    first checkpoint, --val-every steps in, failed, and the training done so far was lost (--out is
    written at the end only).  The folder need not exist: fit creates it.  The library's check
    (train_editor makes it too), in the command line's terms."""
    from ..train_checkpoint import check_checkpoint_dir as check_writable  # the training code, only to train

    try:
        check_writable(path)
    except NotADirectoryError as exc:  # a file on the way ("a_file/ckpt"): fit's mkdir said so after the model's load
        where = "" if Path(exc.filename) == Path(path) else f"{exc.filename} "
        raise UserError(f"--checkpoint-dir {path}: {where}is a file; give a folder") from None
    except PermissionError as exc:
        if not writes:
            return
        if Path(exc.filename).is_dir():
            raise UserError(f"--checkpoint-dir {path}: cannot write in {exc.filename} (its checkpoints would fail "
                            "after --val-every steps); give a folder you may write") from None
        raise UserError(f"--checkpoint-dir {path}: its {Path(exc.filename).name} is read-only, which its checkpoints "
                        "may not replace (they would fail after --val-every steps); make it writable or give another "
                        "folder") from None


def check_inputs(args, out: str | None) -> None:
    """Refuse, before the model loads, an --editor that is no file or cannot be read (found only
    after the model had loaded, minutes for a large one) and an --out that is one of the command's
    input files (--editor, --data, --val-data, or a file of --model):
    `dcedit edit --editor E --out E` wrote its JSON record over the trained editor E.  The paths are
    main()'s, whose `_expand_home` expanded a quoted "~/..." in every path flag."""
    editor = getattr(args, "editor", None)
    if editor is not None and not Path(editor).is_file():
        raise UserError(f"--editor: file not found: {editor}")
    if editor is not None and not os.access(editor, os.R_OK):  # found by its load, after the model's
        raise UserError(f"--editor {editor}: cannot be read (permission denied)")
    if out is None:
        return
    for flag in ("--editor", "--data", "--val-data"):
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if flag != "--editor":
            path = named_data_file(path) or path  # a data set's name, as load_requests reads it
        try:
            same = path is not None and Path(path).is_file() and os.path.samefile(path, out)
        except OSError:  # out does not exist yet: it is no input file
            same = False
        if same:
            raise UserError(f"--out {out} is the {flag} file: the run would write over it; "
                            "give another --out")
    model_file = _model_file(getattr(args, "model", None), out)
    if model_file is not None:
        # `dcedit train --model M --out M/model.safetensors` wrote the editor over the model's weights.
        raise UserError(f"--out {out} is {model_file}: the run would write over it; give another --out")
    trainer_file = _trainer_file(getattr(args, "checkpoint_dir", None), out)
    if trainer_file is not None:
        # `dcedit train --checkpoint-dir C --out C/trainer.safetensors` saved the editor over the
        # checkpoint a resume reads, at the end of a run: a resume with more --steps was refused ("not a
        # `dcedit train` checkpoint"), the run lost.
        raise UserError(f"--out {out} is --checkpoint-dir's {trainer_file}, which a resume reads: "
                        "the run would write over it; give another --out")


def _trainer_file(checkpoint_dir, out: str) -> str | None:
    """The name of the file of --checkpoint-dir that a resume reads when --out names it, written yet
    or not (the run's first checkpoint writes it), else None."""
    if not checkpoint_dir:
        return None
    from ..train_checkpoint import TRAINER_FILE  # the CLI imports the training code only to train

    try:
        same = Path(out).resolve() == Path(checkpoint_dir).resolve() / TRAINER_FILE
    except (OSError, RuntimeError):  # a name too long, a symlink loop: check_out or the run says so
        return None
    return TRAINER_FILE if same else None


def _model_file(model, out: str) -> str | None:
    """How to name --out when it is an existing file of --model (a .gguf file, or a file in the model
    folder: its weights, config or tokenizer, which from_pretrained reads), else None."""
    if model is None:
        return None
    try:
        if not Path(out).is_file():
            return None
        model_path, out_path = Path(model).resolve(), Path(out).resolve()
        if model_path.is_file():
            return "the --model file" if out_path == model_path else None
        if model_path.is_dir() and model_path in out_path.parents:
            return "a file of the --model folder"
    except (OSError, RuntimeError):  # a name too long, a symlink loop: the model's load says so
        pass
    return None


def make_folder(path) -> None:
    """Make the folder the file `path` is written in, where it is missing: --out's, when the run
    writes it (check_out makes none), or, for a symbolic link, its target's (the save writes there)."""
    out = Path(path)
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)


def write_json(path, data) -> None:
    """`data` as JSON at `path`, written beside it and moved over it (`replace_atomically`): a write
    cut short (a full disk, a Ctrl-C) leaves the previous file whole, not a truncated one."""
    from .._checks import check_path as library_check_path  # a Python caller's ValueError

    library_check_path(path, "path")
    make_folder(path)
    write_text(path, json.dumps(data, indent=2, default=_json_default))


def write_text(path, text: str) -> None:
    """`text` as UTF-8 at `path`, written beside it and moved over it (`replace_atomically`): a write
    cut short leaves the previous file whole.  UTF-8 whatever the locale: report.md holds "±" and
    "‖", which a latin-1 or C locale's default encoding could not write."""
    from ..safetensors_file import replace_atomically

    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # `path` as given: a trailing "/" is refused


def save_figure(fig, path) -> None:
    """A matplotlib figure at `path`, written beside it and moved over it (`replace_atomically`): a run
    cut short in the write left a truncated plot over the previous run's good one.  The format is
    named from `path`'s suffix (PNG without one): savefig reads it from the file it writes, whose
    suffix is ".tmp"."""
    from ..safetensors_file import replace_atomically

    replace_atomically(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:] or "png"))


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
