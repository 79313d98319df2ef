"""`ThreadFlag`: a switch of this thread's that a `with` block turns on, nested blocks putting back
what they found (`scored_logits.full_logits`, `dropout_check.already_warned`)."""

from __future__ import annotations

import contextlib
import threading


class ThreadFlag:
    """False until `with flag.on():` in this thread; other threads see their own value."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def on(self):
        previous = bool(self)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous
