"""Logits at the scored positions only.

The edit loss reads the logits of the few positions that predict target tokens (two or three per
edit), while a language model's head computes all B·L·V of them, then autograd keeps them and
indexing them builds a zero-filled B·L·V gradient.  `logits_at` makes the head see only the hidden
states at the scored positions, so the logits are (1, n, V) from the start: n·V instead of B·L·V
in the forward and in the backward (on SmolLM2, 500 CounterFact edits: 7 of the batch's 20
positions are scored, V = 49152).  Where a backward runs on the CPU, n < 4 rows are padded with zero
rows to 4 (`MIN_HEAD_ROWS`: MKL's fp32 matmuls of 1-3 rows sum less accurately), and `pick` drops them.

It works through a forward pre-hook on `model.get_output_embeddings()`, which gathers the rows of
the head's input; what a model does to the logits after its head (a bias, soft-capping) is
elementwise and does not see the difference.  The gather is skipped, and the full logits used,
where it cannot be done exactly: no output embedding module, a head whose input is not (B, L, ·)
with the positions' (B, L), a head that is itself being edited or captured (its hooks expect
the full sequence) or has forward or backward hooks of the caller's (they get its output or its
gradient), or hooks on a module inside it (they run on the rows), a head that runs
compiled (`compiled_calls.runs_compiled`), or inside `full_logits()` (the comparison form, for tests
and benchmarks).
`Scored.pick(logits)` returns the (n, V) scored logits either way.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable

import torch
from torch import nn

from ._thread_flag import ThreadFlag
from .compiled_calls import runs_compiled
from .edit_handle import deferred_interrupt
from .head_input import called_head, output_head
from .tokenize import IGNORE_INDEX

_FULL = ThreadFlag()

# The head's backward, grad_logits (n, V) @ W (V, H), runs as a (n, V) x (V, H) matmul: on this
# CPU torch (MKL 2024.2, fp32) a matmul of 1 to 3 rows takes a kernel whose V-term sums are far less
# accurate than its 4-row-and-up one (random W (49,152, 24 to 576): 4.7-6.2e-6 relative error per
# row against 5.1-7.5e-7; SmolLM2's head: 5.1-6.6e-5 against 6.1e-7-1.0e-6), so a capture chunk of
# 1-3 scored positions (every one-edit apply of a one- or two-token target) got an η 2-8x further
# from float64 than a full-logits pass (SmolLM2, one-edit captures of 8 CounterFact edits: median
# 4.8e-5 / 1.2e-4 for layers 5 k_proj / 29 down_proj; padded, 2.1e-5 / 1.5e-5, bit for bit HF's own
# loss's; capture_batch_size=1 on those 8: 1.35e-4 / 1.43e-4, padded 1.9e-5 / 2.2e-5).  Zero rows pad
# such a gather to 4 on the CPU where the rows carry a gradient: their logits are never picked, so they get no
# gradient.  The cost is that of MKL's 4-row kernels, also in the forward: a one-edit MEND apply + undo
# of SmolLM2's layers 27-29 (1 thread, 20 CounterFact edits) took 150 ms against 137 ms unpadded.
MIN_HEAD_ROWS = 4


def padded_head_rows(rows: torch.Tensor) -> torch.Tensor:
    """(n, H) rows as the head is to get them: with zero rows appended up to MIN_HEAD_ROWS where
    1 <= n < MIN_HEAD_ROWS, the rows carry a gradient (a backward will run through the head) and lie
    on the CPU, whose MKL kernels the pad is for (unmeasured on a GPU: left as it was); else as they
    are.  The head's first n output rows are the n rows'."""
    n = rows.shape[0]
    if not (0 < n < MIN_HEAD_ROWS and rows.requires_grad and rows.device.type == "cpu"):
        return rows
    return torch.cat([rows, rows.new_zeros(MIN_HEAD_ROWS - n, *rows.shape[1:])])


def full_logits():
    """Inside the block (this thread), `logits_at` gathers nothing: the head computes every
    position's logits, as a plain forward does."""
    return _FULL.on()


def scored_positions(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, L) bool: the positions whose logits are scored against a label.  A causal LM predicts
    label t at position t−1; an encoder-decoder's decoder predicts label t at position t."""
    if not causal:
        return labels != IGNORE_INDEX
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


class Scored:
    """What `logits_at` did: `gathered` is True when the head saw the scored positions only; with
    rows_only, `rows` holds the head's input at the positions, (n, H), and the head saw none."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions
        self.gathered = False
        self.rows = None
        self.head_output = None
        self.head_output_version = None
        self.n = None  # gathered: the number of scored rows (the head may see zero rows after them)

    def rows_give_logits(self, logits: torch.Tensor) -> bool:
        """Whether `rows` were gathered and the model's `logits` are its head's output as it is: the
        very tensor (soft-capping, scaling or an upcast after the head make another one), unchanged
        in place since the head returned it (Chameleon masks its image tokens' logits in place).
        Then the logits at the positions are the head's of `rows`."""
        if self.rows is None or self.head_output is None or logits is not self.head_output:
            return False
        try:
            return logits._version == self.head_output_version
        except RuntimeError:  # an inference tensor keeps no version: an in-place change would go unseen
            return False

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V): the logits at the positions, in row-major order, from the model's output."""
        if self.gathered:  # the first n rows: a gather of fewer than MIN_HEAD_ROWS is padded after them
            return logits.reshape(-1, logits.shape[-1])[: self.n]
        return logits[self.positions.to(logits.device)]


def _own(hook):
    """Marks a hook of this module's: `logits_at` gathers past it (it changes no output)."""
    hook._dcedit_scored_logits = True
    return hook


# torch's module tracker (torch.utils.module_tracker: FlopCounterMode, the memory trackers) registers
# global hooks that record which module runs and return None: they change no output or gradient, and
# refusing the gather for them made FlopCounterMode turn every scored pass into a full-logits one.
_INERT_GLOBAL_HOOK_MODULES = ("torch.utils.module_tracker",)


def _callers_global_hooks() -> bool:
    """Whether a global module hook other than torch's module tracker's is registered."""
    glob = nn.modules.module
    hooks = (*glob._global_forward_hooks.values(), *glob._global_forward_pre_hooks.values(),
             *glob._global_backward_hooks.values(), *glob._global_backward_pre_hooks.values())
    return any(getattr(h, "__module__", None) not in _INERT_GLOBAL_HOOK_MODULES for h in hooks)


def _foreign_hooks(head: nn.Module) -> bool:
    """Whether a hook of the caller's would see the gathered rows instead of the full sequence: a
    forward hook on the head (it gets the head's output), a backward hook on it (its gradients), any
    forward, pre- or backward hook on a module inside the head (it runs on the rows), or a global
    one (it runs on every module; torch's module tracker's excepted).  A hook on a submodule that
    scaled its output by position put the scored logits 0.85 off a plain forward's (a tiny Llama
    whose head is nn.Sequential(lm_head)).  The head's own pre-hooks run before the gather, on the
    full input."""
    if any(not getattr(h, "_dcedit_scored_logits", False) for h in head._forward_hooks.values()):
        return True
    if head._backward_hooks or head._backward_pre_hooks:
        return True
    # Global hooks (register_module_forward_hook and kin) run on every module, the head's output and
    # what runs inside it included: a position-scaling global forward hook scaled the gathered rows.
    if _callers_global_hooks():
        return True
    return any(sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks
               for sub in head.modules() if sub is not head)


def _gathering_head(model: nn.Module, skip: Iterable[nn.Module]) -> nn.Module | None:
    """The head `logits_at` gathers the input of, or None: none inside `full_logits()`, nor a head
    among `skip`, with a hook of the caller's that would see the rows (`_foreign_hooks`) or running
    compiled."""
    head = output_head(model) if not _FULL else None
    # A forward hook on the head (the caller's: an edited or captured head is in `skip`) gets the
    # head's output: gathered, a hook that reads positions changed other logits than in a plain forward.
    # A compiled head (or one inside a compiled module) runs without the gather unless compiled code
    # runs eagerly meanwhile (the capture's block): dynamo does not guard on hooks, so whether the hook
    # ran depended on the compile history (a tiny LM compiled and run before the block: not gathered,
    # nor by a second torch.compile of it; compiled fresh per test: gathered), and under fullgraph=True
    # the hook raised Unsupported (FT and FT+KL `apply`, `fit` and `measure_edit` on the tiny GPT-2 and
    # Llama).  The full logits cost B·L·V instead of n·V, as in the model's own forward.
    if head is None or any(head is m for m in skip) or _foreign_hooks(head) or runs_compiled(model, head):
        return None
    return head


def rows_head(model: nn.Module, skip: Iterable[nn.Module] = ()) -> nn.Module | None:
    """The model's head when `logits_at(..., rows_only=True)` can keep its input rows and the logits
    can be computed from them by calling the head: a head `logits_at` gathers at, called as one
    module (`head_input.called_head`).  Whether the model's logits are the head's output is known
    after a pass only (`Scored.rows_give_logits`)."""
    # A global forward hook (torch.nn.modules.module.register_module_forward_hook) would change the
    # head's output in the pass after `logits_at` records it, and no call of the head's forward on
    # the rows would run it (a scaling one put the rows path's loss 1 % off the logits path's): no
    # head gathers under a caller's one (`_foreign_hooks`; torch's module tracker's change nothing).
    head = _gathering_head(model, skip)
    if head is None or head is not called_head(model):
        return None
    return head


@contextlib.contextmanager
def logits_at(model: nn.Module, positions: torch.Tensor, skip: Iterable[nn.Module] = (), enabled: bool = True,
              rows_only: bool = False):
    """Inside the block, the model's head computes logits at `positions` ((B, L) bool) only (and at
    zero rows after them up to MIN_HEAD_ROWS where a backward runs on the CPU); yields the `Scored`
    whose `pick` gives them.  `skip`: modules (edited or captured layers) that must see
    full sequences: if the head is one of them, nothing is gathered; nor with enabled=False.
    rows_only=True: where the head's input is gathered, the head computes no logits (it is given
    none of the rows) and `Scored.rows` keeps its input at the positions, (n, H), from which
    `head_kl_function.head_logits` gives the logits where `Scored.rows_give_logits(model_logits)`.
    Only the forwards of the thread inside the block are gathered (another may score the model meanwhile).
    ValueError unless `positions` is a 2-D bool tensor: 0/1 ints would index rows, not mask them
    (a (B, L) int mask of 40 scored positions picked B·L·L rows)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool or positions.dim() != 2:
        what = (f"{positions.dtype} of shape {tuple(positions.shape)}" if isinstance(positions, torch.Tensor)
                else type(positions).__name__)
        raise ValueError(f"positions must be a (B, L) bool tensor, got {what}")
    scored = Scored(positions)
    head = _gathering_head(model, skip) if enabled else None
    if head is None:
        yield scored
        return

    # The hook sits on a module other threads may run too (one model scored by several threads):
    # it gathers only the forwards of the thread inside this block.  Another thread's pass of the
    # same (B, L) was cut to this block's positions, and its own pick raised IndexError.  Not
    # traced by torch.compile, whose graph broke in the hook before (at the boolean gather) and
    # which warns that it cannot trace `get_ident`.
    thread = threading.get_ident()

    @torch.compiler.disable
    def gather(module, args, kwargs=None):
        if threading.get_ident() != thread or not args or not isinstance(args[0], torch.Tensor):
            return None
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(positions.shape):
            return None
        if rows_only and (len(args) > 1 or kwargs):
            # More arguments for the head than its input (a pre-hook's, a custom forward's): the
            # head's forward on the rows would not get them; not gathered, so the pass's logits are
            # the full ones and `rows_give_logits` is False.
            return None
        scored.gathered = True
        rows = hidden[positions.to(hidden.device)]
        scored.n = rows.shape[0]
        if rows_only:
            scored.rows, rows = rows, rows[:0]
            return (rows.unsqueeze(0),), kwargs
        # Padded where a backward will run through the head (scoring passes run none: no cost there).
        return (padded_head_rows(rows).unsqueeze(0),) + tuple(args[1:])

    @_own
    @torch.compiler.disable
    def record(module, args, output):
        if threading.get_ident() == thread and scored.gathered:
            scored.head_output = output
            try:
                scored.head_output_version = output._version
            except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor
                scored.head_output_version = None

    # A Ctrl-C meanwhile waits until the handle is kept, and on exit until the hook is off: one landing
    # in between left the gather on the head, and every later forward of this (B, L) was cut to the
    # positions (as block_prefix.record's hooks).
    handles = []
    try:
        with deferred_interrupt():
            # After the caller's pre-hooks, which see the full input as in a plain forward (a hook that
            # reads positions); rows_only's rows are then what the head's forward is given, and
            # `head_kl_function.head_logits` calls that forward on them without the hooks.
            handles.append(head.register_forward_pre_hook(gather, with_kwargs=rows_only))
            if rows_only:
                handles.append(head.register_forward_hook(record))
        yield scored
    finally:
        with deferred_interrupt():
            for handle in handles:
                handle.remove()
