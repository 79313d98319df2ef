"""Editor training's settings and outcome: `TrainConfig` (its fields validated) and `TrainResult`.

Separate from the loop (`train`) so that the loss (`train_loss`) and the checkpoints
(`train_checkpoint`), which both read a TrainConfig, need not import the loop, which imports them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ._checks import check_bool, is_finite_number, is_int, is_number

VIEWS = ("own", "all")  # what a row sees: its edit's group's shift, or every group's (their sum)
LOCALITY_VIEWS = VIEWS + ("fused",)  # or the fused shift apply() adds (locality rows only)
PART_KEYS = ("loss", "edit", "kl", "balance")  # the terms logged per step (TrainResult.history)


@dataclass
class TrainConfig:
    """Editor training settings: MEND's loss weights (cedit, cloc), gradient clip and lr_lr; the
    other defaults suit short runs (MEND's lr is 1e-6).

    steps: optimiser steps in total, a resumed checkpoint's included (fewer than it holds: no step,
    and a UserWarning; more than the run it resumes had: that run also validated and checkpointed at
    its own last step, a validation that counts for `patience` and the best state, so with
    validation requests the extended run can stop or end otherwise than one given the larger `steps`
    from the start, while an interrupted run resumes as if never stopped), each of `accumulate`
    batches of `batch_size` edits (train on batches near the number of edits you will apply at once;
    `dcedit train` defaults to 25 edits and lr 1e-3, the README's example, where this class keeps 4
    and 1e-4); lr: the editors' Adam rate;
    lr_lr, lr_optimizer: the per-weight edit steps α's; cedit, cloc, balance_weight: the loss's
    weights (edit NLL, locality KL, MoEditor's gate balance); edit_rows, locality_rows: which
    editors' shifts the edit and KL rows see (README, "Training"); with validation requests,
    every `val_every` steps the first `val_size` of them are edited, in batches of `batch_size`
    (the last filled up with the edits before it), and scored (ES), training
    stops after `patience` validations without a gain above `min_delta` (None: never), and with
    `restore_best` the editors end at the best validation's state, which can be an earlier step
    than the last (`TrainResult.best_step`; the best: the last gain, or a later validation of its
    ES exactly and a lower NLL); checkpoint_dir, resume: resumable checkpoints (a
    leading "~" is the home folder);
    seed: batches and MoEditor's gate noise (not the editors' initial weights, nor RaEditor's
    groups: those come from the editor's own `seed`, given to ModelEditor or GroupedEditor, else
    from torch's global generator, which a new process seeds at random); progress: the progress bar; grad_clip: the editors'
    total gradient norm is clipped to it (None or inf: no clipping); fisher_mask: Fisher-masked
    editors (ProEditor) are trained on the masked shift (`train_loss`); data_parallel: train
    over the default torch.distributed process group (`distributed`); length_buckets: the
    training passes run rows of similar length together (None: on a CPU model only);
    reuse_prefix: the edited pass takes the KL reference's hidden states below the lowest
    edited block (`block_prefix`); the comments in `train_config.py` say more.  Bad values
    raise ValueError naming the field."""

    steps: int = 100  # optimiser steps
    batch_size: int = 4  # edits per batch
    accumulate: int = 1  # batches per optimiser step
    lr: float = 1e-4  # Adam, editor weights (MEND: 1e-6 for long runs)
    lr_lr: float = 1e-4  # the per-weight edit steps α
    lr_optimizer: str = "adam"  # "adam" | "sgd" for α
    cedit: float = 0.1
    cloc: float = 1.0
    balance_weight: float = 1e-2  # gate balance loss (MoEditor)
    grad_clip: float | None = 100.0
    edit_rows: str = "own"  # "own" | "all"
    locality_rows: str = "all"  # "own" | "all" | "fused" (the shift apply() adds: train_loss's docstring)
    fisher_mask: bool = True  # Fisher-masked editors (ProEditor) are trained on the masked shift
    val_every: int = 50
    val_size: int | None = None  # how many val requests to use (None: all)
    patience: int | None = 5  # validations without an ES gain above min_delta before stopping (None: never)
    min_delta: float = 0.0
    restore_best: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True
    data_parallel: bool = False  # train over the default torch.distributed process group (`distributed`)
    # The edited and KL-reference forwards run as passes of rows of similar length instead of one
    # padded pass (`length_buckets`: the same losses up to rounding); None: on a CPU model only.
    length_buckets: bool | None = None
    # The edited pass runs the locality rows from the lowest edited block, on what the KL
    # reference pass computed below it (`block_prefix`: the same losses up to rounding), where the
    # model's structure allows; False: through every block.
    reuse_prefix: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """ValueError naming the first bad field.  Run at construction and again by `train_editor`:
        the fields stay assignable, and a config changed after it was built (`config.grad_clip = -1`,
        which clip_grad_norm_ takes and turns every step uphill; `batch_size = 0`, a ZeroDivisionError
        in the batch order; `edit_rows = "x"`, silently "own") is refused before the run starts."""
        for name in ("steps", "batch_size", "accumulate", "val_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "lr_lr"):
            value = getattr(self, name)
            if not is_finite_number(value) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        for name in ("cedit", "cloc", "balance_weight", "min_delta"):
            value = getattr(self, name)
            if not is_finite_number(value) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        if self.lr_optimizer not in ("adam", "sgd"):
            raise ValueError(f"lr_optimizer must be 'adam' or 'sgd', got {self.lr_optimizer!r}")
        if self.grad_clip is not None and (not is_number(self.grad_clip) or not self.grad_clip > 0
                                           or not (is_finite_number(self.grad_clip) or self.grad_clip == math.inf)):
            # An int beyond float's range (10**400) passed, and clip_grad_norm_ raised OverflowError
            # at the first step; inf (no clipping) is still taken.
            raise ValueError(f"grad_clip must be positive (a float, or inf for no clipping) or None, got {self.grad_clip!r}")
        for name in ("fisher_mask", "data_parallel", "reuse_prefix", "restore_best", "resume", "progress"):
            check_bool(getattr(self, name), name)
        for name, allowed in (("edit_rows", VIEWS), ("locality_rows", LOCALITY_VIEWS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.length_buckets is not None and not isinstance(self.length_buckets, bool):
            raise ValueError(f"length_buckets must be a bool or None, got {self.length_buckets!r}")
        for name in ("val_size", "patience"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, (str, os.PathLike))
                                                or not isinstance(os.fspath(self.checkpoint_dir), str)
                                                or not os.fspath(self.checkpoint_dir)):
            # "" is Path("."): the checkpoints would go to, and be resumed from, the current directory.
            raise ValueError(f"checkpoint_dir must be a path or None, got {self.checkpoint_dir!r}")
        return self

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes` (field=value), validated as a new config; ValueError naming an
        unknown field or a bad value."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    """What `fit` / `train_editor` return.  `steps`: optimiser steps taken in all, a resumed run's
    before its checkpoint included.  `history`: one dict per step, `step` and the step's mean
    `loss`, `edit`, `kl` and `balance` (only `step` where every batch of the step was skipped as
    non-finite).  `val_history`: one dict per validation, `step`, `es`, `es_all` and `nll`.
    `best_step` / `best_es`: the validation the best editors come from (None without validation
    requests).  `stopped_early`: patience ended the run.  `resumed_from`: the step of the
    checkpoint the run resumed from (None for a fresh run).  `skipped_batches`: batches left out
    as non-finite.  `elapsed_s`: training seconds, a resumed run's earlier ones included."""

    steps: int  # optimiser steps done in total (including before a resume)
    history: list = field(default_factory=list)  # per step: loss, edit, kl, balance
    val_history: list = field(default_factory=list)  # per validation: step, es, es_all, nll
    best_step: int | None = None
    best_es: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    skipped_batches: int = 0
    elapsed_s: float = 0.0

    def __repr__(self) -> str:
        # The histories as counts and their last entries: the dataclass's repr printed every step's
        # dict, 26 KB for the README's 200 steps and a megabyte past 8,000, wherever a notebook cell
        # ended in fit(...) or a log printed the result.  The lists themselves are unchanged.
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in HISTORY_UNITS:
                text = _history_summary(value, HISTORY_UNITS[f.name])
            else:
                text = repr(round(value, 1) if f.name == "elapsed_s" and isinstance(value, float) else value)
            parts.append(f"{f.name}={text}")
        return f"TrainResult({', '.join(parts)})"


HISTORY_UNITS = {"history": "step", "val_history": "validation"}  # what TrainResult's repr counts


def _history_summary(entries, unit: str) -> str:
    """"<n units, last {...}>", the last entry's floats to 4 decimals (as EditHandle's repr shows
    its stats)."""
    if not isinstance(entries, list):
        return repr(entries)
    text = f"<{len(entries)} {unit}{'' if len(entries) == 1 else 's'}"
    if entries:
        last = entries[-1]
        if isinstance(last, dict):
            last = {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}
        text += f", last {last!r}"
    return text + ">"
