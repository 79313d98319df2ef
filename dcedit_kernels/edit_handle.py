"""EditHandle: one applied edit of a model, undone by copying the saved weights back.

Every ModelEditor of a model shares that model's list of live edits (`LIVE_EDITS`), so undo can
refuse to run out of order: restoring values saved before a later edit would wipe that edit too.
The list is the model's, keyed by the model object itself (a weak key: it goes with the model, so
a later model at the same address starts with none), and has no lock: other models' lists are
other lists, but one model is edited and undone by one thread at a time.
Writes and restores of weights run under `deferred_interrupt`, so a Ctrl-C never leaves a changed
weight unrecorded or half restored.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import weakref

import torch
from torch import nn

from ._warn import warn


class EditHandle:
    """An applied edit: `undo()` restores the edited weights bit for bit; `stats` says what it cost.

    stats: `latency_s` (whole apply), `capture_s`, `editor_s`, `apply_s` (editor methods) or
    `ft_s` and `ft_steps_run` (baselines), `changed_fraction` (editor methods: {layer: share of
    the weight's entries the edit changed}; in bf16/fp16 a shift entry below half the weight's
    resolution rounds away and leaves its entry unchanged), `n_edits`, `n_tokens` (editor methods:
    the captured token rows, summed over the edited layers; baselines: the batch's unmasked tokens),
    `peak_memory_bytes` (CUDA's peak allocated during the edit, summed over the CUDA devices in
    play; None on CPU, where PyTorch keeps no per-call peak).
    """

    def __init__(self, live: list, saved: list[tuple[torch.Tensor, torch.Tensor]], stats: dict,
                 model: nn.Module | None = None):
        # The model's live-edit list, not the editor or the model: nothing here keeps the model
        # alive, so its entry in LIVE_EDITS goes with it.
        self._live = live
        self._saved = saved
        self.stats = stats
        self.active = True
        self.kept = False
        self._undone = False  # by undo() (see keep); not by its model being freed
        self._release = None
        self._model = None  # a weakref to the edited model (see `_check_weights_in_model`)
        self._unpickled_alone = False  # see __setstate__
        # The Thread that applied it (`ModelEditor._leave_edited`: is it still running?), not
        # pickled.  Its ident did not tell: Linux gives a thread that ended's ident to the next one.
        self._thread_ref = weakref.ref(threading.current_thread())
        if model is not None:
            self._watch(model)

    def _watch(self, model: nn.Module) -> None:
        """Free the saved weights (and the edited Parameters they name) when `model` is freed: a
        handle kept after its model was dropped (a list of handles) held both until it went too.
        The edit then counts as undone (nothing is left to restore)."""
        self._unwatch()
        self._unpickled_alone = False
        self._model = weakref.ref(model)
        self._release = weakref.finalize(model, _model_freed, weakref.ref(self), self._saved)
        self._release.atexit = False

    def __deepcopy__(self, memo) -> "EditHandle":
        """A copy without the original's model watch (`ModelEditor.__deepcopy__` watches the copied
        model for the copied live edits).  A handle that undoes nothing (undone, kept, or pinned
        below a kept edit), copied on its own rather than through a copied ModelEditor's live-edit
        list, shares the original's list, which it never changes."""
        import copy

        model = self._edited_model()
        live = self._restorable()
        if live and model is not None and id(model) not in memo:
            # Copied alone, the copy's saved weights are copies of the model's Parameters: its undo
            # restored those copies and returned True while the model kept the edit (an
            # edit-sequence fuzz).  Within a copy of its ModelEditor the model is copied first; a
            # handle met before its editor in one deepcopy cannot tell it is not alone.
            raise TypeError("a live EditHandle is copied with its ModelEditor (copy.deepcopy(editor)), "
                            "not alone: a copy of it would undo into copies of the weights, not the model's; "
                            "in one deepcopy with its editor, the editor first: copy.deepcopy((editor, handle)), "
                            "not (handle, editor)")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self._state()
        # A deep copy of the list copied the model's other live edits alone, which raised the
        # TypeError above for an undone or kept handle; a pinned one's undo reads the list (to refuse).
        # Reached through its list (a copied ModelEditor's), the handle takes the list's copy.
        shared = not live and id(self._live) not in memo
        shared_live = state.pop("_live") if shared else None
        new.__dict__.update(copy.deepcopy(state, memo))
        if shared:
            new._live = shared_live
        new._release = new._model = None
        new._thread_ref = self._thread_ref  # the same thread applied it (a process's copy; pickles drop it)
        return new

    def _edited_model(self) -> nn.Module | None:
        """The edited model while it lives (None once freed, or for an unpickled handle)."""
        return self._model() if self._model is not None else None

    def _applying_thread(self) -> threading.Thread | None:
        """The Thread that applied this edit while it lives (None for an unpickled handle)."""
        return self._thread_ref() if self._thread_ref is not None else None

    def _applied_by_this_thread(self) -> bool:
        return self._applying_thread() is threading.current_thread()

    def _by_another_running_thread(self) -> bool:
        """Whether a thread other than this one that has not ended applied this edit (an unpickled
        handle's thread is not known: taken as ended)."""
        thread = self._applying_thread()
        return thread is not None and thread is not threading.current_thread() and thread.is_alive()

    def _restorable(self) -> bool:
        """Whether this edit is live in its model's live-edit list: not undone, kept, or pinned below
        a kept edit (whose saved weights were freed)."""
        return self.active and not self.kept and self in self._live

    def _state(self) -> dict:
        """The handle's attributes without the model watch (a weakref and a finalizer) and the
        applying thread's weakref."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_release", "_model", "_thread_ref")}

    def __getstate__(self) -> dict:
        """Pickled without the model watch (a weakref and a finalizer, which cannot be pickled: a
        ModelEditor with a live edit raised TypeError); an unpickled ModelEditor watches its model
        for the live edits it carries (`ModelEditor.__setstate__`).  A handle that undoes nothing is
        pickled without its live-edit list, which its unpickled copy never reads (undo and keep
        answer from its flags)."""
        state = self._state()
        if not self._restorable():
            # The list wrote the model's other live edits beside it, their saved weights and the
            # edited Parameters: 84 KB for an undone handle of 246 bytes beside one FT edit of
            # three tiny-Llama weights.
            state["_live"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        # A handle pickled by 0.5.8 or before has no `_undone`: inactive and not kept, it was undone
        # (or its model was freed, which those versions did not tell apart).
        self._undone = not state.get("active", True) and not state.get("kept", False)
        self.__dict__.update(state)
        self.__dict__.pop("_thread", None)  # 0.5.37's applying thread's ident, read by nothing since
        self._release = self._model = self._thread_ref = None
        # Unpickled alone, a live edit's saved weights are copies of the Parameters, not the model's:
        # its undo restored those and returned True while the model kept the edit.  Unpickled with
        # its ModelEditor, `ModelEditor.__setstate__` watches the model copy, which clears this.
        self._unpickled_alone = self.active and not self.kept

    def _unwatch(self) -> None:
        if self._release is not None:
            self._release.detach()  # no finalizer left per undone edit on a model that lives on
            self._release = None

    def __repr__(self) -> str:
        # Pinned: live once, made permanent by a later edit's keep(), which took it off the list.
        # Inactive without undo(): its model was freed (`_model_freed`), which undid nothing.
        state = ("kept" if self.kept else "undone" if self._undone else "model freed" if not self.active
                 else "live" if self._restorable() else "pinned")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in self.stats.items()
                 if k in ("n_edits", "n_tokens", "latency_s")}
        return f"EditHandle({state}, {len(self._saved)} weight copies held, {shown})"

    def undo(self) -> bool:
        """Restore the weights; returns False when this edit was already undone (or its model was
        freed).  RuntimeError, restoring nothing, while another thread edits the model (apply, undo,
        fit: `one_editing_thread`), when the edit was kept (`keep`) or made permanent by a later
        edit's keep, when a later live edit of the model is not undone yet (undo in reverse order),
        and when an edited weight is no longer a parameter of the model (offloaded or replaced)."""
        model = self._edited_model()
        # A Ctrl-C anywhere in it waits until the undo is done: one before its restore (the checks
        # walk every parameter of the model) left the edit live after an edited() block, one in
        # one_editing_thread's exit left the model marked as edited by this thread for good.
        with deferred_interrupt(), one_editing_thread(model, "EditHandle.undo"):
            return self._undo()

    def _undo(self) -> bool:
        if not self.active:
            return False
        if self.kept:
            raise RuntimeError("this edit was kept (handle.keep()): it can no longer be undone")
        if not self._restorable():
            # Pinned: a later edit's keep() took it off the list and freed its saved weights.  Asked
            # here, before `_unpickled_alone`: a pinned handle pickled (alone or with its ModelEditor,
            # which carries no pinned edit) was told "unpickled without its ModelEditor".
            raise RuntimeError(_LATER_EDIT_KEPT)
        if self._unpickled_alone:
            raise RuntimeError("this EditHandle was unpickled without its ModelEditor: it holds copies of the "
                               "weights, not the model's, so it cannot undo the edit; pickle the ModelEditor "
                               "(with its model) to carry live edits")
        live = self._live  # holds this handle: `_restorable` above
        if live[-1] is not self:
            # No later edit here was kept: a later keep() took this handle off the list (`_restorable`).
            raise RuntimeError("undo the later edits first: edits of a model (by any of its ModelEditors) "
                               "must be undone in reverse order")
        self._check_weights_in_model()
        # (undo holds a Ctrl-C back until the handle says undone: one just after the restore left the
        # restored edit live, on top of the model's live edits, so the earlier edits refused to undo
        # and keep() took an edit no longer in the model.)  Off the list before inactive: an error
        # between the two left an inactive handle on the list, whose undo() then took nothing off it.
        try:
            restore(self._saved)
        except BaseException as exc:
            # (A failing copy: a device error.)  Inside fit's validation or measure_edit the handle is
            # out of the caller's reach, and the error said nothing of the edit left in the model.
            add_note(exc, "dcedit: the undo failed while copying the saved weights back: the model holds this "
                     "edit, partly undone, and the edit stays live (a later undo() of its handle restores all "
                     "of it; where the handle is out of reach, as in fit's validation or measure_edit, reload "
                     "the model)")
            raise
        live.pop()  # this handle, the list's last (checked above)
        self.active = False
        self._undone = True
        self._saved = []  # the weight copies: a handle kept after undo (a list of them) holds none
        self._unwatch()
        return True

    def _check_weights_in_model(self) -> None:
        """RuntimeError, before anything is restored, when a weight this edit changed is no longer
        a parameter of its model, or no longer has the shape it had.  Accelerate's cpu_offload /
        disk_offload / dispatch_model after the edit replace an offloaded module's weight by a
        "meta" one and keep its values in a hook (a copy, on disk or on another device), and
        assigning a new Parameter does the same, so copying the saved values into the old Parameter
        would not reach the model (undo returned True and the offloaded model kept the edit).  A
        weight whose data was replaced in place by one of another shape (`p.data = ...`) failed
        its copy with torch's bare size message after the weights restored before it (restored
        latest first), leaving the model half undone and the handle live."""
        model = self._edited_model()
        if model is None:
            return
        held = {id(p) for _, p in model.named_parameters(remove_duplicate=False)}
        gone = [w for w, _ in self._saved if id(w) not in held]
        if gone:
            shapes = ", ".join(str(tuple(w.shape)) for w in gone)
            raise RuntimeError(
                f"{len(gone)} of the {len(self._saved)} weights this edit changed ({shapes}) are no longer "
                "parameters of the model: replaced since the edit (by accelerate's offloading, which keeps "
                "their values in its hooks and a 'meta' tensor in the module, by load_state_dict(assign=True), "
                "or by assigning a new Parameter), so restoring them would not reach the model; nothing was "
                "restored (undo before offloading or replacing the model's weights)")
        resized = [(tuple(w.shape), tuple(saved.shape)) for w, saved in self._saved if w.shape != saved.shape]
        if resized:
            shapes = ", ".join(f"{now} (was {was})" for now, was in resized)
            raise RuntimeError(
                f"{len(resized)} of the {len(self._saved)} weights this edit changed have another shape "
                f"now: {shapes}; their saved values no longer fit, so nothing was restored")

    def keep(self) -> None:
        """Make this edit permanent and free what undo needed (a copy of every edited weight, held
        until undo or keep while the model lives).  Earlier edits of the model can no longer be
        undone afterwards: restoring their saved values would wipe this one, so their copies are
        freed too (they were held, unusable, until each earlier handle's own keep()), and they
        leave the model's live-edit list, where this edit stays as what their undo meets.  Applied
        and kept edit after edit, the list held every kept handle for the model's lifetime (~1.4 KB
        each, MEND on the tiny Llama, and each keep() walked all of them).  A RuntimeError after
        undo(): the edit is no longer in the model (keep() did nothing, and a caller took the model
        for edited); after the model was freed, nothing.  RuntimeError, keeping nothing, while
        another thread edits the model (`one_editing_thread`: the live-edit list it changes is the
        one that thread's apply or undo reads)."""
        if self._undone:
            raise RuntimeError("this edit was undone (handle.undo() or leaving its with block): there is "
                               "nothing to keep; apply it again to keep it")
        model = self._edited_model()
        with deferred_interrupt(), one_editing_thread(model, "EditHandle.keep"):
            self._keep()

    def _keep(self) -> None:
        if self.active and not self.kept:
            self.kept = True
            self._saved = []
            self._unwatch()
            below = self._live.index(self) if self in self._live else 0
            for handle in self._live[:below]:
                handle._saved = []
                handle._unwatch()
            del self._live[:below]

    def _discard(self) -> None:
        """Forget a handle whose edit failed (its weights were restored): no longer live."""
        self.active = False
        self._unwatch()
        if self in self._live:
            self._live.remove(self)

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Undo on leaving `with handle:` unless the edit was kept inside the block (as `edited()`
        does); an exception leaving the block is never replaced by an error of the undo (it gets a note;
        a Ctrl-C during the undo is raised once the undo is done).
        Only this edit is undone: a later edit still live (applied inside the block) makes the undo
        raise RuntimeError, reverse order, and leaves both applied; `editor.edited(requests)` undoes
        the block's later edits too."""
        if self.kept:
            return
        if exc is None:
            self.undo()
            return
        try:
            self.undo()
        except Exception as undo_exc:  # noqa: BLE001 (a MemoryError replaced the block's error)
            add_note(exc, f"dcedit: on leaving the EditHandle's block: {type(undo_exc).__name__}: {undo_exc}")


_LATER_EDIT_KEPT = ("a later edit of this model was kept (handle.keep()): undoing this one would wipe it, "
                    "so it can no longer be undone")


def _model_freed(handle_ref, saved: list) -> None:
    """The model of a live edit was freed: drop the saved weights, and the edit is no longer live."""
    saved.clear()
    handle = handle_ref()
    if handle is not None:
        handle.active = False
        handle._release = None


@torch.no_grad()
def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy saved values back, latest first (a weight shifted twice ends at its first value); a
    Ctrl-C meanwhile waits until every weight is back."""
    with deferred_interrupt():
        for weight, previous in reversed(saved):
            weight.copy_(previous)


# The live (applied, not yet undone) edits of each model, latest last, shared by every ModelEditor
# of that model: undoing out of order would restore values saved before a later edit.
LIVE_EDITS: "weakref.WeakKeyDictionary[nn.Module, list[EditHandle]]" = weakref.WeakKeyDictionary()


def live_edits(model) -> int:
    """How many edits of `model` (its `weights_owner`) are live: applied by a ModelEditor and neither
    undone nor kept (a kept edit is the model's for good)."""
    if not isinstance(model, nn.Module):  # measure_edit takes any editor with a `model`
        return 0
    return sum(h._restorable() for h in LIVE_EDITS.get(weights_owner(model), ()))


def warn_live_edits(model, what: str, consequence: str) -> None:
    """A UserWarning from `what` when `model` holds live edits: `consequence` says what they change
    (fit, measure_edit and evaluate_method took the edited model for the unedited one without a
    word).  An edit made permanent on purpose (`keep()`) is not live and says nothing."""
    n = live_edits(model)
    if n:
        warn(f"{what}: the model holds {n} live edit{'s' if n > 1 else ''} (applied by a ModelEditor, "
             f"neither undone nor kept): {consequence}; undo {'them' if n > 1 else 'it'} first "
             "(handle.undo(), latest first, or leave the edited() block), or handle.keep() to make "
             f"{'them' if n > 1 else 'it'} part of the model on purpose", UserWarning)


# {model (its weights_owner): (the thread editing it: apply, undo, fit; the calls it is inside,
# outermost first, each as (its name, the code of the function inside whose `with` block it runs))}
_EDITING: "weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[tuple[str, object], ...]]]" = weakref.WeakKeyDictionary()
_EDITING_LOCK = threading.Lock()
APPLY_CALL = "ModelEditor.apply"


class one_editing_thread:
    """`with one_editing_thread(model, what):` RuntimeError naming `what`, before anything changes,
    when another thread is inside a block of this for the same model (`weights_owner`).  Two threads
    editing one model at once (two ModelEditors of it) ran each other's capture hooks and froze and
    unfroze each other's parameters: confusing errors, the weights left changed with no live edit
    and every parameter left frozen.  The same thread may nest them (fit's validation applies and
    undoes edits), but not inside an apply (`APPLY_CALL`): one called from a hook or callback of the
    apply's own passes over the model ran inside its capture ("ran more than once inside one
    capture"), or, under FT, edited the model the outer apply then restored, wiping the inner edit
    while its handle stayed live.  model=None: nothing to check.

    Each block is recorded with the code of the function running it, and a record no frame of
    its thread's stack runs (this thread: above the caller) is dropped when the model is next
    checked: a Ctrl-C landing in a block's exit before it held SIGINT back (or a thread that died
    inside one) left the model marked for good, and every later apply, undo or fit of it refused
    ("called while ModelEditor.apply of this model runs in this thread", "another thread is editing
    this model").  (Code, not frames: a frame's id is taken again by the next call at the same
    depth, and a frame held here holds its locals, the model among them.)  This takes the frame that
    enters the block to stay on the stack until the block ends: a plain `with` in a function body,
    as every caller here is; not a @contextmanager generator or an ExitStack holding it open."""

    def __init__(self, model: nn.Module | None, what: str):
        self.model, self.what = model, what

    def __enter__(self) -> None:
        model = self.model
        if model is None:
            return
        me = threading.get_ident()
        caller = sys._getframe(1)
        with _EDITING_LOCK:
            thread, inside = _EDITING.get(model, (me, ()))
            inside = _still_running(thread, inside, caller)
            if not inside:
                thread = me
            if thread != me:
                raise RuntimeError(f"{self.what}: another thread is editing this model (apply, undo or fit); one "
                                   "model is edited by one thread at a time (README \"Threads\")")
            if any(name == APPLY_CALL for name, _ in inside):
                raise RuntimeError(f"{self.what}: called while {APPLY_CALL} of this model runs in this thread (from a "
                                   "hook or callback inside its passes over the model); edit the model after that "
                                   "apply returns")
            self.inside = inside
            _EDITING[model] = (me, inside + ((self.what, caller.f_code),))

    def __exit__(self, *exc) -> None:
        if self.model is None:
            return
        # A Ctrl-C here left the model marked as edited by this thread for good (see the class
        # docstring for the instant before this holds SIGINT back).
        with deferred_interrupt(), _EDITING_LOCK:
            if self.inside:
                _EDITING[self.model] = (threading.get_ident(), self.inside)
            else:
                _EDITING.pop(self.model, None)


_STACK_READS = 4


def _codes_on(frame) -> set:
    """The code objects of `frame` and every frame below it."""
    running = set()
    while frame is not None:
        running.add(frame.f_code)
        frame = frame.f_back
    return running


def _still_running(thread: int, inside: tuple, caller) -> tuple:
    """The records of `inside`, outermost first, up to the first whose code no frame of `thread`'s
    stack runs (for this thread, the frames above `caller`, the block being entered): a block that
    ended without its exit (a Ctrl-C at its start) is stale, and so is every record nested in it.
    (A frame running that code for another model keeps a stale record: the refusal it gave before.)"""
    if not inside:
        return inside
    if thread == threading.get_ident():
        running = _codes_on(caller.f_back)
    else:
        # Another thread's stack, read from here while it runs, can come back cut short (its f_back
        # chain ends early; a thread busy inside a @contextmanager: 12 reads in 16,820 on CPython
        # 3.11.7, 27 in 19,611 on 3.10, 1 in 12-20 thousand on 3.12 and 3.13), and a live apply's
        # record judged stale let a second thread's capture run beside the first ("ran more than
        # once inside one capture"; 6 of 213,201 checks of a looping apply's record).  A record is
        # dropped only when it is missing from every one of several reads, the thread let run
        # between them (0 of 217,103); a thread that has ended has no stack.
        running = set()
        for attempt in range(_STACK_READS):
            if attempt:
                time.sleep(0)  # let the thread run on: a cut-short read does not repeat
            frame = sys._current_frames().get(thread)
            if frame is None:
                break
            codes = _codes_on(frame)
            if all(record[1] in codes for record in inside):
                return inside
            running |= codes
    kept = []
    for record in inside:
        if record[1] not in running:
            break
        kept.append(record)
    return tuple(kept)


def weights_owner(model: nn.Module) -> nn.Module:
    """The module that holds `model`'s weights, which keys its live edits (and whose freeing ends
    them): `torch.compile(model)` (an OptimizedModule) holds the model it compiled as `_orig_mod`,
    so ModelEditors of the compiled model and of the model itself share one list of live edits
    (keyed by each wrapper, they had two: an edit made through one could be undone before a later
    edit made through the other, and both undone left the model edited).  So do peft's PeftModel and
    its tuner (LoraModel) hold the model they put adapter layers into (`_peft_base`): a helper's
    trials, edits through a PeftModel and through its base model both undone, left the model edited.  Other
    wrappers (a module holding the model as an attribute) are not recognised: a ModelEditor of the
    wrapper and one of the model keep two lists (README "Failures and undo" says to build them on
    one module).  Sharing lists by containment would also need each handle to watch the innermost
    module (a freed wrapper frees its handles' saved weights), so it is left."""
    while True:
        inner = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else _peft_base(model)
        if inner is None:
            return model
        model = inner


def _peft_base(model: nn.Module) -> nn.Module | None:
    """The model a peft wrapper adapts, None for any other module: a PeftModel's `get_base_model()`
    (looked up on its class: PeftModel forwards unknown attributes to the model it wraps), and a
    tuner's (LoraModel, ...: `peft_model.base_model`, a peft BaseTuner) `model`, the model it put its
    adapter layers into.  Asked of peft's own classes only: the names are common enough elsewhere."""
    kind = type(model)
    if not kind.__module__.startswith("peft."):
        return None
    if callable(getattr(kind, "get_base_model", None)):
        base = model.get_base_model()
    elif any(c.__name__ == "BaseTuner" and c.__module__.startswith("peft.") for c in kind.__mro__):
        base = model._modules.get("model")
    else:
        return None
    return base if isinstance(base, nn.Module) and base is not model else None


@contextlib.contextmanager
def deferred_interrupt():
    """Hold SIGINT back until the block ends (then raise it as usual), so that a weight written in
    place is always recorded in its saved list before a KeyboardInterrupt can unwind; SIGTERM too
    where a Python handler takes it (`dcedit`'s, which raises as Ctrl-C does).  A no-op off the main
    thread, where Python delivers no signals, and for a signal with no Python handler to defer to
    (SIG_DFL / SIG_IGN, or one set outside Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(sig))]
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append((signum, frame))) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signum, frame = pending[0]
            previous[signum](signum, frame)


def add_note(exc: BaseException, text: str) -> None:
    """``exc.add_note(text)``.  Python 3.10 has no add_note and its tracebacks print no notes: there
    the text goes to ``exc.__notes__`` as PEP 678 defines it (what 3.11 sets, for a caller that
    reads it) and is warned, so that an undo that failed is not lost without a word."""
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(text)
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = exc.__notes__ = []
    notes.append(text)
    warn(text, RuntimeWarning)
