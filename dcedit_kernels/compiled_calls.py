"""Models that torch.compile compiled, and running their compiled code eagerly.

dynamo does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`, True by
default): a graph compiled before a hook was added runs for the module that has it since, and the
hook never fires.  What hooks a model (the gradient capture, the prefix record) therefore runs
compiled code eagerly (`eager_compiled_calls`), and what only saves memory through a hook (the
scored-logits gather) is left off where compiled code runs (`runs_compiled`).
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch
from torch import nn


class _Depth:
    """How many `eager_compiled_calls` blocks are open, in any thread (the stance is process-wide)."""

    def __init__(self):
        self._lock, self.depth = threading.Lock(), 0

    def __enter__(self):
        with self._lock:
            self.depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self.depth -= 1


_EAGER = _Depth()


def has_stances() -> bool:
    """Whether this torch has `torch.compiler.set_stance` (2.6 on), so compiled code can run eagerly."""
    return hasattr(torch.compiler, "set_stance")


@contextlib.contextmanager
def eager_compiled_calls():
    """Inside the block, whatever torch.compile compiled runs eagerly (`torch.compiler.set_stance(
    "force_eager")`, torch 2.6 on; a process-wide setting, so another thread's compiled calls run
    eagerly meanwhile too).  Torch 2.5 has no stances: there the block changes nothing (the capture
    refuses a compiled model instead, `refuse_compiled_without_stances`).

    A capture's hooks are added after the model was compiled, and dynamo does not guard on module
    hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`, True by default): a graph compiled
    without a hook runs for a module that has one since, and the hook never fires.  On
    `torch.compile(model)` of the tiny GPT-2 (backend "eager"), a hook that graph-breaks (the
    capture's does, at its `nonzero`) made dynamo compile each block as a frame of its own, and block
    1, guarded like block 0 (same code, modules inlined as inputs), ran block 0's graph: block 1's
    layers "did not run a forward pass inside the capture" (alone: "the loss does not depend on any
    captured module"), on the tiny Llama too; a model compiled and run before the capture (frozen
    weights, so the capture's pass met no other failing guard) can skip every hook the same way."""
    # Without torch._dynamo imported nothing was compiled (torch.compile imports it): set_stance
    # would import it, and with it triton (0.7 s at the first capture here; `import dcedit_kernels`
    # and CPU calls leave triton unimported, tests/test_packaging.py).
    if not has_stances() or "torch._dynamo" not in sys.modules:
        yield
        return
    with torch.compiler.set_stance("force_eager"), _EAGER:
        yield


def refuse_compiled_without_stances(model: nn.Module) -> None:
    """ValueError naming `model`'s compiled module where torch has no torch.compiler.set_stance
    (2.5), so `eager_compiled_calls` cannot run it eagerly.  On torch 2.5.1 the compiled tiny GPT-2
    and Llama failed the capture every way `eager_compiled_calls` says (3 of 10 cases of
    tests/test_compile.py even with dynamo guarding on hooks, `skip_nnmodule_hook_guards=False`:
    fullgraph's Unsupported, a compiled Llama run before "does not depend on any captured module"),
    so the capture is refused instead."""
    if has_stances() or "torch._dynamo" not in sys.modules:
        return
    compiled = next((name or "model" for name, m in model.named_modules() if is_compiled(m)), None)
    if compiled is not None:
        raise ValueError(f"model: {compiled!r} is compiled (torch.compile), and torch "
                         f"{torch.__version__} has no torch.compiler.set_stance to run it eagerly "
                         "while the gradient capture's hooks are on; capture the uncompiled model "
                         "(the OptimizedModule's _orig_mod) or use torch>=2.6")


def is_compiled(module: nn.Module) -> bool:
    """`torch.compile(module)` (an OptimizedModule, which holds the module as `_orig_mod`),
    `module.compile()` (which sets `_compiled_call_impl`) or `module.forward =
    torch.compile(module.forward)` (a function dynamo wraps, which keeps `_torchdynamo_orig_callable`)."""
    return ("_orig_mod" in module._modules or module.__dict__.get("_compiled_call_impl") is not None
            or hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"))


def runs_compiled(model: nn.Module, module: nn.Module) -> bool:
    """True when a call of `model` runs `module` as compiled code: `module` or a module of `model`
    above it is compiled, and no `eager_compiled_calls` block is open.  A hook on it may then never
    fire (a graph compiled before the hook), or fail the trace: under `fullgraph=True` the
    scored-logits gather hook, which dynamo must not trace (`torch.compiler.disable`), raised
    Unsupported ("Skip calling `torch.compiler.disable()`d function")."""
    if _EAGER.depth or "torch._dynamo" not in sys.modules:
        return False
    return any(is_compiled(m) and any(x is module for x in m.modules()) for m in model.modules())
