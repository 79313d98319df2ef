"""`warn`: the package's warnings, shown at the user's line, the one that called into the package.

warnings.warn's `stacklevel` counts frames from the line that warns, and the package's warnings
reach the user through call depths of their own: fit's come from train_editor one frame deeper than
a direct train_editor call's, apply's through apply, `edited()` or evaluate_method, block_prefix's
from a check inside a pass of the model's forward.  Hand-counted levels showed them at lines of
model_editor.py and evaluate.py (session 59: `ModelEditor.fit` with a batch_size above its requests
warned at "model_editor.py:734", a line of fit).  So `warn` finds the level by walking the stack, as
pandas' find_stack_level does, but to the caller of the OUTERMOST frame of the package rather than
the first frame outside it: transformers' and torch's frames sit between the package's (a model's
forward under fit, an op's implementation under the dispatcher).  Past that frame, frames of
contextlib and torch that pass a user's call on to the package are skipped too: `with
me.edited(...)` runs the package's generator from contextlib's __enter__ (the warning showed at
contextlib.py:137), and torch's dispatcher, Module.__call__ and no_grad decorators call the package's
functions the same way.  A user's code that the package calls and that calls the package again (a
model's forward using the ops, under fit) is shown at its outer call (the fit line).  Frames are told
apart by their module's name (a script's `__main__` is the user's).  Python 3.12's
`skip_file_prefixes` would skip the package's own frames only; 3.10 and 3.11 lack it.
"""

from __future__ import annotations

import sys
import warnings

_PACKAGE = __name__.split(".")[0]


def _module_in(frame, package: str) -> bool:
    name = frame.f_globals.get("__name__")
    # Globals without a str __name__ (exec(code, {}), or a namespace holding another type there) are
    # no module's, as warnings.warn takes them ("<string>"); str methods on them raised in place of the warning.
    return isinstance(name, str) and (name == package or name.startswith(package + "."))


def _passes_on(frame) -> bool:
    """Whether `frame` belongs to a wrapper that passes a call on to the package (see above)."""
    return _module_in(frame, "contextlib") or _module_in(frame, "torch")


def _counted(frame) -> bool:
    """Whether warnings.warn counts `frame` in its stacklevel: it skips importlib's bootstrap frames
    (CPython's warnings._is_internal_frame, its C twin alike), as an import-time warning crosses."""
    name = frame.f_code.co_filename
    return not ("importlib" in name and "_bootstrap" in name)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category), shown at the user's line (see the module docstring)."""
    # stacklevel 1 is this frame; each level after it the next frame warnings.warn counts.
    frame, level, outermost, ours = sys._getframe(0), 1, 1, True
    while frame is not None:
        ours = _module_in(frame, _PACKAGE) or (ours and _passes_on(frame))
        if ours:
            outermost = level
        frame = frame.f_back
        while frame is not None and not _counted(frame):
            frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=outermost + 1)
