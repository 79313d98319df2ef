"""The output of an editor for one weight: grouped low-rank factors of the shift."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .._checks import all_finite, check_bool, check_fisher_keep, is_number
from ..devices import as_device
from ..ops.apply_shift import check_shiftable_weight


@dataclass
class GroupedEdit:
    """Δ_g = Σ_{t∈g} η̃_t μ̃_tᵀ for each group g, fused with `fusion`, applied as W + alpha·Δ.

    mu_t (T, in) and eta_t (T, out) are the transformed factors, contiguous by group
    (`offsets`, int32 (G+1,)); `fisher` (out, in) and `fisher_keep` mask the fused shift.
    `edit_group` (E,) is the group each edit was routed to; `aux_loss` the gate's balance loss.
    """

    mu_t: torch.Tensor
    eta_t: torch.Tensor
    offsets: torch.Tensor
    fusion: str
    alpha: torch.Tensor
    edit_group: torch.Tensor
    aux_loss: torch.Tensor
    fisher: torch.Tensor | None = None
    fisher_keep: float | None = None

    def __post_init__(self):
        # The class is exported and built by hand too: a float alpha raised AttributeError ('float'
        # object has no attribute 'detach') at apply_, a 2-vector a bare "only one element tensors"
        # ValueError, fisher without fisher_keep fisher_mask's "give exactly one of keep or
        # threshold", and fisher_keep without fisher was silently no mask (session 68).
        if is_number(self.alpha):  # a plain step size: the editors pass a (learned) 0-d tensor
            self.alpha = torch.tensor(float(self.alpha), device=self.mu_t.device)
        if not isinstance(self.alpha, torch.Tensor) or self.alpha.numel() != 1:
            got = tuple(self.alpha.shape) if isinstance(self.alpha, torch.Tensor) else type(self.alpha).__name__
            raise ValueError(f"alpha must be a number or a one-element tensor, got {got}")
        if (self.fisher is None) != (self.fisher_keep is None):
            raise ValueError("fisher and fisher_keep go together (the mask keeps the fisher_keep fraction of the "
                             f"shift's entries by fisher): got fisher={'None' if self.fisher is None else 'a tensor'}, "
                             f"fisher_keep={self.fisher_keep!r}")
        check_fisher_keep(self.fisher_keep)

    @property
    def n_groups(self) -> int:
        """The number of groups the edits were routed to (`offsets` has one more entry)."""
        return self.offsets.numel() - 1

    def __repr__(self) -> str:
        # Sizes and options, not values: the dataclass's repr printed the factors, the group per
        # edit and the o×i Fisher matrix as (summarised) tensors without their shapes, and no
        # number of groups, tokens or edits.
        shown = [f"groups={self.n_groups}", f"tokens={self.mu_t.shape[0]}", f"in_features={self.mu_t.shape[-1]}",
                 f"out_features={self.eta_t.shape[-1]}", f"edits={self.edit_group.numel()}", f"fusion={self.fusion!r}"]
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor) and not alpha.is_meta and alpha.numel() == 1:  # meta: no value
            shown.append(f"alpha={float(alpha.detach()):.4g}")
        if self.fisher is not None:
            shown.append(f"fisher_keep={self.fisher_keep}")
        shown.append(f"dtype={self.mu_t.dtype}, device={self.mu_t.device}")
        return f"GroupedEdit({', '.join(shown)})"

    def dense(self, device=None, masked: bool = True) -> torch.Tensor:
        """The fused (and Fisher-masked) shift Δ (out × in, fp32; fp64 for fp64 factors), without
        alpha: the shift `apply_` adds (times alpha).  Differentiable in mu_t and eta_t (the fusion's
        and the mask's backwards reach the selected and kept entries only).  Computed on `device`
        (default: the factors'), the factors and the Fisher matrix moved there (`.to` keeps the
        gradients); masked=False: without the Fisher mask (`apply_` masks inside `apply_shift_`)."""
        # Checked as ModelEditor's editor_device is: a bad one raised torch's RuntimeError unnamed.
        device = self.mu_t.device if device is None else as_device(device, "device")
        check_bool(masked, "masked")  # read for its truth, "False" masked (as lowrank_edited's masked)
        delta = ops.grouped_outer(self.eta_t.to(device), self.mu_t.to(device), self.offsets.to(device), self.fusion)
        if masked and self.fisher is not None:
            delta, _ = ops.fisher_mask(delta, self.fisher.to(device), keep=self.fisher_keep)
        return delta

    @torch.no_grad()
    def apply_(self, weight: torch.Tensor) -> torch.Tensor:
        """weight += alpha·(Δ ⊙ kept) in place; returns the previous values (for undo).

        Runs on weight's device: the editor may sit on another one (a model split across devices),
        so the factors (T rows, far fewer bytes than the o×i shift) and the Fisher matrix are moved
        there once and the fused shift, the mask and the update are computed beside the weight.
        On one device the moves are no-ops.  A non-finite shift, or a sum that overflows the
        weight's dtype, raises FloatingPointError with the weight as it was."""
        check_weight(weight, (self.eta_t.shape[1], self.mu_t.shape[1]))
        device = weight.device
        delta = self.dense(device, masked=False)  # no grad here: the mask is apply_shift_'s
        fisher = None if self.fisher is None else self.fisher.to(device)
        return apply_finite_shift_(weight, delta, float(self.alpha.detach()), fisher,
                                   self.fisher_keep if fisher is not None else None)

    def group_alpha(self) -> torch.Tensor:
        """alpha per group, for `lowrank_delta_linear` (differentiable)."""
        return self.alpha.reshape(1).expand(self.n_groups)


def apply_finite_shift_(weight, delta, alpha: float, fisher=None, keep=None) -> torch.Tensor:
    """`ops.apply_shift_` for an edit (SPEC: a failed edit leaves the model as it was): a
    non-finite shift or alpha raises FloatingPointError before the weight is written, and a sum
    that is not finite in the weight's dtype (an overflow) is undone before it raises.  A weight
    that held inf or NaN before is left to the caller."""
    if not math.isfinite(alpha) or not all_finite(delta):
        raise FloatingPointError("the editor's shift is not finite; the weight was not changed")
    previous = ops.apply_shift_(weight, delta, alpha, fisher, keep)
    try:
        overflowed = not all_finite(weight) and all_finite(previous)
    except BaseException:
        # The check failed (out of memory, a CUDA error it synchronised on) with the weight written:
        # `previous` is the caller's only way back and is lost once this raises, so it goes back here
        # (ModelEditor's note said every weight was restored while this one kept its shift).
        ops.undo_shift_(weight, previous)
        raise
    if overflowed:
        ops.undo_shift_(weight, previous)
        raise FloatingPointError(f"the shifted weight is not finite in {weight.dtype} (an overflow); "
                                 "the weight was restored")
    return previous


def check_weight(weight, shape: tuple) -> None:
    """The edited layer's (out, in) weight: checked here, not left to apply_shift_, whose message
    would name the shift it was given, and by GroupedEditor.apply_ before its forward runs, with
    every check apply_shift_ makes of the weight alone (dtype, an expanded view): found only by
    apply_shift_, they raised after the forward had updated the running norms and drawn the
    random groups."""
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        # GPT-2's Conv1D stores its weight in × out: its `.weight` is the transpose of what is edited.
        hint = (": the transpose; for a GPT-2 Conv1D, which stores in × out, pass "
                "capture.weight_out_in(module), its (out, in) view" if got == shape[::-1] else "")
        raise ValueError(f"weight must be the edited layer's (out, in) = {shape} weight, got {got}{hint}")
    check_shiftable_weight(weight)
    if weight.is_meta:
        # The shift is computed on weight's device: a meta one was refused as dense's `device`,
        # an argument the caller never gave.
        raise ValueError("weight must be on a device that computes (it is edited in place), got a meta tensor")
