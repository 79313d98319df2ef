"""Evaluate an editing method: sample N_u edits, apply them as one batch, score, undo; repeat.

    from dcedit_kernels.evaluate import evaluate_method
    result = evaluate_method(model, tokenizer, editor, requests, n_edits=(25, 75, 125), repeats=3)
    result["by_n"][25]["es"]          # {"mean": ..., "std": ..., "values": [...]}

One *run* (`measure_edit`) takes a batch of requests and
1. records the unedited model's predictions on the batch's locality prompts (for DD),
2. applies the whole batch as one edit (`ModelEditor.apply`), timing it and measuring its peak
   memory (below); the method gets the requests without their locality prompts, which DD and NS
   are scored on (the editors do not read them; FT+KL would fit its KL to them, see
   `without_locality`),
3. scores ES (rephrase), reliability (prompt), neighbourhood success and DD with
   `dcedit_kernels.metrics` (teacher-forced token accuracy), LMP = ES − DD,
4. undoes the edit (bit-exact), so runs are independent.
A metric whose field is missing from every request of the batch (no rephrase, no locality) is
None; when only some requests have it, it is taken over those.

Peak memory of the edit step (`peak_memory_mb`, in MiB, 2**20 bytes, whatever its name; the
reports' "peak MB" columns before 0.5.6 were MiB too; `memory_method` says how it was taken):
- CUDA: `torch.cuda.max_memory_allocated` during the edit minus what was allocated before, i.e.
  the extra memory the edit needed at its peak ("cuda_peak_allocated"); for a model split over
  several GPUs, the sum of that over each GPU it uses.
- CPU on Linux: the growth of the process's resident-set high-water mark (VmHWM) over the
  edit, after resetting the mark through /proc/self/clear_refs ("rss_high_water").  PyTorch keeps
  no per-call peak for CPU tensors and tracemalloc does not see its allocations; RSS is what the
  user's machine feels.  It is a lower bound on allocation: memory the allocator already holds
  from earlier steps is reused without raising RSS.
- Elsewhere: the growth of `ru_maxrss` (never reset, so 0 unless the edit set a new process
  peak; "ru_maxrss").
Each is a reading of the whole process (or GPU), not of the calling thread: measured while another
thread edits or allocates, it counts that thread's memory too, and a measurement started meanwhile
resets the high-water mark (or CUDA peak) under this one.

`evaluate_method` repeats runs over fresh samples for each N_u and reports mean ± std (population
std over the repeats; 0 for one repeat).  Samples are a function of (seed, N_u, repeat) only, so
every method evaluated with the same seed sees the same edits.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import metrics
from ._checks import check_autograd, check_bool, is_int, is_real_number
from .devices import cuda_indices, model_devices
from .edit_handle import warn_live_edits
from .requests import EditRequest, validate_requests

PREDICTION_METRICS = ("es", "reliability", "dd", "lmp", "ns")
COST_METRICS = ("latency_s", "peak_memory_mb")
# What a model's live edits do to a run (`warn_live_edits`): it scored them as the unedited model's.
LIVE_EDITS_SCORED = ("the \"unedited\" predictions DD compares against, and the model each edit is applied to "
                     "and undone back to, are the edited model's, so DD and NS measure the change from it")
ALL_METRICS = PREDICTION_METRICS + COST_METRICS


# ---------------------------------------------------------------------------------------------
# Peak memory of one step
# ---------------------------------------------------------------------------------------------
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so a step that reuses memory an earlier step
    freed still shows up in RSS: without it the first method measured pays for the heap growth and
    later ones look cheaper (measured: MEND's 25-edit step read 708 MB after a fresh load)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write "5" to clear_refs)."""
    _malloc_trim()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _ru_maxrss_kb() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_mb` (MiB) and `m.method` (see module doc).

    `device` may also be a list of devices (a split model): any CUDA one makes it a CUDA
    measurement, summed over the CUDA devices."""

    def __init__(self, device):
        devices = list(device) if isinstance(device, (list, tuple)) else [device]
        if not devices:  # self.devices[0] raised a bare IndexError
            raise ValueError("device must be a device or a non-empty list of devices, got an empty one")
        self.devices = []
        for d in devices:
            # torch.device's own errors name no argument: a TypeError listing its signatures for None,
            # a RuntimeError for a misspelt name.
            try:
                self.devices.append(torch.device(d))
            except (TypeError, RuntimeError) as exc:
                raise ValueError(f"device must be a torch.device or a device name (or a list of them), "
                                 f"got {d!r}: {str(exc).splitlines()[0]}") from None
        self._cuda = cuda_indices(self.devices)
        self.device = self.devices[0]
        self.peak_mb: float | None = None
        self.method: str | None = None

    def __enter__(self) -> "PeakMemory":
        if self._cuda:
            self._base = {}
            for i in self._cuda:
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)
                self._base[i] = torch.cuda.memory_allocated(i)
            self.method = "cuda_peak_allocated"
        elif _reset_rss_high_water() and _status_kb("VmRSS") is not None:
            self._base = _status_kb("VmRSS")
            self.method = "rss_high_water"
        else:
            self._base = _ru_maxrss_kb()
            self.method = "ru_maxrss" if self._base is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "cuda_peak_allocated":
            extra = 0
            for i, base in self._base.items():
                torch.cuda.synchronize(i)
                extra += torch.cuda.max_memory_allocated(i) - base
            self.peak_mb = extra / 2**20
        elif self.method == "rss_high_water":
            hwm = _status_kb("VmHWM")
            self.peak_mb = None if hwm is None else max(hwm - self._base, 0) / 1024
        elif self.method == "ru_maxrss":
            now = _ru_maxrss_kb()
            self.peak_mb = None if now is None else max(now - self._base, 0) / 1024


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def _model_devices(model) -> list[torch.device]:
    """Every device holding the model (one, unless it is split), CPU for a model without any."""
    return model_devices(model) or [torch.device("cpu")]


def _with(requests: list[EditRequest], *fields: str) -> list[EditRequest]:
    return [requests[i] for i in _indices_with(requests, *fields)]


def _indices_with(requests: list[EditRequest], *fields: str) -> list[int]:
    return [i for i, r in enumerate(requests) if all(getattr(r, f) is not None for f in fields)]


@contextlib.contextmanager
def _named_as(indices: list[int]):
    """A metric's ValueError about `requests[k]` of a subset (the requests with a rephrase, a
    locality...) names it `requests[indices[k]]`, its place in the caller's list (it was named by
    its place in the subset: requests[1] for the caller's requests[2])."""
    try:
        yield
    except ValueError as exc:
        def name(m):
            k = int(m.group(1))
            return f"requests[{indices[k]}]" if k < len(indices) else m.group(0)

        message = re.sub(r"\brequests\[(\d+)\]", name, str(exc))
        if message == str(exc):
            raise
        raise ValueError(message) from exc


def _unedited_locality(model, tokenizer, requests, batch_size, cache: dict | None):
    """(requests with a locality prompt, the unedited model's predictions on them).

    `cache` maps (locality, locality_target) to a prediction of the UNEDITED model; it lets every
    method evaluated on the same samples skip this pass (one of the four scoring passes per run; five
    when a locality prompt lacks its target, since NS and DD then score apart).
    """
    rows = _indices_with(requests, "locality")
    local = [requests[i] for i in rows]
    if not local:
        return local, None
    keys = [(r.locality, r.locality_target) for r in local]
    if cache is None:
        with _named_as(rows):
            return local, metrics.locality_predictions(model, tokenizer, local, batch_size)
    todo = [i for i, k in zip(rows, keys) if k not in cache]
    if todo:
        todo_keys = [(requests[i].locality, requests[i].locality_target) for i in todo]
        with _named_as(todo):
            preds = metrics.locality_predictions(model, tokenizer, [requests[i] for i in todo], batch_size)
        for k, pred in zip(todo_keys, preds):
            cache[k] = pred
    return local, [cache[k] for k in keys]


def _writes_its_modules_only(editor) -> bool:
    """Whether `editor` is a ModelEditor, whose edit writes the weights of `editor.modules` only
    (measure_edit also takes any object with model, tokenizer and apply, whose edit may change
    any block)."""
    from .model_editor import ModelEditor

    return isinstance(editor, ModelEditor)


def _check_editor(editor, needs: tuple[str, ...]) -> None:
    """`editor` has the attributes a function reads (a ModelEditor has them all): a model or a
    str given instead raised AttributeError ("'str' object has no attribute 'model'"), naming
    nothing."""
    missing = [a for a in needs if not hasattr(editor, a)]
    if missing:
        raise ValueError(f"editor must be a ModelEditor (or an object with {', '.join(needs)}), "
                         f"got {type(editor).__name__}, which has no {', '.join(missing)}")


def _check_stores(base_cache, lower_blocks) -> None:
    """The caller's caches are dicts or None: a str base_cache raised TypeError ("'in <string>'
    requires string as left operand"), and a list or str lower_blocks was silently not used."""
    for name, store in (("base_cache", base_cache), ("lower_blocks", lower_blocks)):
        if store is not None and not isinstance(store, dict):
            raise ValueError(f"{name} must be a dict or None, got {type(store).__name__}")


def _all_missed(requests, cache: dict | None) -> bool:
    """Whether `_unedited_locality` scores every locality row of `requests` (in their order, so
    in the batches the edited model's NS/DD pass scores them in): no cache, or none of them in it."""
    if cache is None:
        return True
    return not any((r.locality, r.locality_target) in cache for r in requests if r.locality is not None)


def _kept(editor, lower_blocks: dict | None):
    """`metrics.lower_blocks_kept` for the editor's layers, when `lower_blocks` is given."""
    if lower_blocks is None:
        return contextlib.nullcontext()
    return metrics.lower_blocks_kept(editor.modules, lower_blocks)


def without_locality(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The requests as `measure_edit` hands them to the method: without `locality` and
    `locality_target`, the held-out prompts DD and NS are scored on.  The editors do not read them
    at edit time; FT+KL regularises on them when given, and fitting the KL to the very prompts DD
    counts would score it on its training data (SmolLM2, CounterFact val, 10 steps: DD 0.66-0.71 at
    25-125 edits with them, 0.72-0.75 with 25 training edits' locality prompts instead; RESULTS.md).
    It regularises on its `locality_texts` instead."""
    # An empty list gives an empty one; anything but EditRequests is named (a str or None raised
    # AttributeError or TypeError from the loop below).
    if isinstance(requests, (str, EditRequest)) or not hasattr(requests, "__iter__"):
        raise ValueError(f"requests must be a sequence of EditRequest, got {type(requests).__name__}")
    requests = list(requests)
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise ValueError(f"requests[{i}] must be an EditRequest, got {type(r).__name__}")
    held_out = [copy.copy(r) for r in requests]  # a copy keeps any subclass and its own fields
    for r in held_out:
        r.locality = r.locality_target = None
    return held_out


def measure_edit(editor, requests: Sequence[EditRequest], batch_size: int = 16, during=None,
                 base_cache: dict | None = None, lower_blocks: dict | None = None) -> dict:
    """Apply `requests` as one batch with `editor` (a ModelEditor), score, undo; one run's metrics.

    The method sees the requests without their locality prompts (`without_locality`).
    Returns es, reliability, dd, lmp, ns (floats in [0, 1], or None, see the module docstring),
    latency_s (wall time of `apply`), peak_memory_mb and memory_method, n_edits; with `during`
    (a callable taking the model) also "during": what it returned while the edit was applied
    (e.g. greedy completions of the edited model).  `base_cache`: a dict shared between calls on
    the same UNEDITED model, caching its locality predictions (see `_unedited_locality`).  A cached
    prediction is the one of the batch the row was first scored in: in a bf16 or fp16 model another
    batch mix pads the row differently, which can flip a near-tied argmax (a plain padded forward of
    Hugging Face's does), and DD then counts that as a change (seen on a tiny bf16 GPT-2 built with
    near-tied logits: DD 0.125 in 3 of 6 samples of an edit that changed nothing, 0 without the
    cache).  Where that rounding matters, pass none (the unedited and the edited pass then score the
    same batches) or use batch_size=1 (evaluate_method always shares one).
    `lower_blocks` (with a ModelEditor only; ValueError with another editor, whose edit may change
    any block): a dict shared between calls on that model, keeping the output of the blocks
    below the editor's layers for each scoring batch (`metrics.lower_blocks_kept`): a call that
    scores the same requests as an earlier one (another method on the same batch) runs only the
    blocks from the lowest edited one, with the same scores.  SmolLM2, the demo's 25 edits on
    layers 27-29 (MEND), CPU, 1 thread: a call took 5.1-5.6 s CPU, 1.8-2.4 s once the unedited
    scores had kept the batches (the demo does that; the apply is ~1.4 s of it).  None (the
    default): a store of this call's own, for its locality rows only (the unedited and the edited
    model's passes over them), when none of them is in `base_cache` and `editor` is a ModelEditor.
    A model that holds live edits of a ModelEditor (applied, neither undone nor kept) is scored as
    it is, its edits in the "unedited" predictions, and warns (`edit_handle.warn_live_edits`).
    """
    return _measure_edit(editor, requests, batch_size, during, base_cache, lower_blocks, warn_live=True)


def _measure_edit(editor, requests, batch_size, during, base_cache, lower_blocks, warn_live: bool) -> dict:
    """`measure_edit`; warn_live=False from evaluate_method, which warns of live edits once itself."""
    _check_editor(editor, ("model", "tokenizer", "apply"))
    _check_stores(base_cache, lower_blocks)
    if lower_blocks is not None and not _writes_its_modules_only(editor):
        # Another editor's edit may change any block, kept or not (and it has no `modules`: a bare
        # AttributeError after the unedited scores).
        raise ValueError(f"lower_blocks keeps the blocks below a ModelEditor's layers: give it None with a "
                         f"{type(editor).__name__}, whose edit may change any block")
    requests = validate_requests(requests)
    # Before any pass: it was checked by the first scoring call, after the edit where no request has a
    # locality prompt (the edit ran, and was undone, for nothing).
    metrics._check_batch_size(batch_size)
    if during is not None and not callable(during):
        # Called only once the edit is applied: a non-callable raised TypeError after the scoring passes.
        raise ValueError(f"during must be a callable taking the model, or None, got {type(during).__name__}")
    model, tokenizer = editor.model, editor.tokenizer
    if warn_live:
        warn_live_edits(model, "measure_edit", LIVE_EDITS_SCORED)
    # Without a caller's store, one for this call's locality rows: when none of them is in
    # `base_cache`, the unedited pass below and the edited NS/DD pass score the same batches, and
    # the edited one runs only the blocks from the lowest edited layer, from the unedited pass's
    # kept output of the blocks below (`metrics.lower_blocks_kept`: the same tensors, so the same
    # scores).  evaluate_method passes none, and its runs all miss the cache but for another
    # method's.  SmolLM2, 100 CounterFact edits, untrained MEND (layers 27-29), batch_size 16, CPU,
    # 1 thread, 3 alternating pairs on a 2-core machine shared with ~7 processes: measure_edit took
    # 25.8 s of CPU time instead of 29.1 (medians; 25.2-27.1 against 27.7-31.7), the same results.
    # Only the locality rows: ES and reliability are scored once per call, and keeping their
    # batches would only hold memory.
    locality_store = lower_blocks if lower_blocks is not None else (
        {} if _writes_its_modules_only(editor) and _all_missed(requests, base_cache) else None)
    with _kept(editor, locality_store):
        local, base = _unedited_locality(model, tokenizer, requests, batch_size, base_cache)
    rephrased = _with(requests, "rephrase")
    neighbours = _with(requests, "locality", "locality_target")

    # The undo covers the peak's reading too: an error there (a CUDA sync in PeakMemory's exit), or a
    # Ctrl-C, after apply returned left the model edited, with the handle out of the caller's reach.
    handle = None
    try:
        with PeakMemory(getattr(editor, "devices", None) or _model_devices(model)) as memory:
            start = time.perf_counter()
            handle = editor.apply(without_locality(requests))
            latency = time.perf_counter() - start
        with _kept(editor, lower_blocks):
            with _named_as(_indices_with(requests, "rephrase")):
                es = metrics.edit_success(model, tokenizer, rephrased, batch_size) if rephrased else None
            rel = metrics.reliability(model, tokenizer, requests, batch_size)
            if local and len(neighbours) == len(local):
                # Every locality prompt has its target: NS and DD score the same pairs in the same batches,
                # so one pass gives both (the same values).  SmolLM2, 25 CounterFact edits, batch_size 16:
                # 8 scoring forwards instead of 10 (3 passes on the edited model instead of 4), each of 5
                # alternating pairs faster (new/old 0.32-0.89, median 0.68, on a contended 2-core CPU).
                with _named_as(_indices_with(requests, "locality")), _kept(editor, locality_store):
                    ns, dd = metrics._neighbourhood_success_and_drawdown(model, tokenizer, local, base, batch_size)
            else:
                with _named_as(_indices_with(requests, "locality", "locality_target")):
                    ns = metrics.neighbourhood_success(model, tokenizer, neighbours, batch_size) if neighbours else None
                with _named_as(_indices_with(requests, "locality")), _kept(editor, locality_store):
                    dd = metrics.drawdown(model, tokenizer, local, base, batch_size) if local else None
        extra = {} if during is None else {"during": during(model)}
    finally:
        if handle is not None:
            handle.undo()
    return dict(
        **extra,
        es=es, reliability=rel, dd=dd, lmp=None if es is None or dd is None else metrics.lmp(es, dd), ns=ns,
        latency_s=latency, peak_memory_mb=memory.peak_mb, memory_method=memory.method, n_edits=len(requests),
    )


def unedited_scores(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16) -> dict:
    """ES, reliability and NS of the unedited model on the requests (the "before" row); DD 0 and
    LMP = ES, or None where `measure_edit` gives None: no request has a locality prompt (DD), or
    none a rephrase (ES and LMP)."""
    requests = validate_requests(requests)
    rephrased = _with(requests, "rephrase")
    neighbours = _with(requests, "locality", "locality_target")
    with _named_as(_indices_with(requests, "rephrase")):
        es = metrics.edit_success(model, tokenizer, rephrased, batch_size) if rephrased else None
    rel = metrics.reliability(model, tokenizer, requests, batch_size)
    with _named_as(_indices_with(requests, "locality", "locality_target")):
        ns = metrics.neighbourhood_success(model, tokenizer, neighbours, batch_size) if neighbours else None
    # No edit changes no prediction: DD 0, where there are locality prompts to score it on.  Without
    # them the row said DD 0.0 and LMP = ES beside the methods' None ("–" in report.py's tables).
    dd = 0.0 if _with(requests, "locality") else None
    return dict(es=es, reliability=rel, dd=dd, lmp=None if es is None or dd is None else metrics.lmp(es, dd), ns=ns)


# ---------------------------------------------------------------------------------------------
# Repeated runs
# ---------------------------------------------------------------------------------------------
def _as_listed(layers):
    """`layers` as a list for ModelEditor; a single name, or anything that is not a collection
    (an int: list() raised "'int' object is not iterable", naming nothing), goes through as it
    is, for ModelEditor's own message (list() would split a name into characters, reported as
    duplicate layer names)."""
    return layers if isinstance(layers, str) or not hasattr(layers, "__iter__") else list(layers)


def sample_indices(n_requests: int, n_edits: int, seed: int, repeat: int) -> list[int]:
    """The request indices of run `repeat` for N_u = n_edits: a pure function of its arguments.

    ValueError unless every argument is an int (not a bool): the sample is drawn from their text,
    so seed 1.0 or True would draw another sample than seed 1, and seed "1" the same one."""
    for name, value in (("n_requests", n_requests), ("n_edits", n_edits), ("seed", seed), ("repeat", repeat)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if n_requests < 0 or repeat < 0:
        raise ValueError(f"n_requests and repeat must be non-negative, got {n_requests} and {repeat}")
    if not 0 <= n_edits <= n_requests:
        raise ValueError(f"n_edits must be in [0, n_requests={n_requests}], got {n_edits}")
    rng = random.Random(f"dcedit-{seed}-{n_edits}-{repeat}")
    return sorted(rng.sample(range(n_requests), n_edits))


def summarize(values: Iterable) -> dict:
    """{"mean", "std", "values"} over the non-None values (mean/std None when there are none).
    `values`: real numbers and None; anything else is a ValueError.  A non-finite value is reported,
    not refused, as numpy's mean and std report it: a NaN makes mean and std NaN, an inf the mean
    ±inf (NaN with both signs) and the std NaN, so that a diverged run stays visible in the summary
    rather than ending an evaluation whose other runs were scored.  evaluate_method's own values
    are finite (shares, LMP of shares, seconds, MiB) or None."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        # None raised "'NoneType' object is not iterable", naming nothing.
        raise ValueError(f"values must be a sequence of numbers or None, got {type(values).__name__}")
    # Listed once: a generator was read up by the mean, so "values" came back [] beside a mean of its items.
    values = list(values)
    for i, v in enumerate(values):
        # float() took "0.5" and True as numbers, and a str that is none raised "could not convert
        # string to float: 'a'", naming no item.
        if v is not None and not is_real_number(v):
            # (A tensor was averaged before and came back in "values", which the results' JSON cannot hold.)
            hint = ": pass its .item()" if isinstance(v, torch.Tensor) and v.numel() == 1 else ""
            raise ValueError(f"values[{i}] must be a real number or None, got {type(v).__name__}{hint}")
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return dict(mean=None, std=None, values=list(values))
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
    return dict(mean=mean, std=std, values=list(values))


def _check_n_edits(n_edits, n_requests: int) -> list[int]:
    if is_int(n_edits):
        n_edits = (n_edits,)
    try:
        items = list(n_edits)
    except TypeError:
        raise ValueError(f"n_edits must be an int or a sequence of ints, got {type(n_edits).__name__}") from None
    if not items:
        raise ValueError("n_edits must not be empty")
    for n in items:
        if not is_int(n) or n < 1:
            raise ValueError(f"n_edits must hold positive ints, got {n!r}")
        if n > n_requests:
            raise ValueError(f"n_edits holds {n}, more than the {n_requests} requests available")
    if len(set(items)) != len(items):  # by_n has one entry per N_u: a repeated one would pool its runs twice
        raise ValueError(f"n_edits must not repeat a value, got {items}")
    return items


def _with_editor_seed(method: str, seed: int, editor_kwargs: dict) -> dict:
    """`editor_kwargs` with `seed` for an editor method (the FT baselines draw nothing): `seed` is
    evaluate_method's own argument, so it could not reach the editor it builds, whose initial
    weights and RaEditor's groups came from torch's global generator, and two calls with one seed
    gave other ES and DD as the caller's draws in between moved it (`dcedit evaluate --seed` seeds
    both).  Reduced as `fit` reduces its seed: any int seeds the samples."""
    from .model_editor import EDITOR_METHODS
    from .train import torch_seed

    return {**editor_kwargs, "seed": torch_seed(seed)} if method in EDITOR_METHODS else editor_kwargs


def evaluate_method(
    model,
    tokenizer,
    method,
    requests: Sequence[EditRequest],
    n_edits=(25, 75, 125),
    repeats: int = 3,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    base_cache: dict | None = None,
    lower_blocks: dict | None = None,
    **editor_kwargs,
) -> dict:
    """Mean ± std of every metric over `repeats` runs of N_u edits, for each N_u in `n_edits`.

    `method`: a ModelEditor (trained or not) over `model`, or a method name ("ft", "ft_kl",
    "mend", ...) from which one is built with `layers` and `editor_kwargs`.  `seed`: the samples'
    (`sample_indices`) and, for an editor built here, its initial weights and RaEditor's random
    groups (as `dcedit evaluate --seed`); a ModelEditor passed in keeps its own.  Returns
    {"method", "n_requests", "repeats", "seed", "by_n": {N_u: {metric: {"mean", "std",
    "values"} for each of ALL_METRICS, "memory_method": ...}}, "runs": [per-run dicts of
    `measure_edit` with "repeat" and "indices" added]}.  `base_cache`: see `measure_edit`; pass
    one dict to every call that evaluates a method on the same unedited model (the report does),
    or leave None for a private one.  `lower_blocks`: see `measure_edit`; one dict passed to every
    call that evaluates a method on the same model, requests, seed and edited layers (the report
    does) makes every call after the first score its batches from the kept output of the blocks
    below those layers (the same scores); it holds one (rows, width, hidden) tensor per scoring
    batch of every run.
    """
    from .model_editor import ModelEditor
    from .progress_bar import progress_bar

    requests = validate_requests(requests)
    _check_stores(base_cache, lower_blocks)  # before a ModelEditor is built and any run
    sizes = _check_n_edits(n_edits, len(requests))
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not is_int(seed):  # sample_indices draws from its text: 1.0 or True would be another sample than 1
        raise ValueError(f"seed must be an int, got {seed!r}")
    # Both before an editor is built: batch_size was checked by the first run's scoring, and progress was
    # read for its truth ("False" showed the bar).
    metrics._check_batch_size(batch_size)
    check_bool(progress, "progress")
    if isinstance(method, ModelEditor):
        if method.model is not model:
            raise ValueError("method is a ModelEditor of another model than `model`")
        if layers is not None or editor_kwargs:
            raise ValueError("layers and editor arguments go to the ModelEditor, not here, when method is one")
        editor = method
    elif isinstance(method, str):
        if layers is None:
            raise ValueError(f"layers is required to build a ModelEditor for method {method!r}")
        editor = ModelEditor(model, tokenizer, layers=_as_listed(layers), method=method,
                             **_with_editor_seed(method, seed, editor_kwargs))
    else:
        raise ValueError(f"method must be a ModelEditor or a method name, got {type(method).__name__}")

    warn_live_edits(model, "evaluate_method", LIVE_EDITS_SCORED)
    runs = []
    base_cache = {} if base_cache is None else base_cache
    total = len(sizes) * repeats
    with progress_bar(progress, total=total, desc=f"evaluate {editor.method}") as bar:
        for n in sizes:
            for r in range(repeats):
                idx = sample_indices(len(requests), n, seed, r)
                with _named_as(idx):  # an error names the request by its place in `requests`, not in the sample
                    run = _measure_edit(editor, [requests[i] for i in idx], batch_size, None, base_cache,
                                        lower_blocks, warn_live=False)
                runs.append(dict(run, repeat=r, indices=idx))
                bar.update(1)
    by_n = {}
    for n in sizes:
        mine = [run for run in runs if run["n_edits"] == n]
        by_n[n] = {m: summarize([run[m] for run in mine]) for m in ALL_METRICS}
        by_n[n]["memory_method"] = mine[0]["memory_method"]
    return dict(method=editor.method, n_requests=len(requests), repeats=repeats, seed=seed, by_n=by_n, runs=runs)


# ---------------------------------------------------------------------------------------------
# Gradient conflict per layer (paper Table 5)
# ---------------------------------------------------------------------------------------------
def gradient_conflict(model, tokenizer, layers: Sequence[str], requests: Sequence[EditRequest]) -> dict:
    """{layer: {"gcr", "gms"}}: conflict ratio and magnitude similarity of the per-edit gradients
    of each edited weight for this batch of edits (the capture's forward + backward, from the captured
    factors through `metrics.factor_gram`; no per-edit gradient matrix is formed).  Edit i's
    gradient is that of its own mean target NLL (loss_reduction "edit"): under the batch mean
    ("token") it would be scaled by its share of the batch's target tokens, which GMS would read as
    a magnitude difference.  A weight tied to another module's (an LM head sharing the input
    embedding) is read as this layer's: g_i is the gradient through the layer's own use of it (the
    factors are captured at its output), not the shared parameter's whole gradient, which also
    holds the embedding's (tiny tied GPT-2, 8 edits: GCR 0.286 against the parameter's 0.321).
    The metrics are over pairs i < j, so `requests` must hold at least 2 edits (ValueError)."""
    from .model_editor import ModelEditor

    requests = validate_requests(requests)
    if len(requests) < 2:
        raise ValueError(f"requests must hold at least 2 edits for gradient metrics, got {len(requests)}")
    # A fine-tuning ModelEditor builds no editor: only its capture is used here.  Nothing is
    # edited, so a tied weight is fine to read.
    me = ModelEditor(model, tokenizer, layers=_as_listed(layers), method="ft", loss_reduction="edit", allow_tied=True)
    # After the constructor has checked `model`: a model built under inference_mode is named as apply names it.
    check_autograd("gradient_conflict", model=me.model)
    batch = me.tokenize([r.prompt for r in requests], [r.target for r in requests])
    factors, _, _ = me.capture(batch, need_feats=False)
    out = {}
    for name in me.layers:
        f = factors[name]
        gram = metrics.factor_gram(f.mu, f.eta, f.edit_offsets)
        out[name] = dict(gcr=metrics.gcr(gram=gram), gms=metrics.gms(gram=gram))
    return out


def edit_statistics(editor, requests: Sequence[EditRequest]) -> dict:
    """What a trained editor makes of one batch of edits, without applying it: {layer:
    {"edits_per_editor": [edits routed to each of the N_g editors], "shift_norm": ‖α·Δ‖_F of the
    fused (and Fisher-masked) shift, "weight_norm": ‖W‖_F}}.  The editors run as `apply` runs
    them (eval mode: frozen normalisation statistics, no gate noise); the model is not changed.
    Forms each layer's o×i shift once, like the dense apply."""
    from .model_editor import FT_METHODS

    _check_editor(editor, ("method", "tokenize", "capture", "edits_as_applied", "layers"))
    if editor.method in FT_METHODS:
        raise ValueError(f"editor must use a trained editor method, got {editor.method!r}")
    requests = validate_requests(requests)
    # As apply: a model built under inference_mode is named (_check_editor does not ask for `model`).
    check_autograd("edit_statistics", model=getattr(editor, "model", None))
    batch = editor.tokenize([r.prompt for r in requests], [r.target for r in requests])
    factors, feats, _ = editor.capture(batch)
    edits = editor.edits_as_applied(factors, feats)
    out = {}
    with torch.no_grad():
        for name in editor.layers:
            edit = edits[name]
            out[name] = dict(
                edits_per_editor=torch.bincount(edit.edit_group.cpu(), minlength=edit.n_groups).tolist(),
                shift_norm=float(edit.alpha.abs() * edit.dense().norm()),
                weight_norm=float(editor.modules[name].weight.float().norm()),
            )
    return out
