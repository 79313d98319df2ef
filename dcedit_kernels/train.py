"""Train a ModelEditor's editors: loss = cedit·L_edit + cloc·KL + balance_weight·L_balance.

One training batch of E edits costs three model passes (the capture's split in
`capture_batch_size` rows), whatever the number of editors N_g:
1. capture: forward + backward of the edit loss on the edit prompts gives the gradient factors
   (μ, η) of every edited weight (and MoEditor's edit features); it is `ModelEditor.capture`, so
   its loss is the ModelEditor's `loss_reduction` ("edit": each edit's mean target NLL, summed;
   "token": MEND's batch mean), the same one `apply()` uses: an editor's normalisation statistics
   and steps α are learned on the scale of the factors it will be given at edit time;
2. editors (train mode: normalisation statistics update, gate noise on) map them to grouped
   low-rank factors, differentiably;
3. one forward pass over [rephrase rows; locality rows] with `lowrank_layers.lowrank_edited`:
   each edit's rephrase row sees its own group's shift (paper Eq. 18; `edit_rows="all"` makes it
   see every group's), each locality row sees the sum of every group's shift (the "add" fusion:
   what `apply()` adds for one editor or fusion "add", for "sss" on the entries where the groups
   agree in sign only, and not what "max" or "ssm" add, see lowrank_layers;
   `locality_rows="own"` for the paper's per-group form; `locality_rows="fused"` for exactly the
   shift `apply()` adds, whatever the fusion and mask, at the cost of one dense o×i fused shift per
   edited weight and step (shared by the step's passes), as the Fisher-masked path below: it
   makes the KL term measure the drawdown of the model as it will be edited for "sss", "max" and
   "ssm" editors, and gives "all"'s losses up to rounding for one editor or fusion "add"; on a
   CPU model the rows run as a few passes of rows of similar length, `length_buckets`), and
   backprop reaches the editors through `ops.lowrank_delta_linear` without any o×i matrix
   (except for Fisher-masked editors, ProEditor's, below, and `locality_rows="fused"`);
   plus a no-grad pass of the unedited model over the locality rows for the KL reference, whose
   hidden states below the lowest edited block the edited pass takes over instead of computing
   them again for those rows (`reuse_prefix`, `block_prefix`).

ProEditor's Fisher mask (`fisher_mask=True`, the default): as we read the paper, its framework
routes, edits, then refines (masks) the shift, and the training losses are those of the language
model after that refining stage, so the losses are taken on the masked shift.  The mask is not
low-rank, so editors built with `fisher_keep` take the dense path of `lowrank_layers` (each
group's o×i shift formed and masked; gradients flow through the kept entries only, the mask itself
being a constant of the captured gradients).  For ProEditor (one group) that costs about one extra
dense linear layer per edited weight in the forward and the backward, plus one o×i selection per
step: measured on SmolLM2 (ProEditor, rank 32, 3 down_proj layers, 25 edits, CPU, 1 thread), a
training step took 4.73-4.77 s masked against 4.68-4.73 s unmasked.  `fisher_mask=False` trains
on the unmasked shift (the mask then only acts at edit time, as this package did before).

L_edit is the mean NLL of the target tokens on each edit's rephrase (its prompt when it has none),
over all the batch's rephrase target tokens (the training objective; the capture's
`loss_reduction` only sets the scale of the factors fed to the editors);
KL = mean over locality tokens of KL(p_unedited ‖ p_edited) (MEND's direction), the locality text
being the request's `locality` (+ ` locality_target`), else the prompt of the next edit in the
batch with its last position left out (that position predicts the other edit's own target, which
the edit is meant to change).  L_balance is the gate's importance + load loss (MoEditor).

Optimisation (MEND's split): Adam with `lr` on the editor weights, a separate optimiser with `lr_lr`
on the per-weight steps α (Adam's first step moves each α by exactly `lr_lr`, whatever its gradient's
size: from MEND's α = −edit_lr = −1e-4 with lr_lr 1e-4, an α whose gradient points to 0 lands on about
0 for a step, as a check saw on 2 of SmolLM2's 3 edited layers after one 25-edit step; a smaller
lr_lr or `lr_optimizer="sgd"` moves it by its gradient instead); gradient accumulation over
`accumulate` batches; gradient-norm clipping; a batch with a non-finite gradient (the editors', or the capture's:
a non-finite edit loss or gradient factors) is skipped and counted.  The backward runs at the scale of the
per-token sum of L_edit (the KL and balance terms share it) and the gradients are divided back,
exactly (`losses.backward_scale`: keeps fp16 gradients from flushing to zero; fp32 and bf16
unchanged).  Only a per-token activation gradient past fp16's range can overflow there (the editors'
gradients are fp32 sums; the model's weights get none); that batch then runs again unscaled, from
the running norms, RNG states and routing generators its first forward started from.  Every
`val_every` steps the editor is validated by applying real (fused, masked) edits to the model and
measuring edit success on the val requests' rephrases; early stopping after `patience` validations
without improvement; the best editor is restored at the end.  Checkpoints (safetensors only) go to
`checkpoint_dir`: `editor.safetensors` (ModelEditor.save), `best.safetensors`, and
`trainer.safetensors` (the optimisers' state flattened to tensors, the RNG state, the editors' state
again and the best state when it is not theirs, so that one file holds a whole step, and the
counters as JSON metadata); `resume=True`
continues from them (ResumeMismatchError, a ValueError, when the
run's TrainConfig, apart from `steps`, the validation and early-stopping fields, display/saving
fields, `data_parallel` (the number of processes is checked on its own), `length_buckets` and
`reuse_prefix` (rounding only), or its training or validation requests differ from the run that
wrote them).  The batch order is a function of (seed, batch index), so a resumed run sees the
batches it would have seen.

Split models (layers on several devices): each edited layer computes on its own device with the
editor outputs moved there (lowrank_layers), the losses are gathered on the logits' device, and the
gradients reach each editor on its own device through those moves.

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

import contextlib
import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from ._checks import HALF_DTYPES, is_finite_number, is_int, is_number
from .block_prefix import PrefixReuse
from .capture import frozen_parameters, modes_restored
from .devices import cuda_indices
from .editors.grouped_editor import config_differences, with_absent_defaults
from .ft_baseline import locality_texts
from .length_buckets import plan_passes, run_in_passes
from .lowrank_layers import lowrank_edited
from .losses import backward_scale, log_probs_at, picked_kl, scored_accuracy, scored_nll
from .model_editor import CHECKPOINT_KEY, LEGACY_LOSS_REDUCTION, ModelEditor
from .requests import EditRequest, validate_requests
from .safetensors_file import save_safetensors
from .scored_logits import logits_at, scored_positions
from .tokenize import causal_pair_ids, no_kv_cache, pad_rows, pad_token_id, text_ids

VIEWS = ("own", "all")  # what a row sees: its edit's group's shift, or every group's (their sum)
LOCALITY_VIEWS = VIEWS + ("fused",)  # or the fused shift apply() adds (locality rows only)
PART_KEYS = ("loss", "edit", "kl", "balance")  # the terms logged per step (TrainResult.history)


@dataclass
class TrainConfig:
    """Editor training settings: MEND's loss weights (cedit, cloc), gradient clip and lr_lr; the
    other defaults suit short runs (MEND's lr is 1e-6)."""

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
    locality_rows: str = "all"  # "own" | "all" | "fused" (the shift apply() adds: module docstring)
    fisher_mask: bool = True  # Fisher-masked editors (ProEditor) are trained on the masked shift
    val_every: int = 50
    val_size: int | None = None  # how many val requests to use (None: all)
    patience: int | None = 5  # validations without improvement before stopping (None: never)
    min_delta: float = 0.0
    restore_best: bool = True
    checkpoint_dir: str | None = None
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
        if self.grad_clip is not None and (not is_number(self.grad_clip) or not self.grad_clip > 0):
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        for name in ("fisher_mask", "data_parallel", "reuse_prefix", "restore_best", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
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
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise ValueError(f"checkpoint_dir must be a path or None, got {self.checkpoint_dir!r}")
        return self

    def replace(self, **changes) -> "TrainConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    steps: int  # optimiser steps done in total (including before a resume)
    history: list = field(default_factory=list)  # per step: loss, edit, kl, balance
    val_history: list = field(default_factory=list)  # per validation: step, es, es_all, nll
    best_step: int | None = None
    best_es: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    skipped_batches: int = 0
    elapsed_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# The training loss of one batch
# ---------------------------------------------------------------------------------------------
def _locality_row(requests: list[EditRequest], e: int, tokenizer) -> tuple[list[int], int] | None:
    """(token ids, number of KL positions) of edit e's locality row, or None (one edit, no locality)."""
    # Tokenized as the edit rows' prompts are (`tokenize.text_ids`: no appended EOS), so that the
    # last position of a prompt row is its last prompt token, the one that predicts that edit's target.
    r = requests[e]
    if r.locality is not None:
        ids = text_ids(tokenizer, locality_texts([r])[0])
        return ids, len(ids)
    if len(requests) < 2:
        return None
    ids = text_ids(tokenizer, requests[(e + 1) % len(requests)].prompt)
    return ids, len(ids) - 1  # the last position predicts the other edit's target: not locality


def eval_rows(me: ModelEditor, requests: list[EditRequest], config: TrainConfig) -> dict:
    """The one-pass batch: E rephrase rows (labels on the target), then the locality rows.

    Returns input_ids, attention_mask, labels (−100 on locality rows), row_edit, row_sees_all,
    row_sees_fused (`lowrank_edited`'s), is_edit_row (B,) bool and kl_mask (B, L) bool (the
    positions the KL is taken at).
    """
    tok = me.tokenizer
    rows, labels, row_edit, sees_all, is_edit, kl_len = [], [], [], [], [], []
    for e, r in enumerate(requests):
        ids, n_prompt = causal_pair_ids(tok, r.rephrase or r.prompt, r.target, e)
        rows.append(ids)
        labels.append([-100] * n_prompt + ids[n_prompt:])
        row_edit.append(e), sees_all.append(config.edit_rows == "all"), is_edit.append(True), kl_len.append(0)
    for e in range(len(requests)):
        loc = _locality_row(requests, e, tok)
        if loc is None or loc[1] < 1:
            continue
        rows.append(loc[0])
        labels.append([])
        row_edit.append(e), sees_all.append(config.locality_rows == "all"), is_edit.append(False)
        kl_len.append(loc[1])
    batch = pad_rows(rows, pad_token_id(tok), me.device, labels=labels)
    width = batch["input_ids"].shape[1]
    kl_mask = torch.arange(width).unsqueeze(0) < torch.tensor(kl_len).unsqueeze(1)
    dev = me.device
    batch.update(row_edit=torch.tensor(row_edit, dtype=torch.int64, device=dev),
                 row_sees_all=torch.tensor(sees_all, dtype=torch.bool, device=dev),
                 row_sees_fused=torch.tensor([not e and config.locality_rows == "fused" for e in is_edit],
                                             dtype=torch.bool, device=dev),
                 is_edit_row=torch.tensor(is_edit, dtype=torch.bool, device=dev),
                 kl_mask=kl_mask.to(dev))
    return batch


def batch_edits(me: ModelEditor, requests: list[EditRequest]) -> dict:
    """{layer: GroupedEdit} for a batch of edits: capture, then the editors, differentiably (in
    the mode the editors are in: train mode updates the statistics and draws gate noise)."""
    edit_batch = me.tokenize([r.prompt for r in requests], [r.target for r in requests])
    factors, feats, _ = me.capture(edit_batch)
    with torch.enable_grad():
        return me.run_editors(factors, feats)


def loss_from_edits(me: ModelEditor, requests: list[EditRequest], edits: dict, config: TrainConfig):
    """(loss, parts): the training loss of these edits, from one edited forward pass (or passes of
    rows of similar length: `TrainConfig.length_buckets`); `parts` holds its terms' values and
    `edit_tokens`, the number of target tokens L_edit averages over."""
    model = me.model
    rows = eval_rows(me, requests, config)
    is_edit, loc_rows = rows["is_edit_row"], ~rows["is_edit_row"]
    has_loc = bool(loc_rows.any())
    skip = list(me.modules.values())
    # The locality rows' lower blocks run once, in the reference pass (`block_prefix`).
    prefix = PrefixReuse.for_model(model, me.modules) if config.reuse_prefix and has_loc else None
    no_cache = no_kv_cache(model)  # training needs none, and RWKV's in-place state breaks the backward
    if has_loc:
        def reference(batch, where, r):
            def run(batch):
                return log_probs_at(model, batch["input_ids"], batch["attention_mask"], where, skip, **no_cache)

            if prefix is None:
                return run(batch)
            key = [loc_index[i] for i in r.tolist()]
            with prefix.record(key, batch["input_ids"].shape):
                logp = run(batch)
            prefix.confirm(key, run, batch, logp)
            return logp

        loc = {k: rows[k][loc_rows] for k in ("input_ids", "attention_mask")}
        loc_passes = _passes(me, loc, config)
        if prefix is not None:
            loc_index = loc_rows.nonzero()[:, 0].tolist()
            if loc_passes is None:  # one pass, trimmed as the edited one's will be
                loc_passes = [list(range(len(loc_index)))]
        base_logp = run_in_passes(loc, rows["kl_mask"][loc_rows], loc_passes, reference)
    # The LM head computes the logits that a loss reads only: the rephrase rows' target-predicting
    # positions and the locality rows' KL positions (scored_logits), in row-major order.
    positions = rows["kl_mask"] & loc_rows.unsqueeze(1)
    positions[is_edit] = scored_positions(rows["labels"][is_edit], causal=True)
    row_of = positions.nonzero()[:, 0]

    # The passes' one backward runs after all of them: the o×i masks and shifts that depend on the
    # edits only (Fisher-masked editors, locality_rows="fused") are formed once for every pass
    # (`lowrank_edited`'s `shared`), and dropped with this call's graph.
    shared = {}

    def edited(batch, where, r):
        key = tuple(r.tolist()) if prefix is not None else None
        reused = prefix is not None and prefix.reusable(key)
        with lowrank_edited(model, edits, rows["row_edit"][r], rows["row_sees_all"][r], masked=config.fisher_mask,
                            row_sees_fused=rows["row_sees_fused"][r], shared=shared), \
                logits_at(model, where, skip) as scored, prefix.reuse(key) if reused else contextlib.nullcontext():
            return scored.pick(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     **no_cache).logits)

    if prefix is not None and prefix.recorded:
        passes = _edited_passes(me, rows, config, loc_index, loc_passes)
    else:
        passes = _passes(me, rows, config)
    with torch.enable_grad():
        picked = run_in_passes(rows, positions, passes, edited)
        # The losses are gathered on the logits' device (a split model's LM head may sit elsewhere
        # than the inputs and the editors); on one device these moves are no-ops.
        out = picked.device
        edit_pick = is_edit[row_of].to(out)
        # eval_rows puts the rephrase rows first, so their positions lead the row-major order: the
        # two parts are a split of `picked` (views; its backward is one cat), where boolean picks
        # copied the (n, V) logits twice and scattered each gradient back into zeros (CPU, 1 thread,
        # 330 × 49152 fp32, forward + backward: 156-196 ms against 68-72 ms; the same values).
        n_edit = int(edit_pick.sum())
        if bool(edit_pick[:n_edit].all()):
            edit_logits, loc_logits = picked.split([n_edit, picked.shape[0] - n_edit])
        else:
            edit_logits, loc_logits = picked[edit_pick], picked[~edit_pick]
        l_edit = scored_nll(edit_logits, rows["labels"][is_edit], causal=True)
        kl = picked_kl(base_logp, loc_logits) if has_loc else picked.new_zeros(())
        balance = torch.stack([e.aux_loss.to(device=out, dtype=l_edit.dtype) for e in edits.values()]).mean()
        loss = config.cedit * l_edit + config.cloc * kl + config.balance_weight * balance
    parts = {k: float(v.detach()) for k, v in dict(loss=loss, edit=l_edit, kl=kl, balance=balance).items()}
    parts["edit_tokens"] = n_edit
    return loss, parts


def _passes(me: ModelEditor, batch: dict, config: TrainConfig) -> list[list[int]] | None:
    """The row indices of each forward pass over `batch`, rows of similar length together, when
    `config.length_buckets` (None: when the model's inputs go to the CPU); else None: the batch
    in one pass, as it is."""
    on = config.length_buckets if config.length_buckets is not None else me.device.type == "cpu"
    return plan_passes(batch["attention_mask"].sum(1).tolist()) if on else None


def _edited_passes(me: ModelEditor, rows: dict, config: TrainConfig, loc_index: list[int],
                   loc_passes: list[list[int]]) -> list[list[int]]:
    """The edited pass's passes when the locality rows reuse the reference's prefix: the rephrase
    rows' own (`_passes`, or all in one), then the locality rows in the reference's passes (the
    same rows in the same order: the recorded outputs fit them), as indices into `rows`
    (`loc_index`: the locality rows' indices there, in order)."""
    is_edit = rows["is_edit_row"]
    edit_index = is_edit.nonzero()[:, 0].tolist()
    edit_passes = _passes(me, {k: rows[k][is_edit] for k in ("input_ids", "attention_mask")}, config)
    passes = [[edit_index[i] for i in p] for p in edit_passes or [range(len(edit_index))]]
    return passes + [[loc_index[i] for i in p] for p in loc_passes]


def batch_loss(me: ModelEditor, requests: list[EditRequest], config: TrainConfig):
    """(loss, parts) of one batch of edits, differentiable in the editors' parameters."""
    if me.seq2seq:
        raise ValueError("editor training supports causal LMs only")
    return loss_from_edits(me, requests, batch_edits(me, requests), config)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def evaluate_edits(me: ModelEditor, requests, batch_size: int = 4) -> dict:
    """Apply the edits (fused path, editors in eval mode) batch by batch, score each edit's
    rephrase (its prompt when it has none) teacher-forced, undo.  Returns `es` (mean share of
    target tokens predicted by argmax), `es_all` (share of edits with every token right) and
    `nll` (mean target NLL per edit).  The LM head computes the scored positions' logits only
    (`scored_logits.logits_at`)."""
    requests = validate_requests(requests)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if me.seq2seq:
        raise ValueError("evaluate_edits supports causal LMs only (as editor training does)")
    return _edit_summary(_batch_scores(me, requests, batch_size, range(_n_batches(requests, batch_size))))


def _n_batches(requests, batch_size: int) -> int:
    return -(-len(requests) // batch_size)


def _batch_scores(me: ModelEditor, requests, batch_size: int, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(each edit's target-token accuracy, each edit's mean target NLL) of the batches numbered
    `batches` (batch b: requests[b·batch_size:(b+1)·batch_size]), each applied, scored and undone."""
    out = []
    for b in batches:
        chunk = requests[b * batch_size:(b + 1) * batch_size]
        rows = me.tokenize([r.rephrase or r.prompt for r in chunk], [r.target for r in chunk])
        positions = scored_positions(rows["labels"], causal=True)
        with me.edited(chunk), torch.no_grad(), logits_at(me.model, positions, skip=me.modules.values()) as scored:
            logits = me.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                              **no_kv_cache(me.model)).logits  # read back by nobody (see metrics._score_batch)
            picked = scored.pick(logits)
            acc = scored_accuracy(picked, rows["labels"], causal=True).cpu()
            sums, counts = scored_nll(picked, rows["labels"], causal=True, reduction="row")
            out.append((acc, (sums / counts.clamp(min=1)).cpu()))
    return out


def _edit_summary(batch_scores: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    acc_t, nll_t = torch.cat([a for a, _ in batch_scores]), torch.cat([n for _, n in batch_scores])
    return dict(es=float(acc_t.mean()), es_all=float((acc_t == 1).float().mean()), nll=float(nll_t.mean()))


def _evaluate_split(me: ModelEditor, requests, batch_size: int, rank: int, size: int) -> dict:
    """`evaluate_edits` shared by the `size` processes of a data-parallel run (their editors are
    equal): process r scores batches r, r + W, …; the batches' scores are gathered and put back in
    order, so every process gets what one process scoring them all would (bit for bit, but for
    RaEditor's random routing, which each process draws from its own generator).  `requests`:
    validated, as `train_editor` gives them."""
    n = _n_batches(requests, batch_size)
    parts = distributed.gather_outcomes(lambda: _batch_scores(me, requests, batch_size, range(rank, n, size)),
                                        "validating")
    return _edit_summary([parts[b % size][b // size] for b in range(n)])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _batch_indices(n: int, batch_size: int, seed: int, b: int) -> list[int]:
    """Indices of batch b: epoch-wise random permutations, a pure function of (seed, b)."""
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    epoch, k = divmod(b, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed(seed * 1_000_003 + epoch)))
    return perm[k * bs:(k + 1) * bs].tolist()


def train_editor(me: ModelEditor, train_requests, val_requests=None, config: TrainConfig | None = None) -> TrainResult:
    """Train `me`'s editors on `train_requests` (see the module docstring); returns a TrainResult."""
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()  # its fields may have been assigned since it was built
    if not isinstance(me, ModelEditor):
        raise ValueError(f"me must be a ModelEditor, got {type(me).__name__}")
    if not len(me.editors):
        raise ValueError(f"method {me.method!r} has no editor to train")
    if me.seq2seq:
        raise ValueError("editor training supports causal LMs only")
    check_trainable_dtypes(me)
    group_rank, group_size = distributed.world()
    rank, size = (group_rank, group_size) if config.data_parallel else (0, 1)
    if not config.data_parallel and group_size > 1:
        warnings.warn(f"train_editor: a process group of {group_size} processes is up but "
                      "data_parallel=False: this process trains its editors on its own (the others repeat "
                      "the work, and every process writes checkpoint_dir); TrainConfig(data_parallel=True) "
                      "trains them data-parallel", stacklevel=2)

    def checked_requests():
        train = validate_requests(train_requests, "train_requests")
        val = None if val_requests is None else validate_requests(val_requests, "val_requests")[: config.val_size]
        return train, val

    # A data-parallel process given invalid requests (its own data file, say) tells the others in
    # agree_on_start, rather than raise alone and leave them waiting there.
    (train_requests, val_requests), error = _attempt(checked_requests, size, (None, None))
    if train_requests is not None and config.batch_size > len(train_requests):
        # The batches hold every request then (`_batch_indices`): the editors see a smaller batch
        # than asked for, which matters under loss_reduction="token" (factors scale as 1/N).
        warnings.warn(f"train_editor: batch_size {config.batch_size} is larger than the {len(train_requests)} "
                      f"training requests: every batch is all {len(train_requests)} of them", stacklevel=2)

    alpha_ids = {id(e.alpha) for e in me.editors.values()}
    alphas = [e.alpha for e in me.editors.values()]
    weights = [p for p in me.editors.parameters() if id(p) not in alpha_ids]
    params = weights + alphas
    opt = torch.optim.Adam(weights, lr=config.lr)
    lr_opt = (torch.optim.Adam if config.lr_optimizer == "adam" else torch.optim.SGD)(alphas, lr=config.lr_lr)

    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    result = TrainResult(steps=0)
    run = _run_settings(config, train_requests, val_requests, size)

    fresh = (None, None, 0)  # (RNG states, best state, bad validations) of a run that starts anew

    def start():
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
            if config.resume and (ckpt / "trainer.safetensors").is_file():
                return _resume(me, opt, lr_opt, ckpt, result, run, rank)
        return fresh

    if error is None:
        (rng_state, best_state, bad_validations), error = _attempt(start, size, fresh)
    else:  # raised on every process in agree_on_start
        rng_state, best_state, bad_validations = fresh
    if result.stopped_early and (config.patience is None or bad_validations < config.patience):
        result.stopped_early = False  # a run stopped by patience goes on with another
    if size > 1:  # every process starts from the same step and plan, or all of them raise (none waits)
        plan = dict(run, steps=config.steps, val_every=config.val_every, patience=config.patience,
                    min_delta=config.min_delta, checkpoints=ckpt is not None, editor=_editor_plan(me),
                    # What a resume read besides the step (a stale copy of checkpoint_dir on one node
                    # may hold the same step): the validation counters set the later collectives.
                    resumed=dict(best_step=result.best_step, best_es=result.best_es, bad_validations=bad_validations,
                                 stopped_early=result.stopped_early, skipped_batches=result.skipped_batches,
                                 validations=len(result.val_history), elapsed_s=result.elapsed_s))
        distributed.agree_on_start(error, result.steps, plan)  # raises this process's own error too

    # Running statistics merged across a data-parallel run's processes after every step: MEND's
    # factor norms and MoEditor's gate feature norms.
    norms = [n for e in me.editors.values() for n in (e.norm, getattr(e, "gate_norm", None)) if n is not None]
    start = time.perf_counter()
    bar = tqdm(total=config.steps, initial=result.steps, disable=not config.progress or rank != 0,
               desc=f"train {me.method}")
    try:
        with (torch.random.fork_rng(devices=_cuda_devices(me)), frozen_parameters(me.model),
              modes_restored(me.editors)):  # every editor module gets its own train/eval flag back
            if rng_state is not None:
                _set_rng_states(me, rng_state)
            else:
                torch.manual_seed(torch_seed(config.seed))
            if size > 1:  # one start for every process; each draws its own gate noise and routing
                distributed.broadcast_state(me.editors)
                if rank and rng_state is None:
                    torch.manual_seed(torch_seed(_rank_seed(config.seed, result.steps, rank)))
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
    grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
    return [None if g is None else g / scale for g in grads]


def _finite(grads: list) -> bool:
    return all(g is None or bool(torch.isfinite(g).all()) for g in grads)


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


def _cuda_devices(me: ModelEditor) -> list:
    """Indices of every CUDA device the model or the editors use (their RNG states are forked and
    checkpointed: gate noise is drawn on each editor's device)."""
    return cuda_indices(me.devices)


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
    scores = (_evaluate_split(me, val_requests, config.batch_size, rank, size) if size > 1
              else evaluate_edits(me, val_requests, config.batch_size))
    _set_rng_states(me, rng_states)
    result.val_history.append(dict(step=result.steps, **scores))
    if result.best_es is None or scores["es"] > result.best_es + config.min_delta:
        result.best_es, result.best_step = scores["es"], result.steps
        best_state = {k: v.clone() for k, v in me.state_tensors().items()}
        bad_validations = 0
        if ckpt is not None:
            _on_rank0(lambda: _save_editor(me, ckpt / "best.safetensors", best_state), "saving the best editor", size)
    else:
        bad_validations += 1
        if config.patience is not None and bad_validations >= config.patience:
            result.stopped_early = True
    return best_state, bad_validations


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


EDITOR_PREFIX = "editor."  # the editors' state in trainer.safetensors (`_checkpoint`)
BEST_PREFIX = "best."  # the best validated state in trainer.safetensors, when it is not the editors' own
RNG_KEYS = ("rng_state", "route_rng.", "cuda_rng.")  # the names (or name prefixes) `_rng_states` uses


def _set_rng_states(me: ModelEditor, states: dict) -> None:
    """Restore what `_rng_states` gave (a checkpoint's, or a batch's start); a routing generator or
    CUDA device it has no state for is left as it is."""
    torch.set_rng_state(states["rng_state"])
    for key, gen in me.route_generators().items():
        if f"route_rng.{key}" in states:
            gen.set_state(states[f"route_rng.{key}"])
    for name, state in states.items():
        if name.startswith("cuda_rng."):
            torch.cuda.set_rng_state(state, int(name.rsplit(".", 1)[1]))


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
    counters = dict(steps=result.steps, best_step=result.best_step, best_es=result.best_es,
                    stopped_early=result.stopped_early, skipped_batches=result.skipped_batches,
                    bad_validations=bad_validations, elapsed_s=result.elapsed_s, best=best,
                    history=result.history, val_history=result.val_history)
    meta = {"opt": json.dumps(m1), "lr_opt": json.dumps(m2), "counters": json.dumps(counters),
            "model_editor": json.dumps(me.config()), "run": json.dumps(run)}
    save_safetensors(tensors, ckpt / "trainer.safetensors", meta)


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
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = ckpt / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if not {"opt", "lr_opt", "counters", "model_editor"} <= set(meta):
        raise ValueError(f"{path} is not a train_editor checkpoint")
    saved = json.loads(meta["model_editor"])
    # Editor arguments newer than the checkpoint (MoEditor's gate_norm) take the value it was
    # trained with, as ModelEditor.load takes them: a 0.5.6 MoEditor's run resumes with gate_norm=False.
    saved_editors = {key: with_absent_defaults(e) for key, e in saved["editors"].items()}
    now = me.config()["editors"]
    if saved["layers"] != me.layers or saved["method"] != me.method or saved_editors != now:
        diff = "; ".join(f"editor {key} {config_differences(saved_editors[key], now[key])}"
                         for key in sorted(set(saved_editors) & set(now))
                         if isinstance(saved_editors[key], dict) and saved_editors[key] != now[key])
        same_layers = saved["layers"] == me.layers and saved["method"] == me.method
        raise ValueError(f"{path} was written for another editor ({saved['method']} on {saved['layers']})"
                         + (f" ({diff})" if diff and same_layers else ""))
    saved_reduction = saved.get("loss_reduction", LEGACY_LOSS_REDUCTION)
    if saved_reduction != me.loss_reduction:
        raise ValueError(f"{path} was trained with loss_reduction={saved_reduction!r}, this ModelEditor uses "
                         f"{me.loss_reduction!r}: the editor's statistics would mix two scales")
    if "run" in meta:  # checkpoints written before the settings were recorded are not checked
        _check_run(path, json.loads(meta["run"]), run)
    tensors = load_file(str(path))
    editor = {k[len(EDITOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(EDITOR_PREFIX)}
    if not editor:  # a checkpoint from before the editors' state was also written in trainer.safetensors
        editor = load_file(str(ckpt / "editor.safetensors"))
    me.load_state_tensors(editor)  # copied into each editor's device
    _unflatten_optimizer(opt, "opt", tensors, json.loads(meta["opt"]))
    _unflatten_optimizer(lr_opt, "lr_opt", tensors, json.loads(meta["lr_opt"]))
    own = f"rank{rank}." if rank else ""
    rng_states = {name: v for k, v in tensors.items()
                  if k.startswith(own) and (name := k[len(own):]).startswith(RNG_KEYS)}
    counters = json.loads(meta["counters"])
    result.steps = result.resumed_from = counters["steps"]
    result.best_step, result.best_es = counters["best_step"], counters["best_es"]
    result.stopped_early, result.skipped_batches = counters["stopped_early"], counters["skipped_batches"]
    result.elapsed_s, result.history = counters["elapsed_s"], counters["history"]
    result.val_history = counters["val_history"]
    if "best" in counters:
        where = {"editor": EDITOR_PREFIX, "trainer": BEST_PREFIX}.get(counters["best"])
        best_state = None if where is None else {k[len(where):]: v for k, v in tensors.items() if k.startswith(where)}
    else:  # a checkpoint from before the best state was written in trainer.safetensors
        best_file = ckpt / "best.safetensors"
        best_state = load_file(str(best_file)) if best_file.is_file() else None
    return (rng_states if "rng_state" in rng_states else None), best_state, counters["bad_validations"]
