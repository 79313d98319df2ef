"""The library's warnings and refusals as the command line says them: in its flags' terms."""

from __future__ import annotations

import os
import re
import sys

import torch

from ..models import DTYPES

# ModelEditor.apply's rounding warning, as the command line says it: the library's text points a
# Python caller at `handle.stats['changed_fraction']` and at editing "a float32 copy of the model",
# under a source line of evaluate.py; the command line's user has --dtype float32 instead.
_ROUNDING = re.compile(r"ModelEditor\.apply: most entries of the shift of (?P<layers>.*) were lost to "
                       r"rounding: ")


def show_warning(message, category, filename, lineno, file=None, line=None, *, shown):
    """warnings.showwarning while a command runs (`shown`: the one it replaces): the warnings the
    command line words itself go to stderr as one `dcedit: warning:` line; the others to `shown`."""
    found = _ROUNDING.match(str(message))
    if found is None:
        return shown(message, category, filename, lineno, file, line)
    print(f"dcedit: warning: most entries of the shift of {found['layers']} were lost to rounding: "
          "they are below half the resolution of the 16-bit weights, which store W + αΔ rounded; "
          "--dtype float32 keeps the whole shift", file=sys.stderr if file is None else file, flush=True)


def non_finite_edit(exc: FloatingPointError, dtype: str) -> str:
    """An edit's FloatingPointError (`ModelEditor.apply`: a non-finite loss, gradient, editor output
    or shifted weight, the model restored) as one line; under --dtype float16 it names the dtypes with
    the range, since fp16's overflow (above 65504) is the usual cause: bf16 and float32 reach 3e38."""
    hint = ("; --dtype float16 overflows above 65504: --dtype bfloat16 or float32 has the range"
            if DTYPES.get(dtype) is torch.float16 else "")
    return f"{exc} (the model is unchanged){hint}"


# The library's refusals of `dcedit train` (a resume: train_checkpoint; torchrun's processes:
# distributed), as the command line says them: the library's text names TrainConfig and
# ModelEditor fields ("lr_lr 0.0001 -> 0.5", "loss_reduction='token'", "n_editors: saved 2")
# and advises Python ("use another checkpoint_dir, or resume=False"), where the command line's
# user typed flags.  Matched on the library's wording, as _ROUNDING is; a message that matches
# none is shown as the library words it.
_FLAGS = {"lr": "--lr", "lr_lr": "--lr-lr", "batch_size": "--batch-size", "locality_rows": "--locality-rows",
          "seed": "--seed", "val_size": "--val-size", "rank": "--rank", "n_editors": "--n-editors",
          "train_requests": "--data / --n-edits: other training edits",
          "val_requests": "--val-data / --val-size: other validation edits"}
_RESUME_ADVICE = "give that run's flags to resume it, or another --checkpoint-dir (or empty it) to start over"


def _flag_value(text: str) -> str:
    """A value of the library's message (a repr) as a flag takes it: 'own' -> own, None -> unset."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return "unset" if value is None else value if isinstance(value, str) else text


def _changed_setting(item: str) -> str:
    """One entry of a resume's "other settings" list ("lr 0.001 -> 0.002", "train_requests
    (different requests)") in flags; a field no flag sets (a checkpoint of a Python run) as it is."""
    field, _, rest = item.partition(" ")
    if field not in _FLAGS:
        return item
    if rest == "(different requests)":
        return _FLAGS[field]
    before, arrow, now = rest.partition(" -> ")
    return f"{_FLAGS[field]} {_flag_value(before)} -> {_flag_value(now)}" if arrow else item


def _other_settings(found: re.Match) -> str:
    changed = ", ".join(_changed_setting(item) for item in found["changed"].split(", "))
    return (f"--checkpoint-dir: {found['path']} was written by a run with other settings ({changed}): "
            f"resuming would continue that run; {_RESUME_ADVICE}")


def _other_editor(found: re.Match) -> str:
    """"written for another editor (mend on [...]) (editor 37x24 rank: saved 4, here 8)": the
    saved run's flags (--method, --layers, --rank, --n-editors)."""
    import ast

    flags = [f"--method {found['method']}", "--layers " + ",".join(ast.literal_eval(found["layers"]))]
    for part in (found["diff"] or "").split("; "):
        key, _, values = re.sub(r"^editor \S+ ", "", part).partition(": saved ")
        saved = values.rpartition(", here ")[0]
        shown = f"{_FLAGS[key]} {_flag_value(saved)}" if key in _FLAGS else part
        if part and shown not in flags:  # one per editor shape: said once
            flags.append(shown)
    return (f"--checkpoint-dir: {found['path']} was written for another editor ({' '.join(flags)}): "
            f"{_RESUME_ADVICE}")


def _other_processes(found: re.Match) -> str:
    keys = ", ".join(_FLAGS.get(key.removeprefix("config."), key) for key in found["keys"].split(", "))
    return (f"the processes were given different training settings ({keys}): every process of a "
            "data-parallel `dcedit train` needs the same flags, --data, --val-data and --checkpoint-dir")


_IN_CLI_TERMS = (
    (re.compile(r"(?P<path>.+) was written by a run with other settings \((?P<changed>.*)\): resuming would "
                r"continue that run; use another checkpoint_dir, or resume=False to start over"), _other_settings),
    (re.compile(r"(?P<path>.+) was written for another editor \((?P<method>\w+) on (?P<layers>\[.*?\])\)"
                r"(?: \((?P<diff>.*)\))?"), _other_editor),
    (re.compile(r"(?P<path>.+) was trained with loss_reduction='(?P<saved>\w+)', this ModelEditor uses "
                r"'(?P<now>\w+)': (?P<why>.*)"),
     lambda m: (f"--checkpoint-dir: {m['path']} was trained with --loss-reduction {m['saved']}, not {m['now']}: "
                f"{m['why']}; {_RESUME_ADVICE}")),
    (re.compile(r"(?P<path>.+) is not a train_editor checkpoint(?P<why> \(.*\))?"
                r"(?:; use another checkpoint_dir, or resume=False to start over)?"),
     lambda m: (f"--checkpoint-dir: {m['path']} is not a `dcedit train` checkpoint{m['why'] or ''}: "
                "give another --checkpoint-dir, or empty it, to start over")),
    (re.compile(r"(?P<what>the processes .*): a resume needs the same checkpoint_dir on every process"),
     lambda m: f"{m['what']}: a resume needs the same --checkpoint-dir on every process"),
    (re.compile(r"the processes were given different training settings \((?P<keys>.*)\): every process of a "
                r"data-parallel run needs .*"), _other_processes),
    (re.compile(r"device '(?P<device>[^']*)': (?P<rest>.*)"),  # distributed.init_from_env: no GPU of LOCAL_RANK
     lambda m: f"--device {m['device']}: " + m["rest"].replace("(device 'cpu')", "(--device cpu)")),
)


def in_cli_terms(message: str) -> str:
    """`message`, a refusal of `dcedit train`'s library calls, in the flags' terms (_IN_CLI_TERMS)."""
    for pattern, reworded in _IN_CLI_TERMS:
        found = pattern.fullmatch(message)
        if found is not None:
            return reworded(found)
    return message


def counted(n: int, noun: str) -> str:
    """"1 step", "2 steps": the programs' counts (--repeats 1 printed "1 repeats")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def rank0() -> bool:
    """False in a process that torchrun started with RANK > 0.  A note about the inputs, which every
    process reads alike (a data file's blank records, an untrained editor), is printed by rank 0
    alone: torchrun's W processes printed it W times.  An error stays every process's own."""
    return os.environ.get("RANK", "0") == "0"
