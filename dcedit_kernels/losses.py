"""The losses and accuracies of editing, from the logits at the scored positions.

`picked` is always the (n, V) logits at `scored_logits.scored_positions(labels, causal)` in
row-major order (the LM head computes only those, see `scored_logits.py`); `target_nll` takes the
full (B, L, V) logits instead.  Everything is computed in fp32 (float64 kept), on the logits'
device, with labels and masks moved there.
"""

from __future__ import annotations

import torch
from torch import nn

from .picked_kl_function import PickedKLRows, kl_rows, upcast
from .scored_logits import logits_at, scored_positions
from .tokenize import IGNORE_INDEX

LOSS_REDUCTIONS = ("edit", "token")
# "token" by measurement (RESULTS.md): on CounterFact with SmolLM2, editors trained on batches of
# 25 under "edit" reached LMP -0.34/-0.68/-0.78 at N_u = 25/75/125 against -0.32/-0.10/-0.15
# under "token": "edit" keeps every edit at full strength, so the fused shift grows with N_u and
# drawdown with it (DD 0.91 at 125).  It is also MEND's and EasyEdit's loss.
DEFAULT_LOSS_REDUCTION = "token"


def backward_scale(n_scored: int) -> float:
    """The largest power of two ≤ `n_scored`, the number of target tokens a batch-mean loss divides
    by.  Backpropagating loss × this scale makes the activations' gradients those of the per-token
    sum to within a factor of 2, so they stay inside fp16's range: under the mean, fp16 flushed
    them to zero as the batch grew.  SmolLM2 in fp16, 125 CounterFact edits, block 28's down_proj
    (median |η| 5e-7 in fp32; fp16's smallest normal is 6.1e-5): 16.3 % of η zero against fp32's
    10.8 % and the layer's gradient 5.8e-2 off fp32's unscaled; 10.8 % and 3.3e-3 scaled (5 edits:
    5.5e-3 and 5.3e-3).  A backward pass is linear in its incoming gradient, and scaling by a power
    of two commutes with rounding, so dividing the result by the scale gives, bit for bit, the
    unscaled gradients wherever those neither underflow nor overflow: fp32, bf16 and fp64 results
    are unchanged."""
    return float(1 << max(int(n_scored).bit_length() - 1, 0))


def unscale(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """`grad` / `scale`: an fp16 gradient as a new fp32 tensor, whatever the scale (divided in fp16
    it would underflow again), any other divided in place."""
    if grad.dtype == torch.float16:
        return grad.float().div_(scale)
    return grad.div_(scale) if scale != 1 else grad


def _scored_labels(picked: torch.Tensor, labels: torch.Tensor, causal: bool):
    """(the label tokens `picked`'s rows are scored against, in row-major order; the (B, ·) mask of
    the label positions), on the logits' device.  Causal LMs predict label t at position t−1."""
    labels = labels.to(picked.device)
    if causal:
        labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return labels[mask], mask


def _row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sums of `values`, one per True entry of `mask` (B, ·) in row-major order, by row."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def scored_nll(picked: torch.Tensor, labels: torch.Tensor, causal: bool, reduction: str = "mean"):
    """NLL of the label tokens from `picked` (n, V), the logits at `scored_positions(labels,
    causal)` in row-major order: mean over all label tokens ("mean"), or per row ("row": (B,) sums
    and counts returned as a pair).  Labels move to the logits' device (a split model's LM head
    may sit elsewhere than its inputs; a no-op otherwise)."""
    if reduction not in ("mean", "row"):
        raise ValueError(f"reduction must be 'mean' or 'row', got {reduction!r}")
    gold, mask = _scored_labels(picked, labels, causal)
    nll = torch.nn.functional.cross_entropy(upcast(picked), gold, reduction="none")
    if reduction == "mean":
        return nll.sum() / mask.sum().clamp(min=1)
    return _row_sums(nll, mask), mask.sum(1)


def target_nll(logits: torch.Tensor, labels: torch.Tensor, causal: bool, reduction: str = "mean"):
    """`scored_nll` from the full (B, L, V) logits.  Causal LMs predict label t at position t−1;
    only the scored positions reach log_softmax (vocabularies are big)."""
    labels = labels.to(logits.device)
    return scored_nll(logits[scored_positions(labels, causal)], labels, causal, reduction)


def edit_loss(picked: torch.Tensor, labels: torch.Tensor, causal: bool, reduction: str = DEFAULT_LOSS_REDUCTION,
              n_scored: int | None = None):
    """The loss the capture backpropagates (see `loss_reduction` in `model_editor`'s docstring), from the
    scored logits `picked` (as `scored_nll`'s).

    "edit": Σ_e (mean NLL of edit e's target tokens), so the gradient reaching edit e's tokens does
    not depend on the other rows; "token": the mean over every target token of the batch (MEND).
    `n_scored`: the whole batch's number of target tokens when these rows are one chunk of it
    ("token" then gives the chunk's share of the batch mean; the chunks' losses sum to it).
    """
    if reduction == "token":
        if n_scored is None:
            return scored_nll(picked, labels, causal)
        sums, _ = scored_nll(picked, labels, causal, reduction="row")
        return sums.sum() / max(n_scored, 1)
    if reduction != "edit":
        raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    sums, counts = scored_nll(picked, labels, causal, reduction="row")
    return (sums / counts.clamp(min=1)).sum()


@torch.no_grad()
def log_probs_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 skip=(), **forward_kwargs) -> torch.Tensor:
    """(n, V) fp32 log-probabilities of the model (as it is now, no grad) at `positions` (B, L)
    bool, row-major: the KL's reference, the LM head computing those positions only.
    forward_kwargs: more arguments for the model's forward (e.g. use_cache=False)."""
    with logits_at(model, positions, skip=skip) as scored:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
        return torch.log_softmax(upcast(scored.pick(logits)), -1)


def picked_kl(base_logp: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Mean over n positions of KL(p_base ‖ p_edited) from the edited logits there, `picked`
    (n, V); `base_logp` holds the base model's log-probabilities at the same positions (n, V).
    Computed on the logits' device, in fp32 (float64 kept).  The backward saves the two inputs
    only (`picked_kl_function`: autograd through the formula held 3.25 more (n, V) tensors)."""
    if base_logp.shape != picked.shape:
        raise ValueError(f"base_logp must have picked's shape {tuple(picked.shape)}, got {tuple(base_logp.shape)}")
    if picked.dim() == 0:
        raise ValueError("picked must be (n, V) logits, got a 0-d tensor")
    base_logp = base_logp.to(picked.device)
    if picked.dim() != 2:  # (..., V): every leading index is a position, as the formula took them
        base_logp, picked = base_logp.reshape(-1, picked.shape[-1]), picked.reshape(-1, picked.shape[-1])
    if not picked.shape[0]:
        return upcast(picked).new_zeros(())
    if torch.is_grad_enabled() and (picked.requires_grad or base_logp.requires_grad):
        kl = PickedKLRows.apply(base_logp, picked)
    else:
        kl = kl_rows(base_logp, picked)
    return kl.mean()


def scored_accuracy(picked: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B,) share of each row's target tokens predicted by argmax (teacher forced), from `picked`
    (n, V), the logits at `scored_positions(labels, causal)` in row-major order (as `scored_nll`'s);
    on the logits' device."""
    gold, mask = _scored_labels(picked, labels, causal)
    if picked.dim() != 2 or picked.shape[0] != gold.shape[0]:
        raise ValueError(f"picked must be (n, V) with n = {gold.shape[0]} scored positions, got {tuple(picked.shape)}")
    hits = _row_sums((picked.argmax(-1) == gold).float(), mask)
    return hits / mask.sum(1).clamp(min=1).float()
