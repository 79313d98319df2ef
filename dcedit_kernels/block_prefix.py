"""Run the edited pass's locality rows from the lowest edited block, on what the KL reference pass
computed below it.

Editor training runs each locality row twice: through the unedited model for the KL's reference,
then through the edited model.  The edited layers sit in the top blocks (MEND and the paper edit
the last MLPs), and below the lowest edited block k both passes compute the same thing: blocks
0..k−1 see no edit and nothing in them requires grad.  `PrefixReuse.record` keeps what block k−1
returned in a reference pass, and `PrefixReuse.reuse` makes blocks 0..k−1 return it, computing
nothing, in the edited pass over the same rows (the same rows in the same order and width, so the
same tensors): that pass runs blocks k.. only.

It is used only where it gives what the full pass gives:
- every edited module sits in one nn.ModuleList of blocks (a name `<list>.<index>.…`), the lowest
  at an index k > 0, and none of them is also a module of blocks 0..k−1 (shared weights);
- the model is in eval mode (dropout would draw other masks in the two passes);
- blocks 0..k−1 carry no forward hooks (a hook would run again on the recorded output) but
  Transformers' own output-collecting ones, and no global module hooks are set;
- in the reference pass, blocks 0..k were each called once and in order, each block j ≥ 1 on the
  very tensor block j−1 returned (nothing changes the hidden state between blocks), and block
  k−1's hidden state had the pass's (rows, width).
Otherwise `record` keeps nothing, and the edited pass runs its rows through every block.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules import module as nn_module


# Transformers 5 puts hooks on the blocks that collect hidden states or attentions when a forward
# asks for them (output_hidden_states=...); the training passes never ask, so they do nothing.
_INERT_HOOK_MODULES = ("transformers.utils.output_capturing",)


def _block_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """(the path of the outermost nn.ModuleList on `name`'s path, the index into it), or None."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[:i]), int(parts[i])
    return None


def _hidden(output) -> torch.Tensor | None:
    """A block's hidden-state output: the output itself, or the first item of a tuple (older
    Hugging Face blocks, and Falcon's and Bloom's, return (hidden, ...))."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


class PrefixReuse:
    """The recorded outputs of block k−1, one per reference pass, keyed by the pass's rows."""

    def __init__(self, blocks: list[nn.Module], k: int):
        self.blocks, self.k = blocks, k
        self.recorded: dict[tuple[int, ...], object] = {}

    @classmethod
    def for_model(cls, model: nn.Module, modules: Mapping[str, nn.Module]) -> "PrefixReuse | None":
        """A PrefixReuse for these edited modules ({name: module}), or None where the model's
        structure or mode rules it out (see the module docstring)."""
        if model.training or not modules:
            return None
        found = {_block_of(model, name) for name in modules}
        if None in found or len({path for path, _ in found}) != 1:
            return None
        k = min(index for _, index in found)
        if k == 0:
            return None
        blocks = list(model.get_submodule(next(iter(found))[0]))
        lower = {id(m) for block in blocks[:k] for m in block.modules()}
        if any(id(m) in lower for m in modules.values()) or any(id(b) in lower for b in blocks[k:]):
            return None
        return cls(blocks, k)

    def _hooked(self) -> bool:
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        hooks = [h for block in self.blocks[:self.k] for h in (*block._forward_hooks.values(),
                                                               *block._forward_pre_hooks.values())]
        return any(getattr(h, "__module__", None) not in _INERT_HOOK_MODULES for h in hooks)

    @contextlib.contextmanager
    def record(self, key: Iterable[int], shape: tuple[int, int]):
        """Inside the block, the model's reference pass over the rows `key` (indices, in the
        pass's order) of (rows, width) `shape`; on a clean exit, block k−1's output is kept for
        `reuse(key)` when the pass ran as the module docstring requires."""
        key = tuple(key)
        self.recorded.pop(key, None)
        if self._hooked():
            yield
            return
        seen: list[tuple[int, str, object]] = []
        handles = []

        def on_input(j):
            def hook(_module, args, kwargs):
                seen.append((j, "in", args[0] if args else kwargs.get("hidden_states")))
            return hook

        def on_output(j):
            def hook(_module, _args, output):
                seen.append((j, "out", output))
            return hook

        try:
            for j, block in enumerate(self.blocks[:self.k + 1]):
                handles.append(block.register_forward_pre_hook(on_input(j), with_kwargs=True))
                if j < self.k:
                    handles.append(block.register_forward_hook(on_output(j)))
            yield
        finally:
            for handle in handles:
                handle.remove()
        output = self._chained_output(seen, tuple(shape))
        if output is not None:
            self.recorded[key] = output

    def _chained_output(self, seen: list, shape: tuple[int, int]):
        """Block k−1's output if `seen` is blocks 0..k called once each, in order, each on the
        hidden state the one before returned, with the pass's (rows, width); else None."""
        expected = [(j, kind) for j in range(self.k) for kind in ("in", "out")] + [(self.k, "in")]
        if [(j, kind) for j, kind, _ in seen] != expected:
            return None
        for j in range(1, self.k + 1):
            hidden_in, hidden_out = seen[2 * j][2], _hidden(seen[2 * j - 1][2])
            if hidden_out is None or hidden_in is not hidden_out:
                return None
        hidden = _hidden(seen[2 * self.k - 1][2])
        if hidden.dim() < 2 or tuple(hidden.shape[:2]) != shape:
            return None
        return seen[2 * self.k - 1][2]

    @contextlib.contextmanager
    def reuse(self, key: Iterable[int]):
        """Inside the block, blocks 0..k−1 return the output `record(key)` kept, computing nothing
        (their instance-level forwards, accelerate's included, are restored on exit)."""
        output = self.recorded[tuple(key)]
        patched = []
        try:
            for block in self.blocks[:self.k]:
                patched.append((block, block.__dict__.get("forward")))
                block.forward = lambda *args, **kwargs: output
            yield
        finally:
            for block, previous in reversed(patched):
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous
