"""Replace modules' forwards for the length of a block, and put back exactly what was there."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

from .edit_handle import deferred_interrupt

_UNSET = object()  # no instance-level forward (None is a value someone may have set)


@contextlib.contextmanager
def patched_forwards() -> Iterator[Callable[[nn.Module, Callable], None]]:
    """Yields `patch(module, forward)`, which sets `forward` as the module's instance-level forward.
    On exit, also when the block raises, each patched module gets back what it had: an
    instance-level forward someone set before (accelerate's hooks set one), or none, so that its
    class's forward serves again.  Hooks registered on the module still run around the patch.  A forward
    the block itself deleted or replaced meanwhile does not stop the others from coming back."""
    patched: list[tuple[nn.Module, object]] = []

    def patch(module: nn.Module, forward: Callable) -> None:
        patched.append((module, module.__dict__.get("forward", _UNSET)))
        module.forward = forward

    try:
        yield patch
    finally:
        with deferred_interrupt():  # a Ctrl-C meanwhile waits until every forward is back
            for module, previous in reversed(patched):
                if previous is _UNSET:
                    if "forward" in module.__dict__:
                        del module.forward
                else:
                    module.forward = previous
