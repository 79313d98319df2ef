"""Evaluate every editor's edited model in ONE forward pass (paper Eq. 18), forming no shift
(except for Fisher-masked edits, whose mask is not low-rank, and rows that see the fused shift
`apply()` adds, which is not low-rank for "sss", "max" or "ssm": see below).

Training N_g editors needs, for each edit e, the model's loss under the shift of the group that
edit was routed to.  Applying each group's dense o×i shift and running N_g forward passes costs
N_g passes and N_g·o·i memory per weight; instead, inside `lowrank_edited(...)` the edited modules
compute

    y_n = x_n Wᵀ + b + α_g (x_n μ̃ᵍᵀ) η̃ᵍ            (ops.lowrank_delta_linear)

for every token row n of a batch row whose group is g (−1: the unedited layer), so one pass over a
batch that holds every edit's rows evaluates all the edited models at once, and gradients flow
into μ̃, η̃ and α (the editor outputs) while the model's own weights stay frozen.

Which rows see which shift (`row_edit`, `row_sees_all`):
- A row with `row_edit[b] = e` sees the shift of the group that edit e was routed to, for each
  edited weight separately (editors of different shapes route on their own, so e may sit in
  group 2 of one weight's editor and group 0 of another's).  This is Eq. 18's per-group model.
- A row with `row_sees_all[b] = True` sees Σ_g α S_g, the "add" fusion of every group's shift
  (built as one extra group holding all the factors; with one group, group 0 itself).  That is
  exactly the shift `apply()` adds when fusion is "add" or there is one editor (MEND; ProEditor
  with `masked=True`, below).  For "sss" it equals the fused shift on every entry where the
  groups agree in sign (there P or N is the whole sum) and differs where they do not; "max" and
  "ssm" differ from it even where the groups agree: "max" keeps the one group of largest |S_g|
  there, and "ssm" is sss's shift divided by G, so an "ssm" editor's rows that see every group
  get up to G times the shift `apply()` adds.  The trainer uses it for locality (KL) rows by
  default (`TrainConfig.locality_rows="all"`), whose job is to keep the model *as it will be
  edited* close to the original.
- A row with `row_sees_fused[b] = True` sees exactly the shift `apply()` adds, whatever the fusion:
  α Δ, Δ the fused shift `GroupedEdit.dense` forms (`ops.grouped_outer` with the editor's fusion,
  then, for a Fisher-masked edit with `masked=True`, times the kept-entry mask of the per-group path
  below, the same `ops.fisher_mask` selection `apply_` makes), and
  computes x Wᵀ + b + x (α Δ)ᵀ.  Gradients reach μ̃, η̃ through the fusion's backward (the
  selected terms only: sss's larger side, max's winning group) and the mask's (kept entries), and
  α.  Cost per edited weight and pass that holds such rows: one o×i fused shift (and its
  gradient; formed once for the passes that share `lowrank_edited`'s `shared`), and one more
  dense product with those rows, as for the Fisher-masked dense path
  below.  For one group or fusion "add" it is the shift `row_sees_all` gives, up to rounding;
  for "sss", "max" and "ssm" it is the one the edited model will have, which `row_sees_all` is not.
  The trainer uses it for locality rows with `TrainConfig.locality_rows="fused"`.
- Any other row (`row_edit[b] = -1`) sees the unedited layer.

Fisher-masked edits (ProEditor, or any editor built with `fisher_keep`): the mask is not low-rank,
so with `masked=True` (what the trainer does by default, `TrainConfig.fisher_mask`) such a module
takes a dense path instead: each group's shift S_g = η̃ᵍᵀ μ̃ᵍ (o×i) is formed, multiplied by the
kept-entry mask of the edit's Fisher information (the same `ops.fisher_mask` selection `apply()`
uses; the mask is a constant, so gradients reach μ̃, η̃ through the kept entries only), and rows
compute x Wᵀ + b + α_g x (S_g ⊙ M)ᵀ.  Cost per edited weight and pass: one o×i selection, G (+1
for the rows that see every group) o×i matrices (the selection and matrices formed once for the
passes that share `lowrank_edited`'s `shared`) and their products with the rows, i.e. about as
much as a second dense linear layer per group: cheap for ProEditor (one group), memory-bound for
many groups of a big weight.  Rows that see every group get (Σ_g S_g) ⊙ M, exactly what `apply()`
adds for the "add" fusion (ProEditor's).  With `masked=False` the module sees the unmasked shift
through `ops.lowrank_delta_linear`.  The dense path runs in plain torch ops (no custom kernel): its
matmuls are ordinary GEMMs, on CPU and GPU alike.  Its masked shifts, every non-empty group's, are
formed when the block is entered (`masked_shifts`: the offsets are read on the host there, outside
whatever the model compiled), unless every row sees the fused shift; inside a compiled model each row
then runs against every group's shift and keeps its own (`dense_masked_linear`), and the fused rows'
split likewise (`_lowrank_forward`), so torch.compile traces the edited layers without a graph break.

Split models: each patched module computes on its own weight's device; the editor outputs (and
the Fisher mask) are moved there once when the block is entered, and `.to` carries the gradients
back to the editors' devices.

The patched forward flattens (B, ..., in) to rows and repeats each batch row's group over its
tokens; it works for nn.Linear and GPT-2's Conv1D (weight stored in×out: the op sees the
transposed view) and for encoder-decoder models (each module expands over its own sequence).
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch
from torch import nn

from . import ops
from ._checks import check_id_range, compute_dtype, ids_readable
from .capture import is_conv1d, no_activation_checkpointing, resolve_modules, weight_out_in
from .devices import check_resident
from .edit_handle import deferred_interrupt
from .editors.grouped_edit import GroupedEdit
from .patched_forwards import patched_forwards
from .reference.segments import segment_bounds


def group_factors(edit, row_edit: torch.Tensor, row_sees_all: torch.Tensor | None, device=None,
                  any_sees_all: bool | None = None):
    """(row_group (B,), mu_t, eta_t, offsets, alpha (G',)) of one weight's edit for these rows.

    `edit` is a GroupedEdit (mu_t, eta_t, offsets, edit_group, group_alpha()).  With rows that
    see every group, the factors gain one extra group (index G) holding all T tokens again; with
    one group (MEND, ProEditor) those rows see group 0 itself, whose shift is that sum: the op runs
    T tokens instead of 2T, and the masked dense path forms one o×i shift instead of two.
    Everything is returned on `device` (default: the edit's): the editor outputs are moved there
    before the extra group doubles them, and `.to` keeps them differentiable across devices.
    any_sees_all: whether any entry of row_sees_all is True, when the caller has read it (None:
    read here; `lowrank_edited` reads it once for all its layers).
    """
    device = edit.mu_t.device if device is None else device
    row_edit = row_edit.to(device)
    edit_group = edit.edit_group.to(device=device, dtype=torch.int64)
    # Row edit −1 reads the −1 appended last (no edits at all, E = 0, included).
    row_group = torch.cat([edit_group, edit_group.new_full((1,), -1)])[row_edit.long()]
    mu_t, eta_t, offsets, alpha = (t.to(device) for t in (edit.mu_t, edit.eta_t, edit.offsets, edit.group_alpha()))
    if any_sees_all is None:
        any_sees_all = row_sees_all is not None and bool(row_sees_all.any())
    if row_sees_all is not None and any_sees_all:
        G, T = edit.n_groups, mu_t.shape[0]
        if G > 1:  # the extra group G; with one group, group 0 is already the sum
            mu_t = torch.cat([mu_t, mu_t])
            eta_t = torch.cat([eta_t, eta_t])
            offsets = torch.cat([offsets, offsets.new_full((1,), 2 * T)])
            alpha = torch.cat([alpha, alpha[:1]])  # the same α: one weight, one step size
        row_group = torch.where(row_sees_all.to(device), torch.full_like(row_group, G if G > 1 else 0), row_group)
    return row_group, mu_t, eta_t, offsets, alpha


def _check_rows(edits: Mapping, row_edit, row_sees_all, row_sees_fused=None) -> tuple[bool, bool, bool]:
    """Check the rows' arguments; returns (whether any row sees every group, whether any row sees
    the fused shift, whether any row takes the per-group path: does not see the fused shift)."""
    if not isinstance(row_edit, torch.Tensor) or row_edit.dtype not in (torch.int32, torch.int64):
        raise ValueError("row_edit must be an int32 or int64 tensor")
    if row_edit.dim() != 1:
        raise ValueError(f"row_edit must be 1-D (one entry per batch row), got shape {tuple(row_edit.shape)}")
    for name, flags in (("row_sees_all", row_sees_all), ("row_sees_fused", row_sees_fused)):
        if flags is not None:
            if not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool:
                raise ValueError(f"{name} must be a bool tensor or None")
            if flags.shape != row_edit.shape:
                raise ValueError(f"{name} must have shape {tuple(row_edit.shape)}, got {tuple(flags.shape)}")
    for name, rows in (("row_edit", row_edit), ("row_sees_all", row_sees_all), ("row_sees_fused", row_sees_fused)):
        # Read on the host below: a meta one raised NotImplementedError ("Cannot copy out of meta
        # tensor") or RuntimeError ("Tensor.item() cannot be called on meta tensors").
        if rows is not None and rows.is_meta:
            raise ValueError(f"{name} must hold values (the rows are read on the host), got a meta tensor")
    # Every value the block reads, in one host read (a device sync on a GPU): whether any row sees
    # every group, the fused shift, or both (refused), and row_edit's range (check_ids' test, skipped
    # as it skips it: while torch.compile traces, or on a fake tensor).  Read apart, they were 3 reads
    # plus one per edited layer (`group_factors`) each time a block was entered: every pass of a
    # training step (13 passes a step of 125 CounterFact edits on the tiny Llama).
    reads = {}
    if row_sees_all is not None:
        reads["all"] = row_sees_all.any()
    if row_sees_fused is not None:
        reads["fused"] = row_sees_fused.any()
        reads["per_group"] = (~row_sees_fused).any()
        if row_sees_all is not None:
            reads["both"] = (row_sees_all & row_sees_fused.to(row_sees_all.device)).any()
    if ids_readable(row_edit):
        reads["lo"], reads["hi"] = row_edit.amin(), row_edit.amax()
    got = dict(zip(reads, torch.stack([t.to(row_edit.device, torch.int64) for t in reads.values()]).tolist())
               if reads else {})
    if got.get("both"):
        raise ValueError("a row cannot see both every group's sum (row_sees_all) and the fused shift (row_sees_fused)")
    n_edits = {int(e.edit_group.numel()) for e in edits.values()}
    if len(n_edits) > 1:
        raise ValueError(f"edits must all come from the same batch of edits, got edit counts {sorted(n_edits)}")
    E = n_edits.pop()
    if "lo" in got:
        check_id_range(got["lo"], got["hi"], "row_edit", -1, E - 1, f" (there are {E} edits)")
    any_all, any_fused, any_per_group = got.get("all", 0), got.get("fused", 0), got.get("per_group", 1)
    return bool(any_all), bool(any_fused), bool(any_per_group)


def kept_mask(edit, device=None) -> torch.Tensor:
    """The 0/1 (out×in) mask of the entries `apply()` keeps for this edit's Fisher information
    (`ops.fisher_mask` on a tensor of ones: the same selection, ties included), computed on `device`
    (default: the Fisher matrix's), where the weight is, as `apply()` does."""
    fisher = edit.fisher if device is None else edit.fisher.to(device)
    ones = torch.ones(fisher.shape, dtype=compute_dtype(edit.mu_t, edit.eta_t), device=fisher.device)
    mask, _ = ops.fisher_mask(ones, fisher, keep=edit.fisher_keep)
    return mask


def masked_shifts(mu_t, eta_t, offsets, mask, acc, formed=None) -> list:
    """[S_g ⊙ M per group g] (each o×i, in dtype `acc`; None for an empty group), S_g = Σ_{t∈g}
    η̃_t μ̃_tᵀ: the shifts a Fisher-masked edit's rows see (`dense_masked_linear`).  Formed when the
    block is entered, outside whatever the model compiled, as the offsets are read on the host.
    formed: None, or a dict {(g, acc): S_g ⊙ M} that this call fills and later calls with the same
    factors (`lowrank_edited`'s `shared`) read instead of forming S_g again."""
    shifts = []
    for g, (s, e) in enumerate(segment_bounds(offsets)):
        shift = None if formed is None else formed.get((g, acc))
        if shift is None and s != e:
            shift = (eta_t[s:e].to(acc).T @ mu_t[s:e].to(acc)) * mask.to(acc)  # (o, i): the masked S_g
            if formed is not None:
                formed[g, acc] = shift
        shifts.append(shift)
    return shifts


def dense_masked_linear(x, weight, bias, row_group, shifts, alpha):
    """`lowrank_delta_linear` with every group's shift masked: y_n = x_n Wᵀ + b + α_g x_n (S_g ⊙ M)ᵀ,
    shifts[g] = S_g ⊙ M (`masked_shifts`; None: an empty group, which no row sees).  Differentiable in
    x, the shifts and alpha; fp32 arithmetic (float64 kept: a float64 x with fp32 shifts computes in
    float64, the shifts formed in fp32), output in x's dtype like the op.

    Eagerly each group's product runs over its own rows (`nonzero`, a data-dependent shape).  While
    torch.compile traces, every row's product runs against every group's shift and keeps its own
    group's (`torch.where`): fullgraph refused the rows' selection (dynamo's UserError "Could not
    guard on data-dependent expression" in ProEditor's training), and without fullgraph the model
    graph-broke at each masked layer.  That is G' times the products' FLOPs for G' groups: the same
    for ProEditor's one group (its rows that see every group see group 0)."""
    acc = compute_dtype(x, weight, alpha, *(s for s in shifts if s is not None))
    xa = x.to(acc)
    y = xa @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    compiling = torch.compiler.is_compiling()
    for g, shift in enumerate(shifts):
        if shift is None:
            continue
        if compiling:
            sees = (row_group == g).unsqueeze(1)
            y = y + torch.where(sees, alpha[g].to(acc) * (xa @ shift.to(acc).T), 0.0)
            continue
        rows = (row_group == g).nonzero().squeeze(1)
        if rows.numel():
            y = y.index_add(0, rows, alpha[g].to(acc) * (xa[rows] @ shift.to(acc).T))
    return y.to(x.dtype if x.dtype != torch.float64 else acc)


def fused_linear(x, weight, bias, delta, alpha):
    """y = x Wᵀ + b + α x Δᵀ for rows that see the fused shift Δ (out×in, formed by
    `GroupedEdit.dense`): the layer `apply()` leaves, W + αΔ, without writing it.  Differentiable in
    x, Δ and α; fp32 arithmetic (float64 kept), output in x's dtype like the op."""
    acc = compute_dtype(x, weight, delta, alpha)
    xa = x.to(acc)
    y = xa @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    y = y + alpha.to(acc) * (xa @ delta.to(acc).T)
    return y.to(x.dtype)


# The patched forwards' tensors (row groups, editor outputs, masks), by id(module), for the length of a
# block.  A forward reads them here, not from its closure: torch.compile treats whatever it reaches
# through an nn.Linear (its patched forward's closure too) as fixed-size
# (torch._dynamo.config.force_nn_module_property_static_shapes), so a compiled model compiled once
# more for each new edit token count T and batch size (5 compiles for 5 calls on the tiny Llama,
# then its recompile limit and eager), never making them dynamic; read from this global, the
# second size compiles dynamically and later ones reuse it (tests/test_compile.py).
_ACTIVE: dict[int, tuple] = {}


@contextlib.contextmanager
def _active_states():
    """Yields `register(module, state)`, which puts `state` in `_ACTIVE[id(module)]` for the block; on
    exit each entry gets back what it had (a `lowrank_edited` entered inside another on the same module)."""
    registered: list[tuple[int, object]] = []

    def register(module: nn.Module, state: tuple) -> None:
        key = id(module)
        registered.append((key, _ACTIVE.get(key)))
        _ACTIVE[key] = state

    try:
        yield register
    finally:
        with deferred_interrupt():  # as patched_forwards: a Ctrl-C waits until every entry is back
            for key, previous in reversed(registered):
                if previous is None:
                    del _ACTIVE[key]
                else:
                    _ACTIVE[key] = previous


def _lowrank_forward(module: nn.Module, name: str):
    """The patched forward, its tensors `_ACTIVE[id(module)]`: (row_group, mu_t, eta_t, offsets, alpha,
    shifts, fused); shifts: None, or the masked shifts of a Fisher-masked edit's groups
    (`masked_shifts`, seen through `dense_masked_linear`); fused: None, or (row_sees_fused (B,), Δ, α)
    of the rows that see the fused shift (`fused_linear`), the other rows taking the per-group path, and
    whether every row sees it (the block read that once: then no row takes the per-group path)."""
    out_features, in_features = weight_out_in(module).shape
    key = id(module)

    def forward(x):
        # The module's weight of the moment (Conv1D: a transposed view, the op sees out×in), not the
        # one at the block's entry: chunked FT+KL swaps the module's Parameter for the saved weights
        # to recompute its KL reference (`ft_baseline.swapped_parameters`), and a weight held here
        # gave the fine-tuned model's log-probabilities as that reference.
        weight = weight_out_in(module)
        state = _ACTIVE.get(key)
        if state is None:  # a reference kept past the block: a closure, a hook, a reentrant checkpoint's recompute
            # Not the unedited layer's output: a recompute in a backward after the block would then
            # give wrong gradients silently (the hazard no_activation_checkpointing closes); this was a
            # bare KeyError (the module's id).
            raise RuntimeError(
                f"module {name!r}: the lowrank_edited block that patched its forward has ended; call "
                "that forward inside the block, or the module itself (the unedited layer) after it"
            )
        row_group, mu_t, eta_t, offsets, alpha, shifts, fused = state
        n_rows = row_group.shape[0]  # a size, not a Python int fixed when the block was entered
        # (rows, ..., in), or the rows' tokens flattened row-major, (rows·L, in), as OPT's decoder
        # layers call their MLP.  The 2-D form is taken as rows of equal length in batch order:
        # a model that flattened sequence-first or dropped padding would need its own layout,
        # and no Hugging Face causal LM tested (tests/test_architectures.py) does either.
        flattened = x.dim() == 2 and n_rows and x.shape[0] % n_rows == 0
        if x.dim() < 2 or (x.shape[0] != n_rows and not flattened) or x.shape[-1] != in_features:
            raise RuntimeError(
                f"module {name!r} ran on input of shape {tuple(x.shape)}, expected ({n_rows}, ..., "
                f"{in_features}) or ({n_rows}·L, {in_features}): lowrank_edited needs one row_edit "
                "entry per batch row"
            )
        # The layer's own device: a no-op when the caller's hooks already moved x (accelerate's
        # hook on this very module is bypassed while the forward is patched).
        flat = x.reshape(-1, in_features).to(weight.device)
        per_row = flat.shape[0] // n_rows if n_rows else 0
        groups = row_group.repeat_interleave(per_row) if per_row != 1 else row_group

        def per_group(x, groups):
            if shifts is not None:
                return dense_masked_linear(x, weight, module.bias, groups, shifts, alpha)
            return ops.lowrank_delta_linear(x, weight, module.bias, groups, mu_t, eta_t, offsets, alpha)

        if fused is None:
            y = per_group(flat, groups)
        else:  # the rows that see the fused shift, then the others, each put back in its place
            sees, delta, fused_alpha, all_fused = fused
            if all_fused:  # no per-group rows (a Fisher-masked edit's shifts were not formed for them)
                y = fused_linear(flat, weight, module.bias, delta, fused_alpha)
                return y.reshape(*x.shape[:-1], out_features)
            sees = sees.repeat_interleave(per_row) if per_row != 1 else sees
            if torch.compiler.is_compiling():
                # Every row both ways, each keeping its own: the rows' selection below has
                # data-dependent shapes, which fullgraph refuses and which graph-break the model
                # otherwise.  Twice the rows' products in this layer, compiled only.
                y_fused = fused_linear(flat, weight, module.bias, delta, fused_alpha)
                y = torch.where(sees.unsqueeze(1), y_fused, per_group(flat, groups))
                return y.reshape(*x.shape[:-1], out_features)
            rows, others = sees.nonzero().squeeze(1), (~sees).nonzero().squeeze(1)
            y_fused = fused_linear(flat[rows], weight, module.bias, delta, fused_alpha)
            y = y_fused.new_zeros(flat.shape[0], out_features).index_copy(0, rows, y_fused)
            if others.numel():
                y = y.index_copy(0, others, per_group(flat[others], groups[others]))
        return y.reshape(*x.shape[:-1], out_features)

    return forward


@contextlib.contextmanager
def lowrank_edited(
    model: nn.Module,
    edits: Mapping[str, GroupedEdit],
    row_edit: torch.Tensor,
    row_sees_all: torch.Tensor | None = None,
    masked: bool = False,
    row_sees_fused: torch.Tensor | None = None,
    shared: dict | None = None,
):
    """Inside the block, the named modules of `model` compute their edited outputs row by row.

    edits: {module name: GroupedEdit} (the editor outputs, differentiable); row_edit (B,) int:
    the edit whose group shift batch row b sees, −1 for the unedited layer; row_sees_all (B,)
    bool or None: rows that see the sum of every group's shift (see the module docstring);
    masked: edits that carry a Fisher mask (`edit.fisher`) are seen masked, through the dense path
    (see the module docstring); False: every shift unmasked; row_sees_fused (B,) bool or None:
    rows that see the fused shift `apply()` adds (masked as `masked` says; not rows of
    row_sees_all).  The modules' forwards are restored on exit, also when the block raises.

    shared: None, or a dict the caller passes to every block it enters with the same `edits` and
    `masked` (the passes of one training step, `length_buckets`, before their one backward): the
    o×i tensors that depend on the edits alone (the Fisher kept-entry masks, the masked per-group
    shifts, the fused shifts) are formed in the first block and reused by the others, and their
    gradients add up in the one backward (the same sums in another order: fp32 rounding).  On
    SmolLM2 (ProEditor, rank 32, 3 down_proj layers, 25 edits, CPU, 1 thread) each of a step's 4
    passes formed them again: 12 Fisher selections (12 ms each) and 12 masked shifts with their
    backwards; shared, the step's loss + backward took 3.11 s CPU against 3.31 s (medians of 4,
    alternated in one process).  The caller drops the dict with the step's graph: a stale shift
    must not outlive the editor outputs it was formed from.
    """
    if not isinstance(edits, Mapping) or not edits:
        raise ValueError("edits must be a non-empty mapping of module name to GroupedEdit")
    for name, edit in edits.items():  # another object raised AttributeError from deep inside
        if not isinstance(edit, GroupedEdit):
            raise ValueError(f"edits[{name!r}] must be a GroupedEdit, got {type(edit).__name__}")
    modules = resolve_modules(model, list(edits), arg="edits")
    # A layer offloaded by accelerate (its weight on "meta", e.g. cpu_offload after the ModelEditor was
    # built): the patched forward bypasses the hook that loads it, so it computed on the placeholder
    # and failed with "Tensor on device meta is not on the expected device cpu!".
    check_resident({name: weight_out_in(m) for name, m in modules.items()}, arg="edits")
    any_all, any_fused, any_per_group = _check_rows(edits, row_edit, row_sees_all, row_sees_fused)
    if not isinstance(masked, bool):
        raise ValueError(f"masked must be a bool, got {type(masked).__name__}")
    if shared is not None and not isinstance(shared, dict):  # else AttributeError, a layer already patched
        raise ValueError(f"shared must be a dict or None, got {type(shared).__name__}")
    # A checkpointed block would recompute its forward in the caller's backward, after the
    # patched forwards are gone: the forward inside the block runs without checkpointing.
    with no_activation_checkpointing(model), _active_states() as register, patched_forwards() as patch:
        for name, module in modules.items():
            edit = edits[name]
            o, i = weight_out_in(module).shape
            if edit.mu_t.shape[1] != i or edit.eta_t.shape[1] != o:
                raise ValueError(
                    f"edits[{name!r}] has factors for a weight of shape {edit.eta_t.shape[1]}x{edit.mu_t.shape[1]}, "
                    f"the module's is {o}x{i}" + (" (Conv1D, seen out×in)" if is_conv1d(module) else "")
                )
            device = weight_out_in(module).device  # each layer computes on its own device
            factors = group_factors(edit, row_edit, row_sees_all, device, any_sees_all=any_all)
            # What depends on the edit alone, per weight: formed once per `shared` (else per block).
            formed = {} if shared is None else shared.setdefault((name, id(edit), str(device)), {})
            mask = None
            if masked and getattr(edit, "fisher", None) is not None:
                if "mask" not in formed:
                    formed["mask"] = kept_mask(edit, device)
                mask = formed["mask"]
            fused = None
            if any_fused:  # one o×i fused shift per weight (and `shared` or block), built as apply() builds it
                if "fused" not in formed:
                    delta = edit.dense(device, masked=False)
                    if mask is not None:  # the Fisher selection made once, above, for both paths
                        delta = delta * mask.to(delta.dtype)
                    formed["fused"] = delta
                fused = (row_sees_fused.to(device), formed["fused"], edit.alpha.to(device), not any_per_group)
            shifts = None
            if mask is not None and any_per_group:  # every group's masked shift, formed here (eagerly)
                _, mu_t, eta_t, offsets, alpha = factors
                acc = compute_dtype(weight_out_in(module), mu_t, eta_t, alpha)
                shifts = masked_shifts(mu_t, eta_t, offsets, mask, acc, formed.setdefault("shifts", {}))
            register(module, (*factors, shifts, fused))
            patch(module, _lowrank_forward(module, name))
        yield
