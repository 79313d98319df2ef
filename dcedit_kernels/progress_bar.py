"""A tqdm progress bar where one is shown, and a stand-in that draws nothing where none is.

`tqdm(disable=True)` still starts tqdm's monitor thread, which outlives the bar: after
`fit(progress=False)` the process held a second thread for good (a thread that Python 3.12's
`os.fork` warns about, "This process is multi-threaded, use of fork() may lead to deadlocks").
"""

from __future__ import annotations


class _NoBar:
    """What training and the evaluation call on a bar, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(enabled: bool, **kwargs):
    """`tqdm.auto.tqdm(**kwargs)` when `enabled`, else a bar that draws nothing and starts no thread."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
