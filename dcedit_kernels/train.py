"""Train a ModelEditor's editors: loss = cedit·L_edit + cloc·KL + balance_weight·L_balance.

The loss of one batch, and the model passes it costs: `train_loss`; validation's scoring:
`train_validation`; checkpoints and resume: `train_checkpoint`; the settings: `train_config`.
This module holds the loop, and re-exports their names (`dcedit_kernels.train.TrainConfig`, …).

Optimisation (the split MEND configures): Adam with `lr` on the editor weights, a separate optimiser
with `lr_lr` on the per-weight steps α (Adam's first step moves each α by exactly `lr_lr`, whatever its
gradient's size: from MEND's α = −edit_lr = −1e-4 with lr_lr 1e-4, an α whose gradient points to 0
lands on about 0 for a step, as a check saw on 2 of SmolLM2's 3 edited layers after one 25-edit step; a
smaller lr_lr or `lr_optimizer="sgd"` moves it by its gradient instead).  MEND's and EasyEdit's
trainers configure that split but do not run it: their edit_lrs are also in the editor weights'
optimiser, and the lr_lr one steps after that one's zero_grad(), so it never sees a gradient and the α
move at `lr` (1e-6 in MEND's config) instead; `lr_lr=lr` takes those steps here (Adam's state is per
parameter).  Gradient accumulation over `accumulate` batches (each batch's loss divided by
`accumulate`: the step's gradient is their mean);
gradient-norm clipping (`clip_grad_norm_`: one 2-norm over every editor parameter, the α included); a
batch with a non-finite gradient (the editors', or the capture's: a non-finite edit loss or gradient
factors) is skipped and counted (the step's gradient stays the kept batches' sum over `accumulate`, while
`history` logs the mean of the kept batches' losses).  The backward runs at the scale of the
per-token sum of L_edit (the KL and balance terms share it) and the gradients are divided back,
exactly (`losses.backward_scale`: keeps fp16 gradients from flushing to zero; fp32 and bf16
unchanged).  Only a per-token activation gradient past fp16's range can overflow there (the editors'
gradients are fp32 sums; the model's weights get none); that batch then runs again unscaled, from
the running norms, RNG states and routing generators its first forward started from.  Every
`val_every` steps the editor is validated by applying real (fused, masked) edits to the model and
measuring edit success on the val requests' rephrases; early stopping after `patience` validations
without an ES gain above `min_delta`; the best editor (the last gain's, or a later one of the same
ES and a lower NLL) is restored at the end.
Checkpoints (safetensors only) go to `checkpoint_dir` when a validation is due (every `val_every`
steps), at the last step and on an early stop, so an interrupted run loses the steps since the last
of them (the editors, trained in place, keep those steps' updates, and the running norms every batch
they saw, that of a step never taken too: a run interrupted before its first checkpoint, run again on
the same editors, starts a new run from them); `resume=True` continues from
them (`train_checkpoint`).  A checkpoint_dir they could not
be written to (a read-only folder or checkpoint file) raises the OS's error naming it before the
first step (`train_checkpoint.check_checkpoint_dir`).  The batch order is a function of
(seed, batch index): each epoch a random permutation of the requests cut into n // batch_size
batches (the n % batch_size left over sit that epoch out), so a resumed run sees the batches it
would have seen.

Data-parallel (a torch.distributed process group of W > 1, e.g. under torchrun): each process
trains on batches of its own (global batch index b·W + rank); before each optimiser step the
editors' gradients are averaged and their running norms merged, so the step is the one of one
process with accumulate·W batches, to rounding, for editors without running norms that draw no random
numbers (each process normalises with its own statistics until the merge, and draws its own gate
noise and random groups); the processes share the validation batches and rank 0 checkpoints
(`distributed`).

The model's parameters are frozen during training (`capture.frozen_parameters`: requires_grad
restored afterwards) and the model runs in the mode its owner set (`load_model` gives eval).
Causal LMs only.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from . import distributed
from ._checks import HALF_DTYPES, all_finite_many, check_autograd
from ._warn import warn
from .capture import frozen_parameters, modes_restored
from .devices import host_scalars_on_cpu, seed_generators
from .dropout_check import already_warned, warn_active_dropout
from .edit_handle import warn_live_edits
from .losses import backward_scale
from .model_editor import ModelEditor
from .positions import check_request_lengths
from .progress_bar import progress_bar
from .requests import validate_requests
from .tokenize import check_targets_spelled
from .train_checkpoint import (ResumeMismatchError, _checkpoint, _cuda_devices, _resume, _rng_states, _run_settings,
                               _save_editor, _set_rng_states, check_checkpoint_dir, has_checkpoint)
from .train_config import PART_KEYS, TrainConfig, TrainResult
from .train_loss import _passes, batch_edits, batch_loss, check_config, check_has_editors, eval_rows, loss_from_edits
from .train_validation import _evaluate_split, evaluate_edits

# What `dcedit_kernels.train` exports: the split-out modules' names that callers import from here
# (they were defined here), and `_passes` (tests import it from here).  Every other name is
# imported only where the loop calls it, so that a test patching `dcedit_kernels.train.<name>`
# patches what the loop calls; the loss's, validation's and checkpoints' own helpers and constants
# are patched and imported in their own modules.
__all__ = ["ResumeMismatchError", "TrainConfig", "TrainResult", "batch_edits", "batch_loss", "check_trainable_dtypes",
           "eval_rows", "evaluate_edits", "loss_from_edits", "torch_seed", "train_editor", "_passes"]


def _batch_indices(n: int, batch_size: int, seed: int, b: int) -> list[int]:
    """Indices of batch b: epoch-wise random permutations, a pure function of (seed, b)."""
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    epoch, k = divmod(b, per_epoch)
    # On the CPU, as its generator, whatever torch.set_default_device says ("meta": .tolist() had no data).
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed(seed * 1_000_003 + epoch)), device="cpu")
    return perm[k * bs:(k + 1) * bs].tolist()


def train_editor(me: ModelEditor, train_requests, val_requests=None, config: TrainConfig | None = None) -> TrainResult:
    """Train `me`'s editors on `train_requests` (see the module docstring); returns a TrainResult."""
    if isinstance(val_requests, TrainConfig):  # fit(train, TrainConfig(...)): said "must be a sequence of EditRequest"
        raise ValueError("val_requests is a TrainConfig: pass it as config= (fit(train_requests, config=...))")
    config = config or TrainConfig()
    check_config(config)
    group_rank, group_size = distributed.world()
    # `is True`: data_parallel itself is validated below.
    rank, size = (group_rank, group_size) if config.data_parallel is True else (0, 1)

    def checked_call():
        config.validate()  # its fields may have been assigned since it was built
        if not isinstance(me, ModelEditor):
            raise ValueError(f"me must be a ModelEditor, got {type(me).__name__}")
        check_has_editors(me)
        if me.seq2seq:
            raise ValueError("editor training supports causal LMs only")

    _, error = _attempt(checked_call, size)
    if error is not None:
        # The rest of the setup needs a valid config and ModelEditor: the failure goes to the others'
        # agree_on_start at once (a field set invalid on rank 1 only held rank 0 there until rank 1's
        # process ended), and raises here.
        distributed.agree_on_start(error, 0, {})
    # Each process checks its own replica (built, loaded, frozen or moved by its own code): one that
    # fails tells the others in agree_on_start, as invalid requests do, rather than raise alone and
    # leave them waiting there (an fp16 editor on rank 1 held rank 0 until rank 1's process ended).
    _, error = _attempt(lambda: _check_trainable(me), size)
    if error is None:
        warn_live_edits(me.model, "train_editor", "the editors train on the edited model (its gradients are "
                        "what they learn to map, its outputs the locality loss's reference)")
        warn_active_dropout(me.model, "train_editor", "each pass draws its own dropout masks, so the "
                            "locality KL compares two differently dropped-out models")
    launched = distributed.launched_size()
    if config.data_parallel and group_size == 1 and launched > 1:
        # torchrun started W processes but none joined a group: each trained on its own, on the same
        # batches, and every one wrote checkpoint_dir, without a word (a user trial).
        raise ValueError(f"TrainConfig(data_parallel=True) in a process that torchrun started as one of "
                         f"WORLD_SIZE={launched}, but no torch.distributed process group is "
                         "initialised: call torch.distributed.init_process_group() (gloo on CPU, nccl on GPUs) "
                         "or dcedit_kernels.distributed.init_from_env(device) in every process before training")
    if config.data_parallel and group_size == 1 and distributed.unlaunched():
        # A script run with `python` instead of `torchrun` trained alone without a word, and its user
        # took it for a run over every GPU (a new-user audit).  A warning, not an error: the same
        # script run in one process on purpose (a debug run, one GPU) trains as before.
        warn("train_editor: TrainConfig(data_parallel=True), but no torch.distributed process group "
             "is initialised and no launcher started this process (WORLD_SIZE unset): it trains "
             "alone, in one process.  To train over N GPUs, start the script with `torchrun "
             "--nproc_per_node N script.py` and call dcedit_kernels.distributed.init_from_env(device) "
             "or torch.distributed.init_process_group() before training (`torchrun ... -m "
             "dcedit_kernels.cli train` does both)")
    if not config.data_parallel and group_size > 1:
        warn(f"train_editor: a process group of {group_size} processes is up but "
             "data_parallel=False: this process trains its editors on its own (the others repeat "
             "the work, and every process writes checkpoint_dir); TrainConfig(data_parallel=True) "
             "trains them data-parallel")

    def checked_requests():
        train = validate_requests(train_requests, "train_requests")
        val = None if val_requests is None else validate_requests(val_requests, "val_requests")
        # Past a learned position table (GPT-2's), a request failed with torch's bare IndexError at
        # its batch, however many steps in (a device-side assert on a GPU): all refused before the first.
        check_request_lengths(me.model, me.tokenizer, train, "train_requests")
        check_targets_spelled(me.tokenizer, train, "train_requests")
        if val is not None:  # validation scores the edit rows of the first val_size only
            check_request_lengths(me.model, me.tokenizer, val[: config.val_size], "val_requests", edit_rows_only=True)
            check_targets_spelled(me.tokenizer, val[: config.val_size], "val_requests")
        return train, val

    # A data-parallel process given invalid requests (its own data file, say) tells the others in
    # agree_on_start, rather than raise alone and leave them waiting there.
    if error is None:
        (train_requests, val_requests), error = _attempt(checked_requests, size, (None, None))
    else:
        train_requests = val_requests = None
    # The two warnings below are about the requests and settings, the same on every process of a
    # data-parallel run (agree_on_start refuses any other): said by rank 0 alone, as the skipped
    # batches are; torchrun's W processes printed each W times.
    if val_requests is not None and config.val_size is not None:
        if config.val_size > len(val_requests) and rank == 0:
            # Validated on all of them, fewer than asked for: the ES a run reports is over those.
            warn(f"train_editor: val_size {config.val_size} is larger than the {len(val_requests)} "
                 f"val_requests: validation uses all {len(val_requests)} of them")
        val_requests = val_requests[: config.val_size]
    if train_requests is not None and config.batch_size > len(train_requests) and rank == 0:
        # The batches hold every request then (`_batch_indices`): the editors see a smaller batch
        # than asked for, which matters under loss_reduction="token" (factors scale as 1/N).
        warn(f"train_editor: batch_size {config.batch_size} is larger than the {len(train_requests)} "
             f"training requests: every batch is all {len(train_requests)} of them")

    alpha_ids = {id(e.alpha) for e in me.editors.values()}
    alphas = [e.alpha for e in me.editors.values()]
    weights = [p for p in me.editors.parameters() if id(p) not in alpha_ids]
    params = weights + alphas
    opt = torch.optim.Adam(weights, lr=config.lr)
    lr_opt = (torch.optim.Adam if config.lr_optimizer == "adam" else torch.optim.SGD)(alphas, lr=config.lr_lr)

    # "~/ckpt" is the home folder's, as load_model, the data loaders and $DCEDIT_CACHE_DIR take "~":
    # unexpanded, the checkpoints went to a new folder named "~" in the working folder.
    ckpt = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir is not None else None
    result = TrainResult(steps=0)
    run = _run_settings(config, train_requests, val_requests, size)

    fresh = (None, None, 0)  # (RNG states, best state, bad validations) of a run that starts anew

    def start():
        if ckpt is not None:
            if rank == 0:
                # Rank 0 writes the checkpoints: one it may not write failed only val_every steps in,
                # and the training so far was lost.  Checked before a resume sets the editors' state.
                check_checkpoint_dir(ckpt)
            ckpt.mkdir(parents=True, exist_ok=True)
            if config.resume and has_checkpoint(ckpt):
                return _resume(me, opt, lr_opt, ckpt, result, run, rank)
        return fresh

    if error is None:
        (rng_state, best_state, bad_validations), error = _attempt(start, size, fresh)
    else:  # raised on every process in agree_on_start
        rng_state, best_state, bad_validations = fresh
    if result.stopped_early and (config.patience is None or bad_validations < config.patience):
        result.stopped_early = False  # a run stopped by patience goes on with another
    if result.resumed_from is not None and result.resumed_from > config.steps and rank == 0:
        # `steps` counts the total, the checkpoint's included: fewer than it holds took no step and
        # returned its editors without a word (`dcedit train` notes it; its own line drops this one).
        warn(f"train_editor: checkpoint_dir's run had already trained {result.resumed_from} steps, more "
             f"than steps={config.steps} (the total, a resume's included): no step was taken, the "
             "editors are the checkpoint's")
    if size > 1:  # every process starts from the same step and plan, or all of them raise (none waits)
        plan = dict(run, steps=config.steps, val_every=config.val_every, patience=config.patience,
                    min_delta=config.min_delta, checkpoints=ckpt is not None, editor=_editor_plan(me),
                    # Sets no collective, but on one process only it ended the replicas at different
                    # states (the best validation's, the last step's).
                    restore_best=config.restore_best,
                    # The model itself: its edited layers (the gradients' source) the same everywhere.
                    weights=distributed.weights_digest(me.modules),
                    # What a resume read besides the step (a stale copy of checkpoint_dir on one node
                    # may hold the same step): the validation counters set the later collectives.
                    resumed=dict(best_step=result.best_step, best_es=result.best_es, bad_validations=bad_validations,
                                 stopped_early=result.stopped_early, skipped_batches=result.skipped_batches,
                                 validations=len(result.val_history), elapsed_s=result.elapsed_s,
                                 # What `_better_at_no_gain` compares with (repr: a NaN equals itself).
                                 best_nll=repr(_best_nll(result))))
        distributed.agree_on_start(error, result.steps, plan)  # raises this process's own error too

    # Running statistics merged across a data-parallel run's processes after every step: MEND's
    # factor norms and MoEditor's gate feature norms.
    norms = [n for e in me.editors.values() for n in (e.norm, getattr(e, "gate_norm", None)) if n is not None]
    steps_before, skipped_before = result.steps, result.skipped_batches  # a resume's counts
    start = time.perf_counter()
    bar = progress_bar(config.progress and rank == 0, total=config.steps, initial=result.steps,
                       desc=f"train {me.method}")
    try:
        # Grad on whatever the caller set: under a caller's no_grad the steps' loss (divided by
        # `accumulate` out here) had no graph, and fit ran its steps and logged its losses but
        # trained nothing.
        with (torch.random.fork_rng(devices=_cuda_devices(me)), frozen_parameters(me.model),
              modes_restored(me.editors), torch.enable_grad()):  # each editor module gets its own mode back
            # A resumed state that does not fit (a checkpoint edited by hand, a CUDA state of another
            # size) fails on its own process: the others hear of it here, rather than wait for it
            # in broadcast_state.
            # The generators of the devices in play only, which the fork restores (seed_generators).
            _, error = _attempt(lambda: _set_rng_states(me, rng_state) if rng_state is not None
                                else seed_generators(torch_seed(config.seed), me.devices), size)
            if size > 1:  # one start for every process; each draws its own gate noise and routing
                distributed.settle(error, "restoring the checkpoint's RNG states", params[0].device)
                distributed.broadcast_state(me.editors)
                if rank and rng_state is None:
                    seed_generators(torch_seed(_rank_seed(config.seed, result.steps, rank)), me.devices)
                    for gen in me.route_generators().values():
                        gen.manual_seed(torch_seed(_rank_seed(gen.initial_seed(), result.steps, rank)))
            me.editors.train()
            while result.steps < config.steps and not result.stopped_early:
                norms_before = [distributed.norm_sums(n) for n in norms] if size > 1 else None
                for p in params:
                    p.grad = None
                (step_parts, skipped), error = _attempt(
                    lambda: _accumulate(me, params, train_requests, config, result.steps, rank, size), size, ([], 0))
                contributed = len(step_parts)
                sums = {k: sum(p[k] for p in step_parts) for k in PART_KEYS}
                if size > 1:
                    contributed, skipped, *totals = distributed.average_gradients(
                        params, [contributed, skipped, *(sums[k] for k in PART_KEYS)], error)
                    sums = dict(zip(PART_KEYS, totals))
                    distributed.merge_running_norms(norms, norms_before)
                result.skipped_batches += int(skipped)
                if contributed:
                    _, error = _attempt(lambda: _optimizer_step(params, opt, lr_opt, config), size)
                    if size > 1:
                        distributed.settle(error, "in the optimiser step", params[0].device)
                result.steps += 1
                logged = {k: v / contributed for k, v in sums.items()} if contributed else {}
                result.history.append(dict(step=result.steps, **logged))
                bar.update(1)
                if logged:
                    bar.set_postfix(loss=f"{logged['loss']:.4g}", edit=f"{logged['edit']:.3g}", kl=f"{logged['kl']:.3g}")
                if val_requests is not None and (result.steps % config.val_every == 0 or result.steps == config.steps):
                    best_state, bad_validations = _validate(me, val_requests, config, result, best_state,
                                                            bad_validations, ckpt, rank, size)
                    bar.set_postfix(es=f"{result.val_history[-1]['es']:.3f}", best=f"{result.best_es:.3f}")
                    me.editors.train()
                if ckpt is not None and (result.steps % config.val_every == 0 or result.steps == config.steps
                                         or result.stopped_early):
                    # Every process's RNG states, so that a resume draws what an uninterrupted run would.
                    states = (distributed.gather_outcomes(lambda: _rng_states(me), "checkpointing") if size > 1
                              else [_rng_states(me)])
                    # The counters with this run's time so far (result.elapsed_s adds it at the end only):
                    # a resumed run's elapsed_s counts the time before its checkpoint too.
                    now = dataclasses.replace(result, elapsed_s=result.elapsed_s + time.perf_counter() - start)
                    _on_rank0(lambda: _checkpoint(me, opt, lr_opt, ckpt, now, bad_validations, run, states,
                                                  best_state), "writing a checkpoint", size)
    finally:
        bar.close()
        # The last step's gradients are of no use after training and hold one more copy of the
        # editors (Adam's moments go with the optimisers): a trained editor carries no .grad.
        for p in params:
            p.grad = None
    skipped = result.skipped_batches - skipped_before
    if skipped and rank == 0:
        # Counted only, a run whose every batch overflowed (an fp16 GPT-2 past its GELU's range, README
        # "fp16") returned untrained editors without a word.
        batches = (result.steps - steps_before) * config.accumulate * size
        warn(f"train_editor: {skipped} of this run's {batches} batches were skipped: their editor "
             "gradients were non-finite, unscaled too (an fp16 overflow, or a NaN the model gives for "
             "those inputs), so the editors did not train on them (TrainResult.skipped_batches)")
    if config.restore_best and best_state is not None:
        me.load_state_tensors(best_state)
    result.elapsed_s += time.perf_counter() - start
    return result


def _editor_plan(me: ModelEditor) -> dict:
    """What the processes of a data-parallel run must share about their ModelEditors: the editors'
    tensors (names, shapes, dtypes: the broadcasts and all-reduces run over them, and gloo aborts the
    process on a size mismatch), what sets the factors they are trained on, and each editor's
    settings (as a resume compares them: a fusion, top_k or fisher_keep of its own would give a
    process other losses and validation scores over tensors of the same shapes)."""
    tensors = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in me.editors.state_dict().items())
    return dict(method=me.method, layers=tuple(me.layers), tokens=str(me.tokens), loss_reduction=me.loss_reduction,
                tensors=tensors, editors={key: dict(e.config) for key, e in me.editors.items()})


def _accumulate(me: ModelEditor, params: list, train_requests, config: TrainConfig, steps: int, rank: int,
                size: int) -> tuple[list[dict], int]:
    """One optimiser step's batches (`config.accumulate` of them; global batch index b·W + rank, so
    that W processes see the batches of one process with W·accumulate): their gradients added to the
    params' .grad, (each contributing batch's loss parts, the number of batches skipped as non-finite)."""
    step_parts, skipped = [], 0
    for a in range(config.accumulate):
        b = (steps * config.accumulate + a) * size + rank  # the same batches as W·accumulate
        indices = _batch_indices(len(train_requests), config.batch_size, config.seed, b)
        batch = [train_requests[i] for i in indices]
        before = _forward_state(me)
        try:
            loss, parts = batch_loss(me, batch, config)
        except FloatingPointError:
            # The capture found the batch's edit loss or a layer's gradient factors non-finite (an fp16
            # overflow, a NaN in the model for these inputs; the model is unchanged): the editors'
            # gradient would be non-finite too, so the batch is skipped, as below, not the run ended.
            _restore_buffers(me, before[0])
            skipped += 1
            continue
        # L_edit is a batch mean: backpropagate at the per-token sum's scale, divide back.
        scale = backward_scale(parts.pop("edit_tokens"))
        grads = _scaled_grads(loss / config.accumulate, params, scale)
        finite = _finite(grads)  # checked once per backward (twice was ~2.5 % of a MoEditor step, profiled)
        if scale != 1 and not finite:
            # fp16 overflow of the scaled backward: the batch again, unscaled, from the
            # state the first forward started from (`_forward_state`).
            _restore_forward_state(me, before)
            loss, parts = batch_loss(me, batch, config)
            parts.pop("edit_tokens")
            grads = _scaled_grads(loss / config.accumulate, params, 1)
            finite = _finite(grads)
        if not finite:
            # Skipped whole: its factors (non-finite ones, often) must not stay in the running norms,
            # where they would make every later batch non-finite too.
            _restore_buffers(me, before[0])
            skipped += 1
            continue
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        step_parts.append(parts)
    return step_parts, skipped


def _check_trainable(me: ModelEditor) -> None:
    """What fit refuses about `me` itself before any step (each process of a data-parallel run checks
    its own replica)."""
    check_autograd("ModelEditor.fit (train_editor)", "its capture and its steps", me.model)
    check_not_inference_editors(me)
    check_editors_require_grad(me)
    check_trainable_dtypes(me)
    me._check_layers_still_editable()  # as apply: its validation edits are applies; refused before any step


def check_not_inference_editors(me: ModelEditor) -> None:
    """RuntimeError naming the first inference tensor among the editors' parameters and buffers (a
    ModelEditor built or loaded under torch.inference_mode; apply runs such editors, no step can
    train them).  Without it the running norm's merge raised torch's "Inplace update to inference
    tensor outside InferenceMode" after it had updated u_mean, and an editor without norms raised
    "Inference tensors cannot be saved for backward", neither naming the editors' build."""
    for name, t in [*me.editors.named_parameters(), *me.editors.named_buffers()]:
        if t.is_inference():
            raise RuntimeError(
                f"ModelEditor.fit (train_editor): the editors' tensors are inference tensors (the ModelEditor was "
                f"built or loaded under torch.inference_mode()), first {name!r}; no step can train them. Build "
                "the ModelEditor outside torch.inference_mode() (torch.no_grad() is fine)")


def check_editors_require_grad(me: ModelEditor) -> None:
    """ValueError naming the first editor parameter a caller froze (requires_grad False): the steps
    take the gradient of every editor parameter, so one frozen parameter raised autograd's "One of
    the differentiated Tensors does not require grad" after the batch had merged into the running
    norms, and with every one frozen the run logged its steps and trained nothing."""
    for name, p in me.editors.named_parameters():
        if not p.requires_grad:
            raise ValueError(
                f"ModelEditor.fit (train_editor) trains every editor parameter, but {name!r} has "
                "requires_grad=False: unfreeze the editors first (me.editors.requires_grad_(True))")


def check_trainable_dtypes(me: ModelEditor) -> None:
    """ValueError naming the first 16-bit editor parameter: the optimisers step the editors' own
    parameters, and in fp16 Adam's state underflows (its eps, 1e-8, is 0 there: one step of a
    MEND editor moved to fp16 made every weight of its low-rank layers NaN, with no batch skipped),
    while in bf16 steps of lr 1e-4 are below the resolution of most weights (three steps changed
    1.2 % of v and none of mode_scale).  16-bit editors are trained in fp32 and moved after."""
    for name, p in me.editors.named_parameters():
        if p.dtype in HALF_DTYPES:
            dtype = str(p.dtype).replace("torch.", "")
            raise ValueError(
                f"the editors must be float32 or float64 to train, got {name!r} in {dtype}: "
                "Adam's steps on 16-bit weights underflow (fp16: NaN weights) or round away (bf16). Train them in "
                "float32 (me.editors.float()) and move the trained editors after (me.editors.to(torch.bfloat16))")


def _attempt(fn, size: int, failed=None):
    """(fn(), None).  In a data-parallel run (`size` > 1) an Exception is returned instead, as
    (`failed`, the exception), for the caller to share with the other processes before it raises."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 -- the caller raises it on every process
        if size == 1:
            raise
        return failed, exc


def _optimizer_step(params: list, opt, lr_opt, config: TrainConfig) -> None:
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    with host_scalars_on_cpu():
        opt.step()
        lr_opt.step()


def _on_rank0(fn, what: str, size: int):
    """`fn()` on rank 0 of a data-parallel run of `size` processes, its result (or its error) on
    every process (`distributed.on_rank0`); in one process, just `fn()`."""
    return distributed.on_rank0(fn, what) if size > 1 else fn()


def torch_seed(seed: int) -> int:
    """`seed` where torch's manual_seed takes it ([-2**63, 2**64)), else reduced modulo 2**64: any
    int seeds a run, and every seed that worked before gives the same run."""
    return seed if -2**63 <= seed < 2**64 else seed % 2**64


def _rank_seed(seed: int, steps: int, rank: int) -> int:
    """The RNG seed of process `rank` > 0 of a data-parallel run (at start or resume after `steps`):
    its own gate noise, a function of the run's seed."""
    return (seed * 1_000_003 + steps) * 1_009 + rank


def _scaled_grads(loss: torch.Tensor, params: list, scale: float) -> list:
    """Gradients of `loss` for `params` (None where unused), backpropagated at `scale` and divided back.
    A loss that depends on no param (every factor of the batch zero, so that every token is dropped
    and ProEditor's masked shift, which skips empty groups, adds nothing) has no graph: all None."""
    if not loss.requires_grad:
        return [None] * len(params)
    grads = list(torch.autograd.grad(loss * scale, params, allow_unused=True))
    # Divided in place where the list holds the only reference to autograd's result (`_owners`):
    # `g / scale` made a copy of every gradient while autograd's were still held, the step's peak
    # (SmolLM2 fp32, MoEditor on down_proj 27-29, 32 CounterFact edits, 1 thread, the profiler's
    # allocation events: 495.9 MiB, 4 editor-weight gradients of 61.9 MiB and their 4 quotients).
    # A view, a tensor listed twice (one for both terms of a sum) or held elsewhere, or sharing its
    # memory, is divided into a new tensor, as before: the step accumulates and clips the returned
    # gradients in place.  The same values bit for bit.
    fresh = _owners([torch.empty(0)], 0)
    for k in range(len(grads)):  # by index: a loop variable would be one more reference
        if grads[k] is None:
            continue
        if (fresh is not None and type(grads[k]) is torch.Tensor and grads[k].is_contiguous()
                and _owners(grads, k) == fresh):
            if scale != 1:
                grads[k].div_(scale)
        else:
            grads[k] = grads[k] / scale
    return grads


def _owners(items: list, k: int) -> tuple | None:
    """The references to `items[k]` from Python, to its tensor and to its memory, each counted with
    its own reader's (which differ between Python and torch versions: torch 2.15 counts the Python
    storage object it reads through, 2.5 to 2.13 do not), to compare with a new tensor's.  None where
    torch lacks these private counters (then every gradient is divided into a new tensor, as before)."""
    try:
        return (sys.getrefcount(items[k]), items[k]._use_count(),
                torch._C._storage_Use_Count(items[k].untyped_storage()._cdata))
    except AttributeError:
        return None


def _finite(grads: list) -> bool:
    return all_finite_many(grads)  # one device sync per step, not one per editor parameter


def _forward_state(me: ModelEditor) -> tuple:
    """What a training forward changes besides its graph: the editors' buffers (running norms,
    updated from each batch's factors) and the RNG states (`_rng_states`: MoEditor's gate noise,
    RaEditor's groups), so that a batch can be run again from the same start.  Buffers are vectors
    of the layers' widths: a copy per batch is small next to the batch's activations."""
    return {k: b.clone() for k, b in me.editors.named_buffers()}, _rng_states(me)


def _restore_buffers(me: ModelEditor, buffers: dict) -> None:
    with torch.no_grad():
        for k, b in me.editors.named_buffers():
            b.copy_(buffers[k])


def _restore_forward_state(me: ModelEditor, state: tuple) -> None:
    buffers, rng_states = state
    _restore_buffers(me, buffers)
    _set_rng_states(me, rng_states)


def _best_nll(result: TrainResult, history: list | None = None) -> float | None:
    """The best validation's NLL: its step's last entry in `history` (val_history, which a
    checkpoint carries), None where there is none."""
    history = result.val_history if history is None else history
    return next((v.get("nll") for v in reversed(history) if isinstance(v, dict) and v.get("step") == result.best_step),
                None)


def _better_at_no_gain(scores: dict, result: TrainResult) -> bool:
    """Whether a validation that is no gain (`_validate`) still beats the best state: the best's
    ES exactly and a lower NLL (than a NaN one, any).  It becomes the best state, the one
    restore_best gives back, without resetting the patience count, so an ES that stopped moving
    still stops the run; and best_es, which gains are measured from, stays as it was (taking a
    higher ES within min_delta here would raise it, and a climb in steps each below min_delta
    would then stop a run that the rule before kept going).  Without it training that moved the
    targets' probabilities without yet turning an argmax was dropped: a tiny random Llama's MEND,
    20 steps validated every 5, scored ES 0.0 at all four validations while the NLL fell from
    5.877 to 5.850, and restore_best gave back step 5's editor (now step 20's)."""
    if scores["es"] != result.best_es:
        return False
    best_nll, nll = _best_nll(result, result.val_history[:-1]), scores["nll"]
    return best_nll is not None and (nll < best_nll or (math.isnan(best_nll) and not math.isnan(nll)))


def _validate(me, val_requests, config, result, best_state, bad_validations, ckpt, rank=0, size=1):
    """Score the editors on `val_requests` (a data-parallel run's processes each score a share,
    `_evaluate_split`) and keep the best state; rank 0 saves best.safetensors.  `rank`, `size`: the
    run's (0, 1 unless it is data-parallel).

    The RNG states are set back after scoring: the edits it applies draw RaEditor's groups from the
    routing generators (torch's generator when unseeded) that training draws from, so that how
    often a run validated changed the editor it trained (val_every 2 and 4 trained two RaEditors),
    and a run extended past its last step (validated there, as every run is) trained another editor
    than one run of as many steps."""
    rng_states = _rng_states(me)
    with already_warned():  # train_editor warned of dropout for the whole run: not again at each apply
        scores = (_evaluate_split(me, val_requests, config.batch_size, rank, size) if size > 1
                  else evaluate_edits(me, val_requests, config.batch_size))
    _set_rng_states(me, rng_states)
    result.val_history.append(dict(step=result.steps, **scores))
    gain = result.best_es is None or scores["es"] > result.best_es + config.min_delta
    if gain or _better_at_no_gain(scores, result):
        result.best_es, result.best_step = scores["es"], result.steps
        best_state = {k: v.clone() for k, v in me.state_tensors().items()}
        if ckpt is not None:
            _on_rank0(lambda: _save_editor(me, ckpt / "best.safetensors", best_state), "saving the best editor", size)
    if gain:
        bad_validations = 0
    else:
        bad_validations += 1
        if config.patience is not None and bad_validations >= config.patience:
            result.stopped_early = True
    return best_state, bad_validations
