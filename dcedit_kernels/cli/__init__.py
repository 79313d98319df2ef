"""`dcedit`: train an editor, apply edits, evaluate methods, from the command line.

    dcedit train    --method mend --data counterfact-train.json --out editor.safetensors
    dcedit edit     --editor editor.safetensors --prompt "The capital of France is" --target Rome
    dcedit edit     --method ft --data counterfact-val.json --n-edits 10 --out edit.json
    dcedit evaluate --editor editor.safetensors --data counterfact-val.json --n-edits 25,75 --repeats 3

Common flags: `--model` (default: the embedded SmolLM2-135M-Instruct; else a Hugging Face causal
or seq2seq model name or a local folder / .gguf file), `--layers` (module names, comma-separated;
default: the MLP output projections of the last three blocks), `--method`, `--n-editors`,
`--data` (a CounterFact (EasyEdit) or zsRE (MEND) JSON file, format detected from its records, or
a data set's name such as `counterfact-val`, looked up as `data.load_dataset` does; default: our
own facts, `dcedit_kernels.facts`), `--n-edits`, `--device`, `--dtype`, `--out`.

Errors a user can fix (a missing model file, an unknown layer name, an empty or malformed data
file) print one `dcedit: error: ...` line naming the culprit and return exit status 2.
`python/train_editor.py`, `python/edit.py` and `python/evaluate.py` run the same subcommands.

The package's modules: `options` (the parser, the flags' types, the editor arguments they give),
`inputs` (threads, layers, the model, edit requests, completions), `output_files` (--out and the
JSON record), `commands` (train, edit, evaluate), `messages` (the library's warnings and refusals
in the flags' terms), `user_error` (UserError, printed as one line).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import warnings
from typing import Sequence

from .. import distributed
from .._checks import SEED_RANGE
from ..models import DTYPES
from .commands import COMMANDS, cmd_edit, cmd_evaluate, cmd_train
from .inputs import (callers_threads_kept, check_count, default_layers, detect_format, editable_layers,
                     greedy_completions, load_any_model, load_requests, parse_layers, require_matplotlib, set_threads,
                     shown)
from .messages import counted, in_cli_terms, rank0, show_warning
from .methods import EDITOR_METHODS, METHOD_NAMES
from .options import (METRICS_HELP, build_parser, check_flags, editor_kwargs, parse_sizes, positive_int, rate,
                      seed_int, thread_count)
from .output_files import check_inputs, check_out, save_figure, train_out, write_json, write_text
from .user_error import UserError, refuse_empty

__all__ = [
    "COMMANDS", "DTYPES", "EDITOR_METHODS", "METHOD_NAMES", "METRICS_HELP", "SEED_RANGE", "UserError",
    "build_parser", "callers_threads_kept", "check_count", "check_flags", "counted", "check_inputs", "check_out", "cmd_edit",
    "cmd_evaluate", "cmd_train", "refuse_empty",
    "default_layers", "detect_format", "editable_layers", "editor_kwargs", "greedy_completions",
    "in_cli_terms", "load_any_model", "load_requests", "main", "parse_layers", "parse_sizes",
    "positive_int", "rate", "require_matplotlib", "save_figure", "seed_int", "set_threads", "shown",
    "thread_count", "train_out", "write_json", "write_text",
]


def _resume_hint(args) -> str:
    """What an interrupted `dcedit train` left to resume from."""
    from ..train_checkpoint import has_checkpoint

    if args.command != "train":
        return ""
    if args.checkpoint_dir is None:
        return ": nothing was saved (with --checkpoint-dir a run can be resumed)"
    where = args.checkpoint_dir
    if not has_checkpoint(where):
        return f": no checkpoint in {where} yet (one is written every --val-every steps)"
    return (f": run the same command again to resume from the last checkpoint in {where} "
            "(written every --val-every steps)")


PATH_FLAGS = ("model", "data", "val_data", "editor", "out", "checkpoint_dir")


def _expand_home(args) -> None:
    """A quoted "~/..." (which the shell leaves as it is) in any path flag means the home folder:
    --model and --data took it so (their loaders expand it), but --out "~/e.safetensors" wrote under a
    folder named "~" in the working folder, and --editor/--checkpoint-dir were "not found" or new."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dcedit` with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        # Unknown flags after the command are refused by the command's parser, whose usage line
        # lists that command's flags (the top-level parser prints only "dcedit {train,edit,evaluate}").
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            words = list(sys.argv[1:] if argv is None else argv)
            before_command = words[:words.index(args.command)]
            owner = parser if any(u in before_command for u in unknown) else args.command_parser
            owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code or 0)
    args.seed_given = args.seed is not None
    if args.seed is None:
        args.seed = 0
    _expand_home(args)
    start = time.perf_counter()
    # callers_threads_kept: set_threads below, called from Python, left the process on --threads
    with callers_threads_kept(), _printable_stdout(), _sigterm_interrupts():
        try:
            check_flags(args)  # before the model loads
            out = train_out(args) if args.command == "train" else args.out
            # Under torchrun rank 0 alone writes --out: train's processes save one editor, and edit's
            # and evaluate's each run the whole command (they join no process group), so all W of them
            # wrote the same JSON record and printed "wrote" W times, the file holding the last one's
            # timings.  check_out creates and removes --out to see that it can be written: two processes
            # doing so at once removed each other's file ("--out X: cannot be written (No such file or
            # directory)") or left an empty one (measured: 0 to 341 refusals in 3,000 pairs of concurrent
            # calls, 5 runs on a loaded 2-core machine).  Every process reads --editor: each checks it.
            writes = rank0()
            if writes and out:
                check_out(out)
            check_inputs(args, out if writes else None)
            set_threads(args.threads)
            with warnings.catch_warnings():  # filters a command adds (`_model_editor`) end with it
                # catch_warnings puts the caller's showwarning back
                warnings.showwarning = functools.partial(show_warning, shown=warnings.showwarning)
                result = COMMANDS[args.command](args)
            if args.out and args.command != "train" and writes:
                write_json(args.out, dict(result, elapsed_s=time.perf_counter() - start))
                print(f"wrote {args.out}")
        except UserError as exc:
            print(f"dcedit: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            # A Ctrl-C of a training run ended in a traceback into train.py's loop, which said nothing
            # of the one thing to do next: resume (`fit` checkpoints atomically: the last one is whole).
            if isinstance(exc, Terminated):
                print(f"dcedit: terminated (SIGTERM){_resume_hint(args)}", file=sys.stderr)
                return 128 + signal.SIGTERM  # 143, what the shell reports for a process SIGTERM ended
            print(f"dcedit: interrupted{_resume_hint(args)}", file=sys.stderr)
            return 130  # the shell's status for SIGINT
        except OSError as exc:
            # A path the checks above let through (a name too long, a folder that refuses a file):
            # its str names the file, so one line says it all.  An OSError that names no file (a
            # socket, a device, a library's own) keeps its traceback: that is where it came from.
            if exc.filename is None:
                raise
            print(f"dcedit: error: {exc}", file=sys.stderr)
            return 2
    return 0


@contextlib.contextmanager
def _printable_stdout():
    """stdout writes what its encoding cannot hold as backslash escapes while a command runs (as
    Python's stderr always does): under a latin-1 or ASCII stdout (PYTHONIOENCODING, a non-UTF-8
    locale, a Windows redirect) `edit`'s lines of a Chinese prompt, or of a completion holding
    U+FFFD, raised UnicodeEncodeError after the edit had run, and --out was never written."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    reconfigure = getattr(stream, "reconfigure", None)
    if not callable(reconfigure) or errors != "strict":  # a C locale's surrogateescape writes a path's bytes back
        yield
        return
    reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        reconfigure(errors=errors)


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command runs (`_sigterm_interrupts`): a KeyboardInterrupt, so that it unwinds
    as Ctrl-C does (held back while an edit writes weights, `edit_handle.deferred_interrupt`)."""


def _raise_terminated(signum, frame):
    # One is enough: the command is ending.  A second SIGTERM while the first unwinds (a launcher
    # that forwards it, `kill` run twice) raised again inside that unwinding, in a checkpoint
    # write's cleanup too, which then left its hidden temporary file behind; main() puts the
    # default back when it returns.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a cluster's preemption, `kill`) ends a command as Ctrl-C does while it runs: Python's
    default ended the process at once, so a checkpoint being written left its hidden temporary file
    behind (one per kill, up to a trainer file each: 8 of 65 kills in a helper's trials), and
    nothing said how to resume.  Only where SIGTERM has its default action, in the main thread (the
    only one Python delivers signals to), and not in a torchrun worker: torchrun stops the others
    with SIGTERM when one fails, and one waiting in a collective would run no Python handler until
    its timeout."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            or distributed.one_of_several()):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
