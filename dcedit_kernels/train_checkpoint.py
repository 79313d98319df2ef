"""Editor training's checkpoints and resume.

Checkpoints (safetensors only) go to `checkpoint_dir`: `editor.safetensors` (ModelEditor.save),
`best.safetensors`, and `trainer.safetensors` (the optimisers' state flattened to tensors, the RNG
state, the editors' state again and the best state when it is not theirs, so that one file holds a
whole step, the per-step history too, and the counters as JSON metadata); `resume=True` continues
from them (ResumeMismatchError, a ValueError, when the run's TrainConfig, apart from `steps`, `val_every`
(not `val_size`), the early-stopping fields, display/saving fields, `data_parallel` (the number of
processes is checked on its own), `length_buckets` and `reuse_prefix` (rounding only), or its
training or validation requests differ from the run that wrote them).

Separate from the loop (`train`, which calls `_checkpoint` and `_resume`): what a checkpoint holds
and how a resume checks and restores it.  The RNG-state helpers live here because they make the
checkpoint's tensors; the loop also uses them to run a batch again from the same start.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from pathlib import Path

import torch

from ._checks import is_finite_number, is_int
from .devices import cuda_indices
from .editor_checkpoint import CHECKPOINT_KEY, LEGACY_LOSS_REDUCTION, changed_defaults_of
from .editors.grouped_editor import GATE_NORM_DEFAULT, config_differences, with_absent_defaults
from .editors.presets import moeditor_top_k_default
from .model_editor import ModelEditor
from .safetensors_file import folder_refusal, json_metadata, read_safetensors, save_safetensors
from .train_config import TrainConfig, TrainResult


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    head = prefix + ".state."
    for key, v in tensors.items():
        if key.startswith(head):
            idx, name = key[len(head):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_editor(me: ModelEditor, path: Path, state: dict | None = None) -> None:
    tensors = state if state is not None else me.state_tensors()
    save_safetensors(tensors, path, {CHECKPOINT_KEY: json.dumps(me.config())})


def _cuda_devices(me: ModelEditor) -> list:
    """Indices of every CUDA device the model or the editors use (their RNG states are forked and
    checkpointed: gate noise is drawn on each editor's device)."""
    return cuda_indices(me.devices)


# TrainConfig fields a resumed run may change: the step budget, when to validate and stop early
# (a run stopped by patience may go on with another), and how the run is shown or saved.  The
# others set the optimisers, the batches or the loss, which the checkpoint's state belongs to.
# The number of processes is checked on its own; length_buckets and reuse_prefix change results by
# rounding only.
_RESUMABLE_CHANGES = ("steps", "progress", "checkpoint_dir", "resume", "val_every", "patience", "min_delta",
                      "restore_best", "data_parallel", "length_buckets", "reuse_prefix")


class ResumeMismatchError(ValueError):
    """A checkpoint_dir holds a run with other settings or requests than the one resuming it."""


def _run_settings(config: TrainConfig, train_requests, val_requests, world_size: int = 1) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: every TrainConfig
    field but `_RESUMABLE_CHANGES`, a hash of the training and validation requests, and the
    number of data-parallel processes (which sets the batches)."""
    import hashlib

    def digest(requests):
        if requests is None:
            return None
        blob = json.dumps([dataclasses.asdict(r) for r in requests], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_CHANGES}
    return dict(config=settings, train_requests=digest(train_requests), val_requests=digest(val_requests),
                world_size=world_size)


def _rng_states(me: ModelEditor) -> dict:
    """This process's RNG states as checkpoint tensors: torch's CPU generator, each CUDA device's
    (MoEditor's gate noise is drawn on the editors' device) and the editors' routing generators
    (RaEditor's random split, seeded per editor)."""
    states = {"rng_state": torch.get_rng_state()}
    states.update({f"route_rng.{key}": gen.get_state() for key, gen in me.route_generators().items()})
    states.update({f"cuda_rng.{i}": torch.cuda.get_rng_state(i) for i in _cuda_devices(me)})
    return states


TRAINER_FILE = "trainer.safetensors"  # a checkpoint's last file written (`_checkpoint`), the one a resume reads
# Every file a run writes in checkpoint_dir (`_checkpoint`, and train_editor's best state): train_editor
# and the CLI check before any work that it may replace those already there (`check_checkpoint_dir`).
CHECKPOINT_FILES = ("editor.safetensors", "best.safetensors", TRAINER_FILE)


def check_checkpoint_dir(path) -> None:
    """The OS's error, naming the file, for a checkpoint_dir whose checkpoints could not be written,
    before any training step: a folder it is, or would be made in, that this process may not write
    (PermissionError), a file on its way (NotADirectoryError: "a_file/ckpt"), or a checkpoint file
    in it made read-only (PermissionError: a save does not replace one, `replace_atomically`).  The
    first checkpoint failed only `val_every` steps in, and the training done so far was lost.  The
    folder need not exist: fit creates it.  `dcedit train` says the same in its own terms."""
    folder = Path(path)
    try:
        while not folder.exists() and folder != folder.parent:  # the nearest that exists
            folder = folder.parent
    except OSError:  # a name too long, ...: the run's own mkdir says so
        return
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{os.strerror(errno.ENOTDIR)} (checkpoint_dir {path} would be "
                                 "made under this file)", str(folder))
    # os.access passes for root, and says nothing of /proc's or /sys's refusal (`dcedit train
    # --checkpoint-dir /proc/x` failed after the model's load): `folder_refusal` tries, as the CLI's
    # --out check does (/proc: "No such file or directory").
    why = folder_refusal(folder) if os.access(folder, os.W_OK | os.X_OK) else os.strerror(errno.EACCES)
    if why is not None:
        raise PermissionError(errno.EACCES, f"{why} (checkpoint_dir {path}: its checkpoints could not be "
                              "written in this folder)", str(folder))
    for name in CHECKPOINT_FILES:
        file = Path(path) / name
        if file.is_file() and not os.access(file, os.W_OK):
            raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (a read-only file of checkpoint_dir, "
                                  "which its checkpoints may not replace)", str(file))


def has_checkpoint(ckpt) -> bool:
    """Whether the folder `ckpt` holds a checkpoint to resume from (train_editor's resume and the
    command line's Ctrl-C hint ask the same question)."""
    return (Path(ckpt) / TRAINER_FILE).is_file()


def run_editor_defaults(ckpt, method: str) -> dict:
    """For a caller that cannot give every editor argument (`dcedit train` has no flag for
    MoEditor's gate_norm or top_k): those whose default changed since (`changed_defaults_of`) as
    the run that wrote the checkpoint in the folder `ckpt` trained with them, so that resuming a
    run of an older release builds the editor it trained (a 0.5.5 MoEditor's: gate_norm=False).
    {} without a readable checkpoint of `method`: the resume itself then says what is wrong."""
    from safetensors import SafetensorError, safe_open

    if not has_checkpoint(ckpt):
        return {}
    try:
        with safe_open(str(Path(ckpt) / TRAINER_FILE), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("model_editor", "null"))
    except (SafetensorError, OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("method") != method or not isinstance(saved.get("editors"), dict):
        return {}
    editors = {key: with_absent_defaults(e, method) for key, e in saved["editors"].items() if isinstance(e, dict)}
    found = changed_defaults_of(method, editors, {})
    # Only the values today's defaults would not give (presets.MoEditor): an explicit top_k=2 made
    # a resume with another --n-editors 1 fail as "top_k (2) cannot exceed n_editors (1)", where the
    # resume names n_editors.
    n_editors = {e.get("n_editors") for e in editors.values()}
    today = {"gate_norm": GATE_NORM_DEFAULT}
    if len(n_editors) == 1 and is_int(n := next(iter(n_editors))):
        today["top_k"] = moeditor_top_k_default(n)
    return {name: value for name, value in found.items() if name not in today or today[name] != value}


EDITOR_PREFIX = "editor."  # the editors' state in trainer.safetensors (`_checkpoint`)
BEST_PREFIX = "best."  # the best validated state in trainer.safetensors, when it is not the editors' own
RNG_KEYS = ("rng_state", "route_rng.", "cuda_rng.")  # the names (or name prefixes) `_rng_states` uses
HISTORY_PREFIX = "history."  # TrainResult.history in trainer.safetensors (`_history_tensors`)


def _set_rng_states(me: ModelEditor, states: dict) -> None:
    """Restore what `_rng_states` gave (a checkpoint's, or a batch's start); a routing generator or
    CUDA device it has no state for is left as it is, and a state for a CUDA device the model and
    editors no longer use (a run resumed with fewer GPUs, or another split) is not set: training
    forks the RNG of the devices in play only, and on a machine without that index
    `torch.cuda.set_rng_state` raised IndexError ("tuple index out of range")."""
    torch.set_rng_state(states["rng_state"])
    for key, gen in me.route_generators().items():
        if f"route_rng.{key}" in states:
            gen.set_state(states[f"route_rng.{key}"])
    for index in _cuda_devices(me):
        if f"cuda_rng.{index}" in states:
            torch.cuda.set_rng_state(states[f"cuda_rng.{index}"], index)


def _checkpoint(me, opt, lr_opt, ckpt: Path, result: TrainResult, bad_validations: int, run: dict,
                rng_states: list[dict], best_state: dict | None = None) -> None:
    """`rng_states`: each process's `_rng_states` (rank r > 0's saved under "rank{r}.").

    The best state goes in trainer.safetensors too (counters["best"] says where): best.safetensors
    is written at validation, before the step's checkpoint, so after a failed checkpoint it held a
    newer best than the counters a resume reads (a resume with no steps left restored step 3's
    editor as step 1's best).  At a validation that found a new best it is the editors' own state,
    already in the file; otherwise one more copy of it."""
    _save_editor(me, ckpt / "editor.safetensors")
    t1, m1 = _flatten_optimizer(opt, "opt")
    t2, m2 = _flatten_optimizer(lr_opt, "lr_opt")
    # The editors' state once more, in the file that holds the optimisers' and the counters (one
    # atomic write): a write of trainer.safetensors that fails after editor.safetensors was
    # replaced would otherwise pair this step's editors with the previous step's optimisers.
    tensors = {**t1, **t2, **{EDITOR_PREFIX + k: v for k, v in me.state_tensors().items()}}
    best = None if best_state is None else "editor" if result.best_step == result.steps else "trainer"
    if best == "trainer":
        tensors.update({BEST_PREFIX + k: v for k, v in best_state.items()})
    for rank, states in enumerate(rng_states):
        tensors.update({(f"rank{rank}." if rank else "") + key: t.cpu() for key, t in states.items()})
    history, history_keys = _history_tensors(result.history)
    tensors.update(history)
    counters = dict(steps=result.steps, best_step=result.best_step, best_es=result.best_es,
                    stopped_early=result.stopped_early, skipped_batches=result.skipped_batches,
                    bad_validations=bad_validations, elapsed_s=result.elapsed_s, best=best,
                    history_keys=history_keys, val_history=result.val_history)
    meta = {"opt": json.dumps(m1), "lr_opt": json.dumps(m2), "counters": json.dumps(counters),
            "model_editor": json.dumps(me.config()), "run": json.dumps(run)}
    save_safetensors(tensors, ckpt / TRAINER_FILE, meta)


def _history_tensors(history: list) -> tuple[dict, list]:
    """TrainResult.history (per step a dict of "step" and the logged terms; "step" alone for a step
    whose every batch was skipped) as tensors, and the terms' names, their columns.  As JSON in the
    counters it grew trainer.safetensors' header by ~125 bytes a step, written whole at every
    checkpoint and parsed whole at every load (12.5 MB at 100,000 steps), and past ~800,000 steps
    over safetensors' 100 MB header limit: a checkpoint saved, then refused by its resume ("header
    too large").  The values are float64: Python's floats, exactly."""
    keys = list(dict.fromkeys(k for entry in history for k in entry if k != "step"))
    shape = (len(history), len(keys))
    # Flat lists: torch reads them several times faster than one list per step.  On the CPU whatever
    # torch.set_default_device says: on "meta" the save raised "Cannot copy out of meta tensor".
    tensors = {"step": torch.tensor([entry["step"] for entry in history], dtype=torch.int64, device="cpu"),
               "value": torch.tensor([entry.get(k, 0.0) for entry in history for k in keys],
                                     dtype=torch.float64, device="cpu").reshape(shape),
               "logged": torch.tensor([k in entry for entry in history for k in keys], dtype=torch.bool,
                                      device="cpu").reshape(shape)}
    return {HISTORY_PREFIX + name: t for name, t in tensors.items()}, keys


def _history_of(path: Path, tensors: dict, keys: list) -> list:
    """The TrainResult.history `_history_tensors` wrote (its terms' names: `keys`)."""
    try:
        step, value, logged = (tensors[HISTORY_PREFIX + name] for name in ("step", "value", "logged"))
    except KeyError as exc:
        raise ValueError(f"{path} is not a train_editor checkpoint (its counters name a history, and it has no "
                         f"{exc.args[0]} tensor)") from None
    # Shapes and dtypes as written: zip would cut a damaged history short without a word.
    shape = (step.numel(), len(keys))
    if (step.dtype, step.dim(), value.dtype, tuple(value.shape), logged.dtype, tuple(logged.shape)) != (
            torch.int64, 1, torch.float64, shape, torch.bool, shape):
        raise ValueError(f"{path} is a damaged train_editor checkpoint: its history tensors are not a step "
                         f"(int64, n) and a value (float64) and a logged (bool) of (n, {len(keys)})")
    steps, values, logged = step.tolist(), value.tolist(), logged.tolist()
    return [dict(step=step, **{k: v for k, v, kept in zip(keys, row, mask) if kept})
            for step, row, mask in zip(steps, values, logged)]


def _history_names(keys) -> bool:
    """Whether `keys` can name the history's columns (`_history_tensors`): a name twice read the
    later column under both, and "step" raised TypeError as it made each step's dict."""
    return (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys)
            and "step" not in keys)


def _listed_history_entry(entry) -> bool:
    """Whether an entry of a history held in the counters (a checkpoint from before
    `_history_tensors`) is one the next checkpoint can write as tensors: an int64 step and numbers.
    A step "x" or a loss "x" resumed, then failed in the first checkpoint after, `val_every` steps in."""
    return (isinstance(entry, dict) and _count(entry.get("step")) and entry["step"] < 2**63
            and all(isinstance(v, float) or (is_int(v) and abs(v) <= sys.float_info.max)
                    for k, v in entry.items() if k != "step"))


def _count(x) -> bool:
    return is_int(x) and x >= 0


# What a resume reads of a trainer checkpoint's counters (`_checkpoint`) and what each must be:
# steps=-1 resumed a run at step -1, a float one failed in torch.manual_seed, and a history of
# another type failed at the first step's append, each after the editors were loaded.
_COUNTERS = {"steps": (_count, "an int >= 0"), "best_step": (lambda x: x is None or _count(x), "an int >= 0 or null"),
             "best_es": (lambda x: x is None or is_finite_number(x), "a number or null"),
             "stopped_early": (lambda x: isinstance(x, bool), "true or false"),
             "skipped_batches": (_count, "an int >= 0"), "bad_validations": (_count, "an int >= 0"),
             "elapsed_s": (lambda x: is_finite_number(x) and x >= 0, "a number >= 0"),
             "val_history": (lambda x: isinstance(x, list), "a list")}
_BEST = (None, "editor", "trainer")  # counters["best"], absent before the best state was in the file


def _checkpoint_entries(path: Path, meta: dict, optimizers: tuple) -> dict:
    """The JSON entries of the trainer checkpoint `path` (its `meta`) as dicts, with what a resume
    reads of them checked: ValueError naming the file, the entry and what is wrong."""
    entries = {key: json_metadata(path, key, meta[key]) for key in ("opt", "lr_opt", "counters", "model_editor", "run")
               if key in meta}

    def refuse(what):
        raise _damaged(path, what)

    for field in ("method", "layers", "editors"):
        if field not in entries["model_editor"]:
            refuse(f"its model_editor metadata lacks {field!r}")
    if not isinstance(entries["model_editor"]["editors"], dict):
        refuse("its model_editor metadata's 'editors' is not a JSON object")
    if "run" in entries and not isinstance(entries["run"].get("config"), dict):
        refuse("its run metadata's 'config' is not a JSON object")
    counters = entries["counters"]
    for field, (ok, kind) in _COUNTERS.items():
        if field not in counters or not ok(counters[field]):
            refuse(f"its counters' {field} must be {kind}, got {counters.get(field, 'nothing')!r}")
    if "history" in counters:  # written before the history went into tensors (`_history_tensors`)
        if not isinstance(counters["history"], list) or not all(map(_listed_history_entry, counters["history"])):
            refuse(f"its counters' history must be a list of JSON objects of a step and numbers, got "
                   f"{counters['history']!r}")
    elif not _history_names(counters.get("history_keys")):
        refuse(f"its counters' history_keys must be a list of distinct names other than 'step', got "
               f"{counters.get('history_keys', 'nothing')!r}")
    if counters.get("best") not in _BEST:
        refuse(f"its counters' best must be one of {_BEST}, got {counters['best']!r}")
    for key, optimizer in zip(("opt", "lr_opt"), optimizers):
        _check_optimizer_entry(entries[key], optimizer, lambda what, k=key: refuse(f"its {k} metadata {what}"))
    return entries


def _check_optimizer_entry(saved: dict, optimizer: torch.optim.Optimizer, refuse) -> None:
    """`refuse(what)` unless `saved` (`_flatten_optimizer`'s JSON) holds param_groups and scalars as
    `optimizer` takes them: its groups' settings of the kinds this optimizer's are (a learning rate
    "x" was loaded, then failed in the first step)."""
    groups, scalars = saved.get("param_groups"), saved.get("scalars")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        refuse("needs 'param_groups', a list of JSON objects")
    if not isinstance(scalars, dict) or not all(k.isdigit() and isinstance(v, dict) for k, v in scalars.items()):
        refuse("needs 'scalars', a JSON object of JSON objects keyed by parameter index")
    for i, (group, now) in enumerate(zip(groups, optimizer.param_groups)):
        # The settings of this torch's optimiser only: one saved under another torch may lack those
        # added since (which load_state_dict fills with their defaults) or hold some since dropped.
        for name in ("lr", *(k for k in now if k != "params" and k in group)):
            if name not in group or not _same_kind(group[name], now[name]):
                refuse(f"has param_groups[{i}][{name!r}] = {group.get(name, 'nothing')!r}, not a value "
                       f"of the kind {now[name]!r} is")


def _same_kind(saved, now) -> bool:
    """Whether the JSON value `saved` can stand for the optimiser setting `now`: a bool for a bool,
    a finite number for a number, a list of as many for a tuple or list, None or a bool for None
    (foreach, fused), a str for a str."""
    if isinstance(now, bool):
        return isinstance(saved, bool)
    if is_finite_number(now) or isinstance(now, torch.Tensor):
        return is_finite_number(saved)
    if isinstance(now, (tuple, list)):
        return isinstance(saved, list) and len(saved) == len(now) and all(map(_same_kind, saved, now))
    if now is None:
        return saved is None or isinstance(saved, bool)
    return isinstance(saved, type(now))


def _check_optimizer_state(optimizer: torch.optim.Optimizer, name: str) -> None:
    """ValueError unless the state `optimizer` loaded fits its parameters: each parameter's state
    holds the names the others' hold, and each tensor in it of more than one value has the
    parameter's shape (load_state_dict checks neither: Adam failed in its first step)."""
    names = {frozenset(state) for state in optimizer.state.values()}
    if len(names) > 1:
        raise ValueError(f"{name}: its parameters' states hold different entries ({sorted(map(sorted, names))})")
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                raise ValueError(f"{name}: a state {key} has shape {tuple(value.shape)}, its parameter "
                                 f"{tuple(p.shape)}")


def _check_rng_states(path: Path, states: dict) -> None:
    """ValueError naming the file unless each RNG state in `states` (`_rng_states`' names) is one a
    generator takes: a damaged one raised RuntimeError or TypeError when the loop set it, after the
    editors had taken the checkpoint's state.  The CPU states (torch's, the routing generators') are
    set on a scratch generator; a CUDA state's size is its device's to check, so only its dtype is."""
    for name, state in states.items():
        try:
            if not name.startswith("cuda_rng."):
                torch.Generator().set_state(state)
            elif state.dtype != torch.uint8 or state.dim() != 1:
                raise TypeError(f"a CUDA RNG state is a 1-D torch.uint8 tensor, got {state.dtype} of shape "
                                f"{tuple(state.shape)}")
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"{path}: its RNG state {name} is damaged ({exc}); use another checkpoint_dir, or "
                             "resume=False to start over") from None


def _check_run(path: Path, saved: dict, run: dict) -> None:
    """ValueError naming what differs between the run that wrote the checkpoint and this one (the
    optimisers' saved state would silently bring back the old learning rates, and the batches
    would be drawn from other requests)."""
    # Fields present on both sides only: a field TrainConfig gains later is no reason to refuse an
    # older run's checkpoint.
    before, now = saved["config"], run["config"]
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in sorted(set(before) & set(now)) if before[k] != now[k]]
    changed += [f"{name} (different requests)" for name in ("train_requests", "val_requests")
                if saved.get(name) != run.get(name)]
    if saved.get("world_size", 1) != run.get("world_size", 1):  # runs before data-parallel had one process
        changed.append(f"processes {saved.get('world_size', 1)} -> {run.get('world_size', 1)}")
    if changed:
        raise ResumeMismatchError(f"{path} was written by a run with other settings ({', '.join(changed)}): resuming "
                                  "would continue that run; use another checkpoint_dir, or resume=False to start over")


def _resume(me, opt, lr_opt, ckpt: Path, result: TrainResult, run: dict, rank: int = 0):
    """Load the checkpoint; returns (this process's RNG states as `_rng_states` gives them, or None
    when the checkpoint has none for `rank`; the best state; the count of bad validations)."""
    from safetensors import SafetensorError

    path = ckpt / TRAINER_FILE
    checkpoint_keys = {"opt", "lr_opt", "counters", "model_editor"}
    try:
        # The counters, settings and tensors of one file (a checkpoint written meanwhile, another
        # run's in the same checkpoint_dir, is not mixed in); a file without them is refused unread.
        meta, _, tensors = read_safetensors(path, checkpoint_keys)
    except SafetensorError as exc:  # truncated or overwritten: name the file, as ModelEditor.load does
        raise ValueError(f"{path} is not a train_editor checkpoint (not a readable safetensors file: {exc}); "
                         "use another checkpoint_dir, or resume=False to start over") from None
    if not checkpoint_keys <= set(meta):
        raise ValueError(f"{path} is not a train_editor checkpoint")
    # Every entry read and checked before anything is loaded: a damaged one (a file edited by hand,
    # or another program's) raised KeyError, TypeError or AttributeError from deep inside, or
    # failed steps later in the loop, after the editors had taken the checkpoint's state.
    entries = _checkpoint_entries(path, meta, (opt, lr_opt))
    saved = entries["model_editor"]
    # Editor arguments newer than the checkpoint (MoEditor's gate_norm) take the value it was
    # trained with, as ModelEditor.load takes them: a 0.5.6 MoEditor's run resumes with gate_norm=False.
    saved_editors = {key: with_absent_defaults(e, saved.get("method")) for key, e in saved["editors"].items()}
    now = me.config()["editors"]
    if saved["layers"] != me.layers or saved["method"] != me.method or saved_editors != now:
        diff = "; ".join(f"editor {key} {config_differences(saved_editors[key], now[key])}"
                         for key in sorted(set(saved_editors) & set(now))
                         if isinstance(saved_editors[key], dict) and saved_editors[key] != now[key])
        same_layers = saved["layers"] == me.layers and saved["method"] == me.method
        raise ValueError(f"{path} was written for another editor ({saved['method']} on {saved['layers']})"
                         + (f" ({diff})" if diff and same_layers else ""))
    if saved.get("tokens", me.tokens) != me.tokens:  # which tokens' gradient factors the editors are fed
        raise ValueError(f"{path} was trained with tokens={saved['tokens']!r}, this ModelEditor uses {me.tokens!r}: "
                         "the editors would be fed other gradient factors than the run that wrote it")
    saved_reduction = saved.get("loss_reduction", LEGACY_LOSS_REDUCTION)
    if saved_reduction != me.loss_reduction:
        raise ValueError(f"{path} was trained with loss_reduction={saved_reduction!r}, this ModelEditor uses "
                         f"{me.loss_reduction!r}: the editor's statistics would mix two scales")
    if "run" in entries:  # checkpoints written before the settings were recorded are not checked
        _check_run(path, entries["run"], run)
    counters = entries["counters"]
    # Read before any state is set (a damaged history is refused, the editors left as they were); a
    # checkpoint written before the history went into tensors holds it in its counters.
    history = counters["history"] if "history" in counters else _history_of(path, tensors, counters["history_keys"])
    _check_steps_of_history(path, counters["steps"], history)
    editor = {k[len(EDITOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(EDITOR_PREFIX)}
    if not editor:  # a checkpoint from before the editors' state was also written in trainer.safetensors
        editor = _read_tensors(ckpt / "editor.safetensors")
    own = f"rank{rank}." if rank else ""
    rng_states = {name: v for k, v in tensors.items()
                  if k.startswith(own) and (name := k[len(own):]).startswith(RNG_KEYS)}
    _check_rng_states(path, rng_states)
    # A routing generator's state with no generator here to take it: the run's RaEditor was seeded,
    # this one is not (the seed is no part of the editors' config, which is compared above).  Its
    # state was skipped, and the run went on drawing its random groups from torch's global generator,
    # without a word.  (The other way, a seeded editor with no state saved, resumes from its seed.)
    saved_routes = {name[len("route_rng."):] for name in rng_states if name.startswith("route_rng.")}
    unseeded = sorted(saved_routes - set(me.route_generators()))
    if unseeded:
        raise ValueError(f"{path} was written by a run whose editors {unseeded} drew their random groups from a "
                         "seeded generator, and this ModelEditor's draw from torch's global one (built without "
                         "seed=): the run would go on with other groups; build it with the run's seed, or "
                         "resume=False to start over")
    previous = me.state_tensors()
    me.load_state_tensors(editor)  # copied into each editor's device
    try:
        for name, optimizer in (("opt", opt), ("lr_opt", lr_opt)):
            _unflatten_optimizer(optimizer, name, tensors, entries[name])
            _check_optimizer_state(optimizer, name)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        # The optimisers' state that does not fit its parameters (a missing or misshapen tensor)
        # failed in the first step, with the editors already loaded: they go back as they were.
        me.load_state_tensors(previous)
        raise ValueError(f"{path}: its optimiser state does not fit this run's editors ({exc})") from None
    result.steps = result.resumed_from = counters["steps"]
    result.best_step, result.best_es = counters["best_step"], counters["best_es"]
    result.stopped_early, result.skipped_batches = counters["stopped_early"], counters["skipped_batches"]
    result.elapsed_s, result.history = counters["elapsed_s"], history
    result.val_history = counters["val_history"]
    if "best" in counters:
        where = {"editor": EDITOR_PREFIX, "trainer": BEST_PREFIX}.get(counters["best"])
        best_state = None if where is None else {k[len(where):]: v for k, v in tensors.items() if k.startswith(where)}
    else:  # a checkpoint from before the best state was written in trainer.safetensors
        best_file = ckpt / "best.safetensors"
        best_state = _read_tensors(best_file) if best_file.is_file() else None
    return (rng_states if "rng_state" in rng_states else None), best_state, counters["bad_validations"]


def _check_steps_of_history(path: Path, steps: int, history: list) -> None:
    """ValueError naming the file unless the counters' `steps` is the history's last step (the loop
    logs one entry per step, at its count; 0 before any): steps=10**30 resumed, took a step and failed
    writing the next checkpoint (its history's int64 steps), the editors trained on, or took none
    and reported 10**30 steps done."""
    last = history[-1]["step"] if history else 0
    if steps != last:
        raise _damaged(path, f"its counters' steps ({steps}) is not its history's last step ({last})")


def _damaged(path: Path, what: str) -> ValueError:
    """The error a resume of the damaged trainer checkpoint `path` raises, `what` saying what is wrong."""
    return ValueError(f"{path} is a damaged train_editor checkpoint: {what}; use another checkpoint_dir, "
                      "or resume=False to start over")


def _read_tensors(path: Path) -> dict:
    """The tensors of a file of an older checkpoint (its editor.safetensors or best.safetensors), in
    one held read of one file (`read_safetensors`), as trainer.safetensors is read: load_file mapped
    the path again after parsing its header, so a save over it in between gave tensors read at
    another file's offsets."""
    return read_safetensors(path, set())[2]
