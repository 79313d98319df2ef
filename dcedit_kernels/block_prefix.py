"""Run the edited pass's locality rows from the lowest edited block, on what the KL reference pass
computed below it.

Editor training runs each locality row twice: through the unedited model for the KL's reference,
then through the edited model.  The edited layers sit in the top blocks (MEND and the paper edit
the last MLPs), and below the lowest edited block k both passes compute the same thing: blocks
0..k−1 see no edit.  `PrefixReuse.record` keeps what block k−1 returned in a reference pass, and
`PrefixReuse.reuse` makes blocks 0..k−1 return it, computing nothing, in the edited pass over the
same rows (the same rows in the same order and width, so the same tensors): that pass runs blocks
k.. only.  The FT baselines use it too: every fine-tuning step runs the same rows through the
same lower blocks (`ft_baseline`).  Training's passes run without a KV cache (`no_kv_cache`): a
cache is state shared by the blocks, which skipped blocks would leave unfilled.

A block can only be skipped by replacing its forward (a hook cannot stop it), so what makes this
safe is checking, not a rule about architectures.  It is used only where:
- every edited module sits in one nn.ModuleList of blocks (a name `<list>.<index>.…`), the lowest
  at an index k > 0, and none of them is also a module of blocks 0..k−1 (shared weights);
- every module of the model is in eval mode (dropout would draw other masks) and no parameter of
  blocks 0..k−1 requires grad (their gradients would lose the locality rows' share);
- blocks 0..k−1 carry no forward hooks (a hook would run again on the recorded output) but
  Transformers' own output-collecting ones, and no global module hooks are set;
- in each reference pass the hooks saw blocks 0..k called once each, in order, each block j ≥ 1
  on the very tensor block j−1 returned, at the pass's (rows, width); no lower block changed a
  tensor argument in place, nor block k−1's output changed after it was returned; and nothing a
  lower block returned besides the hidden state, nor any non-tensor object (a dict, a cache) a
  lower block received and filled, was handed to a block ≥ k (RWKV's recurrent state, Gemma 4's
  shared K/V);
- the recorded hidden state needs no grad (a graph in it would be freed by the first backward);
- the recorded hidden state is unchanged when its edited pass comes (`reusable`: a block may
  return a view of a buffer that a later pass overwrites);
- on the model's first recorded pass, a full forward over other rows and then the reference pass
  run again on the recorded output gave the same log-probabilities bit for bit (`confirm`): what
  no hook sees, such as a model that reads a lower block's output after the blocks or keeps state
  on its modules, shows there.  A model that fails is not reused again (a warning says so).  On a
  GPU whose kernels are not run-to-run deterministic this check would fail (not measured).
Otherwise the edited pass runs the rows through every block, as before.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Sized
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from ._warn import warn
from .compiled_calls import eager_compiled_calls, has_stances, runs_compiled
from .edit_handle import deferred_interrupt
from .patched_forwards import patched_forwards
from .scored_logits import logits_at
from .tied_weights import shared_parameters
from .tokenize import is_seq2seq, no_kv_cache

# Transformers 5 puts hooks on the blocks that collect hidden states or attentions when a forward
# asks for them (output_hidden_states=...); the training passes never ask, so they do nothing.
_INERT_HOOK_MODULES = ("transformers.utils.output_capturing",)

# {model: {k: whether the reference pass reusing blocks 0..k−1 gave the full pass's result}}.
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, dict[int, bool]]" = weakref.WeakKeyDictionary()

# {model: the lock its reuses hold}: two threads' reuses of one model's blocks (scoring runs in
# several threads on one model) overlapped, and the first to leave took the other's patched forwards
# away while the last put the first's back, for good.  One after the other, each puts back what was
# there.  Reentrant: a pass inside a reuse may score the model again in the same thread.
_REUSE_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_REUSE_LOCKS_LOCK = threading.Lock()


def _reuse_lock(model: nn.Module):
    with _REUSE_LOCKS_LOCK:
        return _REUSE_LOCKS.setdefault(model, threading.RLock())


def _for_thread(thread: int, forward: Callable, own: Callable) -> Callable:
    """`forward` for calls from `thread`; another thread's call (a pass of its own over the model
    meanwhile) runs the block's `own` forward, as the kept output is not of its rows."""
    def from_thread() -> bool:
        return threading.get_ident() == thread

    # Untraced on a compiled model: dynamo cannot trace get_ident and warned at the first reused
    # block ("Dynamo does not know how to trace the builtin `_thread.get_ident`", FT `apply` of a
    # compiled tiny Llama); a disabled call breaks the graph there without a word.  Without
    # torch._dynamo imported nothing is compiled, and disabling would import it.
    if "torch._dynamo" in sys.modules:
        from_thread = torch.compiler.disable(from_thread)

    def dispatch(*args, **kwargs):
        return (forward if from_thread() else own)(*args, **kwargs)
    return dispatch


def _no_hook(*args, **kwargs) -> None:
    """A hook that changes nothing (another thread's call, `_for_thread`)."""
    return None


def _out_of_memory(error: Exception) -> bool:
    """Whether `error` is running out of memory: torch's OutOfMemoryError (a GPU's), Python's
    MemoryError, or the RuntimeError of a failed CPU allocation ("DefaultCPUAllocator: can't
    allocate memory", torch 2.5-2.13)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


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


def _hidden_arg(args: tuple, kwargs: dict):
    """The hidden state a block was called on: its first positional argument or `hidden_states`."""
    return args[0] if args else kwargs.get("hidden_states")


def _items(values: Iterable) -> list:
    """The values, with tuples and lists opened one level (position embeddings come as (cos, sin)),
    Nones and plain constants left out."""
    out = []
    for value in values:
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if item is not None and not isinstance(item, (bool, int, float, str, torch.dtype, torch.device)):
                out.append(item)
    return out


class _Chain:
    """What one reference pass's hooks saw, checked as they fire (so only the last hidden state is
    held, not every block's)."""

    def __init__(self, k: int):
        self.k, self.next, self.ok = k, 0, True
        self.hidden = None  # what the last lower block returned as its hidden state
        self.output, self.version = None, None  # block k−1's output, its hidden state's _version
        self.args: list[tuple[torch.Tensor, int]] = []  # the running block's tensor arguments
        self.handed: list = []  # what must not reach a block ≥ k (see the module docstring)
        self.reached_k = False
        self.input_shape = None  # the shape of block 0's hidden-state argument

    def before_lower(self, j: int, args: tuple, kwargs: dict) -> None:
        hidden = _hidden_arg(args, kwargs)
        self.ok &= j == self.next and not self.reached_k and isinstance(hidden, torch.Tensor) \
            and (j == 0 or hidden is self.hidden)
        if not self.ok:
            return
        if j == 0:
            self.input_shape = tuple(hidden.shape)
        others = _items([*args[1:], *(v for v in kwargs.values() if v is not hidden)])
        # An inference tensor has no version counter, and cannot be changed outside inference mode.
        self.args = [(t, t._version) for t in others if isinstance(t, torch.Tensor) and not t.is_inference()]
        self.handed += [o for o in others if not isinstance(o, torch.Tensor)]

    def after_lower(self, j: int, output) -> None:
        hidden = _hidden(output)
        self.ok &= hidden is not None and all(t._version == v for t, v in self.args)
        if not self.ok:
            return
        self.handed += [o for o in _items(output[1:] if isinstance(output, (tuple, list)) else ())]
        self.hidden, self.next = hidden, j + 1
        if j == self.k - 1:
            self.output, self.version = output, hidden._version

    def before_upper(self, j: int, args: tuple, kwargs: dict) -> None:
        if not self.ok:
            return
        hidden = _hidden_arg(args, kwargs)
        if j == self.k:
            self.ok &= not self.reached_k and self.next == self.k and hidden is self.hidden
            self.reached_k = True
            # A container the lower blocks received but left empty (Gemma 4 hands every block its
            # K/V-sharing dict, filled only where K/V are shared) holds nothing they computed.
            self.handed = [h for h in self.handed if not (isinstance(h, Sized) and len(h) == 0)]
        received = _items([*args, *kwargs.values()])
        self.ok &= not any(r is h for r in received for h in self.handed if r is not hidden)

    def result(self, shape: tuple[int, int]):
        """Block k−1's output if the pass ran as the module docstring requires, else None."""
        if not (self.ok and self.reached_k and self.output is not None):
            return None
        hidden = _hidden(self.output)
        if hidden._version != self.version or tuple(hidden.shape[:2]) != shape:
            return None
        # An output that needs grad (a lower module under a caller's `lowrank_edited` of
        # differentiable edits) carries a graph that a backward running it frees: reused by the next
        # pass, its backward ran through it again and raised ("backward through the graph a second
        # time"; FT's did until it took its weights' gradients only), and the lower tensors'
        # gradients would miss the reused rows.
        if hidden.requires_grad:
            return None
        return self.output


class PrefixReuse:
    """The recorded outputs of block k−1, one per reference pass, keyed by the pass's rows.

    A key is a sequence of ints (a list or tuple; kept as a tuple), not any iterable: `run_from`
    reads it twice (`reusable`, then `record`), so a generator would be recorded under ()."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], k: int):
        self.model, self.blocks, self.k = model, blocks, k
        # {rows: (block k−1's output, its hidden state's _version when recorded, the shape of
        # block 0's hidden-state argument)}
        self.recorded: dict[tuple[int, ...], tuple[object, int, tuple[int, ...]]] = {}

    @classmethod
    def for_model(cls, model: nn.Module, modules: Mapping[str, nn.Module],
                  no_grad: bool = False) -> "PrefixReuse | None":
        """A PrefixReuse for these edited modules ({name: module}), or None where the model's
        structure, modes or an earlier `confirm` rule it out (see the module docstring).
        no_grad: for passes that run without grad (scoring), where a lower weight that requires
        grad loses nothing."""
        if not modules or any(m.training for m in model.modules()):
            return None
        found = {_block_of(model, name) for name in modules}
        if None in found or len({path for path, _ in found}) != 1:
            return None
        k = min(index for _, index in found)
        if k == 0 or _VERDICTS.get(model, {}).get(k) is False:
            return None
        blocks = list(model.get_submodule(next(iter(found))[0]))
        lower = {id(m) for block in blocks[:k] for m in block.modules()}
        if any(id(m) in lower for m in modules.values()) or any(id(b) in lower for b in blocks[k:]):
            return None
        if not no_grad and any(p.requires_grad for block in blocks[:k] for p in block.parameters()):
            return None
        return cls(model, blocks, k)

    @classmethod
    def for_written_weights(cls, model: nn.Module, modules: Mapping[str, nn.Module],
                            no_grad: bool = False) -> "PrefixReuse | None":
        """`for_model` for passes around edits written into the weights themselves (the FT
        baselines' steps, the scoring of an applied edit), where training's patched forwards leave
        them as they are: None also for an encoder-decoder, and where another parameter views an
        edited weight (allow_tied: a lower block may hold it, and the edit then changes that
        block's output too)."""
        if is_seq2seq(model) or any(shared_parameters(model, m) for m in modules.values()):
            return None
        return cls.for_model(model, modules, no_grad)

    def run_from(self, key: Sequence[int], shape: tuple[int, int]):
        """`reuse(key)` when the rows `key` were recorded, else `record(key, shape)`: the pass
        inside runs from the kept output of blocks 0..k−1, or through every block keeping it."""
        return self.reuse(key) if self.reusable(key) else self.record(key, shape)

    def _blocks_run_compiled(self) -> bool:
        """Whether a call of the model runs any of its blocks as compiled code (`runs_compiled`)."""
        return any(runs_compiled(self.model, block) for block in self.blocks)

    def _hooked(self) -> bool:
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        hooks = [h for block in self.blocks[:self.k] for h in (*block._forward_hooks.values(),
                                                               *block._forward_pre_hooks.values())]
        me = threading.get_ident()
        return any(getattr(h, "__module__", None) not in _INERT_HOOK_MODULES
                   and getattr(h, "_record_thread", me) == me for h in hooks)

    @contextlib.contextmanager
    def record(self, key: Sequence[int], shape: tuple[int, int]):
        """Inside the block, the model's reference pass over the rows `key` (indices, in the
        pass's order) of (rows, width) `shape`, run with `no_kv_cache(model)`; on a clean exit,
        block k−1's output is kept for `reuse(key)` when the pass ran as the module docstring
        requires."""
        key = tuple(key)
        self.recorded.pop(key, None)
        # Torch 2.5 has no stances, so a compiled model's pass runs compiled: these hooks were skipped
        # there, or under fullgraph=True failed the trace (FT+KL `apply` on the tiny Llama: dynamo's
        # Unsupported at `is_inference`, the edit undone); nothing is recorded on such a model.
        if (self._hooked() or _VERDICTS.get(self.model, {}).get(self.k) is False  # a failed `confirm`
                or (not has_stances() and self._blocks_run_compiled())):
            yield
            return
        chain = _Chain(self.k)
        # The hooks record this thread's pass only: another thread's pass over the model meanwhile
        # (scoring may run in several threads on one model, README "Threads") ran them too, and its
        # block-0 input taken for this pass's made the next reuse of these rows raise ValueError out
        # of the scoring call ("got a hidden state of shape (4, 33, 24), but the rows ... were
        # recorded at (3, 27, 24)"), or spoiled the record (tiny GPT-2, four scoring threads: 79
        # records and 117 reuses where 13 and 183 are due).
        thread = threading.get_ident()

        def own(hook):
            hook = _for_thread(thread, hook, _no_hook)
            hook._record_thread = thread  # `_hooked`: another thread's record hook does nothing here
            return hook

        handles = []
        try:
            # A Ctrl-C meanwhile waits until every registered hook's handle is kept (one landing
            # between a registration and its append left that hook on its block), and on exit until
            # every hook is off (one landing in the loop left the later ones on): as the capture's.
            with deferred_interrupt():
                for j, block in enumerate(self.blocks):
                    if j < self.k:
                        handles.append(block.register_forward_pre_hook(
                            own(lambda _m, args, kwargs, j=j: chain.before_lower(j, args, kwargs)), with_kwargs=True))
                        handles.append(block.register_forward_hook(
                            own(lambda _m, _args, out, j=j: chain.after_lower(j, out))))
                    else:
                        handles.append(block.register_forward_pre_hook(
                            own(lambda _m, args, kwargs, j=j: chain.before_upper(j, args, kwargs)), with_kwargs=True))
            # The pass runs compiled code eagerly, as the capture's (`compiled_calls.eager_compiled_calls`): dynamo
            # does not guard on module hooks, and a graph compiled without these ran for the blocks with
            # them, so none fired and nothing was kept.  Editor training of the tiny GPT-2 and Llama,
            # compiled (backend "eager") after two no-grad forwards of other shapes with frozen weights
            # (as a validation inside `fit` leaves it): the edited pass ran every block, and its KL and
            # 21-22 of the 22 editor gradients differed from the uncompiled copy's in the last bits;
            # scoring (`metrics.lower_blocks_kept`) after a forward of the same shape kept nothing.
            # Torch 2.5 has no stances: there a compiled model records nothing (above), which costs the
            # reuse only, so it is not refused as the capture does.
            with eager_compiled_calls():
                yield
        finally:
            with deferred_interrupt():
                for handle in handles:
                    handle.remove()
        output = chain.result(tuple(shape))
        if output is not None:
            self.recorded[key] = (output, _hidden(output)._version, chain.input_shape)

    def reusable(self, key: Sequence[int]) -> bool:
        """Whether `reuse(key)` may run: a recorded output whose hidden state nothing changed in
        place since (a block may return a view of a buffer that the next pass overwrites)."""
        output, version, _ = self.recorded.get(tuple(key), (None, None, None))
        return output is not None and _hidden(output)._version == version

    def confirm(self, key: Sequence[int], run: Callable[[dict], torch.Tensor], batch: dict,
                want: torch.Tensor | None) -> None:
        """On this model's first recorded pass (for this k): after a full forward over other rows
        (which leaves behind whatever state the model keeps on its modules), `run(batch)` (the
        reference pass over the pass's `batch`) inside `reuse(key)` must give `want`, its first
        result, bit for bit (the same tensors through the same kernels); if it does not, or
        raises, nothing is reused for this model from then on, with a warning.  want=None: the
        recorded pass returned nothing comparable (the fine-tuning's, with grad), and `run(batch)`
        runs first through every block to give it (only when the check runs); an error there, or
        running out of memory anywhere in the check, is raised, not taken as the reuse failing."""
        key = tuple(key)
        verdicts = _VERDICTS.setdefault(self.model, {})
        if not self.reusable(key) or self.k in verdicts:
            return
        ids, mask = batch["input_ids"], batch["attention_mask"]
        width = max(1, ids.shape[1] - 1)
        other_ids, other_mask = ids.flip(0)[:, :width], mask.flip(0)[:, :width]
        # The other rows' pass runs for the state it leaves on the blocks; nothing reads its logits,
        # so its head computes one position per row (scored_logits), not rows × width × V of them.
        one_per_row = torch.zeros(other_ids.shape, dtype=torch.bool, device=other_ids.device)
        one_per_row[:, 0] = True
        if want is None:  # the model's own reference pass, every block run: its failure is the caller's
            with torch.no_grad():
                want = run(batch)
        try:
            with torch.no_grad():
                with logits_at(self.model, one_per_row):
                    self.model(input_ids=other_ids, attention_mask=other_mask, **no_kv_cache(self.model))
                with self.reuse(key):
                    got = run(batch)
            same, why = torch.equal(got, want), "other log-probabilities"
            if not same and self._blocks_run_compiled():
                # The record ran the compiled blocks eagerly (`record`), the reused pass runs them
                # compiled: bit for bit only where the backend computes as eager does.  Inductor (the
                # default backend) did not on the tiny Llama (MEND and ProEditor steps, CPU).
                why += (" (its blocks run compiled, the skipped ones were recorded eagerly: a backend"
                        " that rounds apart from eager, such as the default inductor, gives other bits)")
        except Exception as error:  # any other failure of the check's passes means: do not reuse
            if _out_of_memory(error):
                # Says nothing of the reuse: caught, it turned the reuse off for this model for good
                # (a verdict), and the step went on to need more memory; raised, the edit or step fails
                # as it would without the check (a failed edit leaves the model as it was).
                raise
            same, why = False, f"{type(error).__name__}: {error}"
        verdicts[self.k] = same
        if not same:
            self.recorded.clear()
            warn(f"reuse_prefix: {type(self.model).__name__} gave {why} when blocks 0..{self.k - 1} "
                 "were skipped; its training runs every block for every row (block_prefix)")

    @contextlib.contextmanager
    def reuse(self, key: Sequence[int]):
        """Inside the block, blocks 0..k−1 return the output `record(key)` kept, computing nothing
        (their instance-level forwards, accelerate's included, are restored on exit).  Block 0
        called on a hidden state of another shape than in the recorded pass (other rows, another
        width) raises ValueError: the kept output is of the recorded batch.  Only this thread's
        passes get it (another thread's run every block), and two threads' reuses of one model run
        one after the other."""
        key = tuple(key)
        output, _, shape = self.recorded[key]

        def first(*args, **kwargs):
            hidden = _hidden_arg(args, kwargs)
            if isinstance(hidden, torch.Tensor) and tuple(hidden.shape) != shape:
                raise ValueError(f"reuse: block 0 got a hidden state of shape {tuple(hidden.shape)}, but the rows {key} "
                                 f"were recorded at {shape}: reuse runs the very rows record ran, at the same width")
            return output

        thread = threading.get_ident()
        with _reuse_lock(self.model), patched_forwards() as patch:
            for j, block in enumerate(self.blocks[:self.k]):
                patch(block, _for_thread(thread, first if j == 0 else lambda *args, **kwargs: output, block.forward))
            yield
