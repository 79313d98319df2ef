"""The input of a language model's head, recorded during a forward.

MoEditor's gate reads each edit's features: the mean over its prompt tokens of the model's last
hidden state.  `out.hidden_states[-1]` is that state on most families (transformers ties it to the
normed `last_hidden_state`; checked equal to the head's input, bit for bit, on GPT-2, Llama, Qwen2,
Gemma 2, GPT-NeoX, OPT with and without `project_out`, Phi, Falcon, GPT-J, BLOOM, RWKV, Mamba,
Cohere and Granite), but Gemma 3n's is its last block's output, four AltUp streams
(streams, B, L, H) that it only merges afterwards.  The head's input is the state the logits are
read from on every family, and recording it with a hook also spares the forward from returning
every block's hidden states.  A sweep of the 196 causal-LM families of transformers 5.24 (tiny
random models) found the two bit-identical on 168; where they differ, the head's input is the
state after a head transform (BERT-like decoders, MiniCPM3's scaling) or a merge (Gemma 3n).
A model without an output head, or whose head is not called as one module (MusicGen's list of
per-codebook heads), has its features read from `hidden_states[-1]` instead.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .edit_handle import deferred_interrupt


def output_head(model: nn.Module) -> nn.Module | None:
    """`model.get_output_embeddings()` when it is a module, else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None


def called_head(model: nn.Module) -> nn.Module | None:
    """The output head when the forward calls it as one module, else None: a container of heads
    (MusicGen's one per codebook, an nn.ModuleList) is never called itself."""
    head = output_head(model)
    return None if isinstance(head, (nn.ModuleList, nn.ModuleDict)) else head


def head_width(model: nn.Module) -> int | None:
    """The width of the head's input when the head is an nn.Linear (its in_features), else None.
    It is not always the config's hidden size: OPT-350m projects 1024 → 512 before its head
    (`project_out`), ELECTRA's generator and RemBERT feed theirs an embedding-sized state."""
    head = called_head(model)
    return head.in_features if isinstance(head, nn.Linear) else None


class HeadInput:
    """What `head_input` recorded: `value`, the head's (B, L, H) input, detached, or None."""

    def __init__(self):
        self.value = None


@contextlib.contextmanager
def head_input(model: nn.Module, rows_by_length: tuple, enabled: bool = True):
    """Inside the block, records the first input of the model's head whose leading dimensions are
    `rows_by_length` (B, L); with enabled=False, nothing (no hook).  The hook is put before any
    other pre-hook on the head, so it sees the full sequence even where `scored_logits.logits_at`
    then gathers the scored positions."""
    recorded = HeadInput()
    head = called_head(model) if enabled else None
    if head is None:
        yield recorded
        return

    def record(module, args):
        hidden = args[0] if args else None
        if (recorded.value is None and isinstance(hidden, torch.Tensor) and hidden.dim() == 3
                and tuple(hidden.shape[:2]) == tuple(rows_by_length)):
            recorded.value = hidden.detach()

    handle = None
    try:
        with deferred_interrupt():  # as scored_logits.logits_at's hook: a Ctrl-C leaves none behind
            handle = head.register_forward_pre_hook(record, prepend=True)
        yield recorded
    finally:
        with deferred_interrupt():
            if handle is not None:
                handle.remove()
