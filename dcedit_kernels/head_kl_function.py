"""The training KL from the LM head's input rows, holding no (n, V) tensor.

KL_i = KL(p_base ‖ p_edited) at locality position i (`picked_kl_function`), where both
distributions are the head's logits of a row of the head's input: the unedited model's `base_rows`
(n, H) and the edited pass's `rows` (n, H).  That holds where the model's logits are its head's
output as it is (`scored_logits.Scored.rows_give_logits`: no soft-capping or scaling after the
head), and there each row's KL and its gradient depend on that row only, so they are computed a
block of rows at a time (`row_blocks`): the block's base and edited logits, its KL and dKL/drows
through the head, then the block is dropped.  The gradient is computed in the forward (a training
loss is always backpropagated: the head runs twice per row, as the forward and backward of the
logits path did, plus once for the base rows) and saved, (n, H); the backward scales it by the
rows' output gradients.

An in-place change of the logits after the head is seen through the tensor's version counter,
except a write that bypasses it (through `.data`, or a custom kernel writing the memory): such a
model needs the logits path, which a test can force with `_LOGITS_AFTER_HEAD[model] = True`.

The logits path held (n, V) tensors from the reference pass to the backward: the base
log-probabilities, the edited logits saved for the KL's backward, their gradient and its `cat`
with the edit rows' (4 of them at the backward's peak; at batch 128 on SmolLM2, n ≈ 1,100
locality positions × V = 49,152 in fp32: 206 MiB each).
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn

from .picked_kl_function import grad_of_logits, kl_of_block, row_blocks, upcast
from .scored_logits import Scored, logits_at, padded_head_rows, rows_head

# Models whose logits turned out not to be their head's output (Gemma 2's soft-capping, an upcast of
# 16-bit logits in the forward): their KL is taken from the logits from then on.
_LOGITS_AFTER_HEAD = weakref.WeakKeyDictionary()


class LogitsAfterHead(Exception):
    """A pass's logits were not its head's output as it is (`Scored.rows_give_logits`), or its head's
    input was not gathered: the KL is to be taken from the logits instead."""


def kl_head(model: nn.Module, skip: Iterable[nn.Module] = (), trained: Iterable[torch.Tensor] = ()) -> nn.Module | None:
    """The head to take a KL from the head's input rows with (`rows_head`), or None: not for a model
    known to change its logits after the head, nor when a head parameter is trained or shares
    memory with a weight in `trained` (the base rows' logits are computed again at each use, by the
    head as it is then, and the head gets no gradient here)."""
    head = rows_head(model, skip)
    if head is None or model in _LOGITS_AFTER_HEAD:
        return None
    memory = {w.untyped_storage().data_ptr() for w in trained}
    if any(p.requires_grad or p.untyped_storage().data_ptr() in memory for p in head.parameters()):
        return None
    return head


def rows_of(scored: Scored, logits: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The head's input rows `scored` kept, when they give the pass's `logits`; else LogitsAfterHead,
    with the model remembered as one whose KL is taken from the logits."""
    if not scored.rows_give_logits(logits):
        _LOGITS_AFTER_HEAD[model] = True
        # Caught where it is the first pass (the loss is then taken from the logits); raised from a later
        # one only, whose forward gave the head's output before: what failed can run again.
        raise LogitsAfterHead("the model's logits were not its head's output as it is in this pass, though they were "
                              "in the first one; its KL is taken from the logits from now on: run it again")
    return scored.rows


def head_rows_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 skip: Iterable[nn.Module] = (), **forward_kwargs) -> torch.Tensor:
    """(n, H): the head's input at `positions` (B, L) bool, row-major, from a no-grad pass of the
    model as it is in which the head computes no logits: the KL's reference, as `losses.log_probs_at`
    is the logits path's.  LogitsAfterHead (the model remembered) where its logits are not the head's
    output (`rows_of`).  forward_kwargs: more arguments for the model's forward (use_cache=False)."""
    with torch.no_grad(), logits_at(model, positions, skip, rows_only=True) as scored:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    return rows_of(scored, logits, model)


# A block's rows go through the head's matmuls, which lose speed on few rows: one thread, H 576,
# V 49,152, the forward and gradient matmuls of 42 / 85 / 170 / 290 rows ran at 56-72 / 68-84 / 80-94 /
# 77-98 GFLOP/s, and head_kl of 290 rows took 0.95-1.18 s in blocks of 42 (picked_kl_function's
# budget), 0.80-1.0 s in blocks of 85, against 0.74-0.79 s for the logits path's three whole matmuls.
# Twice the KL's budget (16 MiB per fp32 block tensor at 85 rows, about 7 of them alive) and at least
# 64 rows (a 128K vocabulary's blocks: 32 MiB each).
HEAD_ROWS_BUDGET = 1 << 22
HEAD_MIN_ROWS = 64


def head_logits(head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(n, V): the head's logits of (n, H) rows kept by `logits_at(..., rows_only=True)`, from its
    forward on them as that gather gives them, (1, n, H).  The forward itself, not the module call:
    the rows were gathered after the caller's pre-hooks on the head had run on the pass's full input
    (a hook that moves it to the head's device, one that scales it by position), and running them
    again on the rows would apply them twice, or at other positions (rows path 2.4-5.4e-2 off a
    float64 FT+KL loop under a position-scaling pre-hook, when the gather came first).  accelerate's
    device hooks wrap the forward and run with it."""
    return head.forward(rows.unsqueeze(0)).squeeze(0)


def _vocab(head: nn.Module, rows: torch.Tensor) -> int:
    """The head's number of logits, read from the module where it says (an nn.Linear's
    out_features), else from its output for one row."""
    width = getattr(head, "out_features", None)
    if isinstance(width, int) and width > 0:
        return width
    with torch.no_grad():
        return head_logits(head, rows[:1]).shape[-1]


class HeadKLRows(torch.autograd.Function):
    """(n,) KL_i of the head's logits of `base_rows` and `rows`, differentiable in `rows` only (the
    head's own parameters get no gradient: training freezes them)."""

    @staticmethod
    def forward(ctx, rows, base_rows, head):
        n = rows.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(rows) if want_grad else None
        kl = None
        for b in row_blocks(n, _vocab(head, rows) if n else 1, HEAD_ROWS_BUDGET, HEAD_MIN_ROWS):
            base = torch.log_softmax(upcast(head_logits(head, base_rows[b])), -1)
            with torch.enable_grad():
                leaf = rows[b].detach().requires_grad_(want_grad)
                # A last block of 1-3 rows padded to 4 on the CPU when a backward runs: the head's
                # backward on it was a less accurate matmul kernel (scored_logits.MIN_HEAD_ROWS); the
                # pad rows' logits are dropped here.
                z = head_logits(head, padded_head_rows(leaf))[: leaf.shape[0]]
            post = torch.log_softmax(upcast(z.detach()), -1)
            p = base.exp()  # base and post are both upcast: one dtype, as PickedKLRows's p and post
            block = kl_of_block(base, post, p)
            if kl is None:
                kl = block.new_empty(n)
            kl[b] = block
            if want_grad:
                del base
                grad[b], = torch.autograd.grad(z, leaf, grad_of_logits(p, post, in_place=True).to(z.dtype))
            del z, post, p, leaf
        if kl is None:  # no rows
            kl = upcast(rows).new_empty(0)
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        grad, = ctx.saved_tensors
        if grad is None:
            return None, None, None
        return grad * g.to(grad.dtype).unsqueeze(-1), None, None


def head_kl(base_rows: torch.Tensor, rows: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Mean over the n rows of KL(p_base ‖ p_edited), the distributions being the head's of
    `base_rows` and of `rows` (both (n, H), on the head's device); in fp32 (float64 kept), 0 for no
    rows.  Equal to `losses.picked_kl(log_softmax(head(base_rows)), head(rows))` where the model's
    logits are the head's output (`scored_logits.Scored.rows_give_logits`)."""
    if base_rows.shape != rows.shape or rows.dim() != 2:
        raise ValueError(f"base_rows and rows must be (n, H) of one shape, got {tuple(base_rows.shape)} "
                         f"and {tuple(rows.shape)}")
    if torch.is_grad_enabled() and rows.requires_grad:
        kl = HeadKLRows.apply(rows, base_rows.detach(), head)
    else:  # detached: the forward computes no gradient nobody takes
        with torch.no_grad():
            kl = HeadKLRows.apply(rows.detach(), base_rows.detach(), head)
    return kl.mean() if kl.numel() else kl.new_zeros(())
