"""Model-based random sequences of edits: a shadow of what the weights and handles should be,
checked bit for bit after every step of a random interleaving of apply (every method, failing
requests, injected failures), undo (in and out of order, twice), keep, `edited()` / `with handle:`
/ `lowrank_edited` blocks nested with applies, several ModelEditors of one model, deepcopy /
pickle of an editor (the copy a world of its own, sometimes dropped: its live edits then end),
a handle copied alone (deepcopy / pickle), save / load, `model.to(dtype)`, a training step (`fit`,
with validation sometimes) and `evaluate.measure_edit`, on the tiny GPT-2, Llama, BART and T5.
The caller's own state moves between steps too: train/eval flags (the model's or one submodule's),
requires_grad flags, `.grad` tensors, forward hooks on any module, applies under torch.no_grad(),
and an edited weight replaced by a new Parameter (then put back); no step may change that state.

The rules the shadow follows are the documented ones (README "Failures and undo", the docstrings of
`model_editor` and `edit_handle`):
  * a live edit is undone only when it is the model's latest live edit (else RuntimeError, nothing
    changed); undo of an undone edit returns False; undo of a kept edit, or of one below a kept one,
    raises RuntimeError;
  * keep() makes an edit permanent and pins every earlier one (they leave the live-edit list);
    keep() of an undone edit raises RuntimeError;
  * a failed apply (bad request, any exception mid-edit, a non-finite shift) changes nothing;
  * `edited()` undoes on exit the live edits applied inside its block, latest first, down to a kept
    one, then its own unless kept (RuntimeError when a later kept edit pinned it);
  * undo restores the saved values, cast to the weight's dtype of the moment (`model.to(dtype)`);
  * fit and measure_edit leave the weights and the live edits as they were;
  * nothing changes the caller's requires_grad flags, .grad tensors, train flags or hooks;
  * undo of an edit whose weight was replaced since (no longer the model's Parameter) raises
    RuntimeError and restores nothing; put back, the Parameter undoes as before.
An apply may also be refused with FloatingPointError (stacked edits of random editors overflow the
capture's gradients) or, inside `lowrank_edited`, by its patched forwards (one row per row_edit
entry); either must change nothing, and the offline run tallies them.

Run many seeds offline: `python tests/test_edit_sequences.py [first_seed] [n_seeds] [steps]`.
The committed test runs a few seeds only.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import re
import sys
import tempfile
import warnings

if __name__ == "__main__":  # as conftest.py sets it, before dcedit_kernels imports its Triton modules
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from dcedit_kernels.edit_handle import LIVE_EDITS, weights_owner  # noqa: E402
from dcedit_kernels.editors.grouped_edit import GroupedEdit  # noqa: E402
from dcedit_kernels.lowrank_layers import lowrank_edited  # noqa: E402
from dcedit_kernels.model_editor import ModelEditor  # noqa: E402
from dcedit_kernels.models import tiny_model  # noqa: E402
from dcedit_kernels.requests import EditRequest  # noqa: E402

from test_model_editor import LAYERS, SEQ2SEQ_LAYERS, random_requests, randomize_editors  # noqa: E402

METHODS = ["mend", "raeditor", "moeditor", "proeditor", "ft", "ft_kl"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


REFUSED: dict = {}  # offline tally: applies refused (FloatingPointError, inside lowrank_edited)


class Injected(Exception):
    """An exception the sequence raises on purpose (mid-edit, or from a block's body)."""


class Entry:
    """The shadow of one EditHandle: its state and the values undo must restore."""

    def __init__(self, handle, before: dict, tag: str, params: dict | None = None):
        self.handle, self.before, self.tag = handle, before, tag
        self.state = "live"  # live | kept | pinned (below a kept one) | undone
        self.params = params or {}  # weight key -> id of the Parameter the edit changed

    def __repr__(self):
        return f"<{self.tag} {self.state}>"


class World:
    """One model, its ModelEditors, and the shadow: expected weights, live-edit stack, open blocks."""

    def __init__(self, name, model, tok, arch, editors, expected, stack, entries):
        self.name, self.model, self.tok, self.arch = name, model, tok, arch
        self.editors, self.expected, self.stack, self.entries = editors, expected, stack, entries
        self.fitted = False
        self.blocks = []  # open context managers, innermost last: (kind, cm, entry or None, outer stack)
        self.caller = caller_state(model)  # what the caller set: no step may change it
        self.replaced = {}  # weight key -> (module, the caller's original Parameter), while replaced


class Counter:
    """A caller's forward hook (a class, so that a model that holds one pickles)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


def caller_state(model) -> dict:
    """The state a caller sets and an edit must leave alone: each parameter's requires_grad and .grad,
    each module's train flag and hook counts."""
    return dict(
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        modes={n: m.training for n, m in model.named_modules()},
        hooks={n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
               for n, m in model.named_modules()})


def parameter_ids(model) -> dict:
    return {n: id(p) for n, p in model.named_parameters()}


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def layer_keys(editor) -> list[str]:
    return [name + ".weight" for name in editor.layers]


class Sequence:
    def __init__(self, seed: int, steps: int, log=None):
        self.seed, self.steps = seed, steps
        self.gen = torch.Generator().manual_seed(seed)
        self.log = log if log is not None else []
        self.worlds: list[World] = []
        self.tmp = tempfile.TemporaryDirectory()
        self.counter = 0

    # -- random draws ------------------------------------------------------------------------------
    def randint(self, lo, hi):  # [lo, hi]
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def choice(self, items):
        return items[self.randint(0, len(items) - 1)]

    def chance(self, p):
        return float(torch.rand(1, generator=self.gen)) < p

    # -- building ----------------------------------------------------------------------------------
    def new_editor(self, world: World, method=None):
        seq2seq = world.arch in SEQ2SEQ_LAYERS  # FT+KL and editor training: causal LMs only
        method = method or self.choice([m for m in METHODS if not (seq2seq and m == "ft_kl")])
        names = (LAYERS | SEQ2SEQ_LAYERS)[world.arch]
        k = self.randint(1, len(names))
        perm = torch.randperm(len(names), generator=self.gen)[:k].sort().values.tolist()
        layers = [names[i] for i in perm]
        if method in ("ft", "ft_kl"):
            kwargs = dict(ft_steps=self.randint(1, 2), ft_stop_loss=None if self.chance(0.5) else 0.5)
        else:
            kwargs = dict(rank=self.randint(2, 5), edit_lr=0.1, tokens=self.choice(["all", "target"]))
            if self.chance(0.3):
                kwargs["loss_reduction"] = "edit"
            elif self.chance(0.3):
                kwargs["rescale_batch_size"] = self.randint(1, 3)
            if method in ("raeditor", "moeditor"):
                kwargs["n_editors"] = self.randint(1, 3)
            if method in ("raeditor", "proeditor") and self.chance(0.5):
                kwargs["seed"] = self.randint(0, 100)
        me = ModelEditor(world.model, world.tok, layers, method=method,
                         capture_batch_size=self.choice([None, 1, 2, 32]), **kwargs)
        if method not in ("ft", "ft_kl"):
            randomize_editors(me, self.gen)
        world.editors.append(me)
        self.log.append(f"{world.name}: new editor {method} {layers}")
        return me

    def new_world(self):
        arch = self.choice(["gpt2", "llama", "gpt2", "llama", "bart", "t5"])
        model, tok = tiny_model(arch, seed=self.randint(0, 1000))
        world = World(f"w{len(self.worlds)}", model, tok, arch, [], snapshot(model), [], [])
        self.worlds.append(world)
        self.log.append(f"{world.name}: new world {arch}")
        for _ in range(self.randint(1, 2)):
            self.new_editor(world)
        return world

    # -- checks ------------------------------------------------------------------------------------
    def check(self, world: World, where: str):
        actual = world.model.state_dict()
        assert set(actual) == set(world.expected), where
        for k, v in actual.items():
            e = world.expected[k]
            assert v.dtype == e.dtype, f"{where}: {k} dtype {v.dtype} != {e.dtype}"
            assert torch.equal(v, e), f"{where}: {k} differs from the expected weights"
        live = LIVE_EDITS.get(weights_owner(world.model), [])
        assert [id(h) for h in live] == [id(e.handle) for e in world.stack], \
            f"{where}: live list {live} != shadow {world.stack}"
        for me in world.editors:
            assert me._live is live or not live, f"{where}: an editor's live list is not the model's"
        for e in world.entries:
            h = e.handle
            flags = (h.active, h.kept, bool(h._saved))
            want = {"live": (True, False, True), "kept": (True, True, False),
                    "pinned": (True, False, False), "undone": (False, False, False)}[e.state]
            assert flags == want, f"{where}: {e} has (active, kept, saved) {flags}, expected {want}"
        now = caller_state(world.model)
        for key in ("flags", "modes") + (() if any(kind == "lowrank" for kind, *_ in world.blocks) else ("hooks",)):
            assert now[key] == world.caller[key], f"{where}: the caller's {key} changed: " + str(
                {k: (world.caller[key].get(k), v) for k, v in now[key].items() if world.caller[key].get(k) != v})
        for k, grad in now["grads"].items():
            want = world.caller["grads"][k]
            assert (grad is None) == (want is None) and (grad is None or torch.equal(grad, want)), \
                f"{where}: the caller's .grad of {k} changed"
        if not any(kind == "lowrank" for kind, *_ in world.blocks):
            for name, module in world.model.named_modules():
                assert "forward" not in module.__dict__, f"{where}: {name} kept a patched forward"

    def check_all(self, where):
        for world in self.worlds:
            self.check(world, where)

    # -- the shadow's rules ------------------------------------------------------------------------
    def expect_undo(self, world: World, entry: Entry):
        """What undo(entry) must do: 'false', 'raise', or 'undo' (the shadow updated)."""
        if entry.state == "undone":
            return "false"
        if entry.state in ("kept", "pinned"):
            return "raise"
        if world.stack[-1] is not entry:
            return "raise"
        ids = parameter_ids(world.model)
        if any(ids.get(k) != i for k, i in entry.params.items()):  # a weight replaced since: restores nothing
            return "raise"
        dtype_now = {k: v.dtype for k, v in world.expected.items()}
        for k, v in entry.before.items():
            world.expected[k] = v.to(dtype_now[k])
        world.stack.pop()
        entry.state = "undone"
        return "undo"

    def expect_keep(self, world: World, entry: Entry):
        if entry.state == "live":
            i = world.stack.index(entry)
            for below in world.stack[:i]:
                if below.state == "live":
                    below.state = "pinned"
            del world.stack[:i]
            entry.state = "kept"
        elif entry.state == "pinned":
            entry.state = "kept"

    def frozen(self, world: World):
        """Everything a refused operation must leave as it was."""
        return ([(e, e.state, e.handle.active, e.handle.kept, len(e.handle._saved)) for e in world.entries],
                list(world.stack), {k: v.clone() for k, v in world.expected.items()})

    def assert_unchanged(self, world: World, frozen, where):
        entries, stack, expected = frozen
        # The states recorded before the operation (e.state read now would compare it with itself).
        assert [(e, state) for e, state, *_ in entries] == [(e, e.state) for e in world.entries], where
        assert world.stack == stack, where
        assert world.expected.keys() == expected.keys() and all(
            torch.equal(world.expected[k], v) for k, v in expected.items()), f"{where}: the shadow changed"
        for e, _, active, kept, n_saved in entries:
            assert (e.handle.active, e.handle.kept, len(e.handle._saved)) == (active, kept, n_saved), \
                f"{where}: a refused operation changed {e}"
        self.check(world, where)

    # -- actions -----------------------------------------------------------------------------------
    def requests(self):
        return random_requests(self.gen, self.randint(1, 3), locality=self.chance(0.5))

    def record_apply(self, world: World, me, handle, before_expected, tag) -> Entry:
        """After a successful apply: only the editor's layers changed; the shadow takes the result."""
        after = snapshot(world.model)
        keys = set(layer_keys(me))
        for k, v in after.items():
            if k not in keys:
                assert torch.equal(v, before_expected[k]), f"{tag}: apply changed {k}, not an edited layer"
        ids = parameter_ids(world.model)
        entry = Entry(handle, {k: before_expected[k].clone() for k in keys}, tag, {k: ids[k] for k in keys})
        world.expected = after
        world.stack.append(entry)
        world.entries.append(entry)
        return entry

    def do_apply(self, world: World):
        me = self.choice(world.editors)
        self.counter += 1
        tag = f"{world.name}.h{self.counter}({me.method})"
        self.log.append(f"{world.name}: apply {tag}")
        before = {k: v.clone() for k, v in world.expected.items()}
        no_grad = self.chance(0.3)  # apply turns grad on for its own passes (README)
        if no_grad:
            self.log.append(f"{world.name}: (under torch.no_grad())")
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            handle = self.try_apply(world, lambda: me.apply(self.requests()))
        return None if handle is None else self.record_apply(world, me, handle, before, tag)

    def try_apply(self, world: World, fn):
        """fn()'s handle, or None where it was refused under lowrank_edited (and changed nothing)."""
        frozen = self.frozen(world)
        try:
            return fn()
        except Exception as exc:
            # A documented refusal: stacked edits of random editors can overflow the capture's
            # gradients (FloatingPointError).  Under lowrank_edited the patched forwards take one
            # row per row_edit entry, so an edit batch of another size fails; nothing else may (an
            # FT+KL apply raised torch's "backward through the graph a second time" here, seed
            # 1003).  Either must change nothing.
            if isinstance(exc, FloatingPointError):
                key = f"FloatingPointError ({world.model.lm_head.weight.dtype}, fit: {world.fitted})"
            elif any(k == "lowrank" for k, *_ in world.blocks) and isinstance(exc, RuntimeError) \
                    and "lowrank_edited needs one row_edit entry per batch row" in str(exc):
                key = "under lowrank_edited: " + re.sub(r"'[^']*'|\(.*?\)", "", str(exc))[:70]
            else:
                raise
            REFUSED[key] = REFUSED.get(key, 0) + 1
            self.assert_unchanged(world, frozen, f"after an apply refused ({key})")
            return None

    def do_failed_apply(self, world: World):
        me = self.choice(world.editors)
        kinds = ["empty target", "not a request", "no requests", "exception in a forward", "interrupt in a forward"]
        if me.method not in ("ft", "ft_kl"):
            kinds += ["exception mid-shift"]
            if not any(k == "lowrank" for k, *_ in world.blocks):  # its edits hold views of α
                kinds += ["nan alpha"]
        kind = self.choice(kinds)
        self.log.append(f"{world.name}: failed apply ({kind}, {me.method})")
        frozen = self.frozen(world)
        reqs = self.requests()
        undo_patch = []
        if kind == "empty target":
            reqs.insert(self.randint(0, len(reqs)), EditRequest("a prompt", ""))
        elif kind == "not a request":
            reqs.append(("a prompt", "a target"))
        elif kind == "no requests":
            reqs = []
        elif kind in ("exception in a forward", "interrupt in a forward"):
            calls, at = [0], self.randint(0, 1)
            module = world.model.get_submodule(me.layers[-1])
            error = Injected if kind.startswith("exception") else KeyboardInterrupt

            def hook(mod, args, output):
                calls[0] += 1
                if calls[0] > at:
                    raise error("in a forward")

            undo_patch.append(module.register_forward_hook(hook).remove)
        elif kind == "exception mid-shift":
            calls, at, original = [0], self.randint(0, len(me.layers) - 1), GroupedEdit.apply_

            def apply_(edit, weight):
                if calls[0] == at:
                    raise Injected("mid-shift")
                calls[0] += 1
                return original(edit, weight)

            GroupedEdit.apply_ = apply_
            undo_patch.append(lambda: setattr(GroupedEdit, "apply_", original))
        elif kind == "nan alpha":
            editor = self.choice(list(me.editors.values()))
            saved = editor.alpha.detach().clone()
            with torch.no_grad():
                editor.alpha.fill_(float("nan"))

            def put_back():
                with torch.no_grad():
                    editor.alpha.copy_(saved)

            undo_patch.append(put_back)
        before = {k: v.clone() for k, v in world.expected.items()}
        raised = None
        try:
            handle = me.apply(reqs)
        except (ValueError, Injected, FloatingPointError, RuntimeError, KeyboardInterrupt) as exc:
            raised = exc
        finally:
            for fn in undo_patch:
                fn()
        if raised is None:
            assert kind.endswith("in a forward"), f"a failed apply ({kind}) did not raise"
            self.counter += 1  # a capture of one pass, or FT that stopped early: the hook never raised
            self.record_apply(world, me, handle, before, f"{world.name}.h{self.counter}({me.method})")
            return
        lowrank = any(k == "lowrank" for k, *_ in world.blocks)
        if kind.endswith("in a forward") and not isinstance(raised, (Injected, KeyboardInterrupt, FloatingPointError)) \
                and not lowrank:
            raise AssertionError(f"expected the injected exception, got {raised!r}")
        self.assert_unchanged(world, frozen, f"after a failed apply ({kind})")

    def do_undo(self, world: World):
        if not world.entries:
            return
        entry = self.choice(world.entries)
        self.log.append(f"{world.name}: undo {entry}")
        frozen = self.frozen(world)
        want = self.expect_undo(world, entry)
        if want == "false":
            assert entry.handle.undo() is False
        elif want == "raise":
            with pytest.raises(RuntimeError):
                entry.handle.undo()
            self.assert_unchanged(world, frozen, f"after a refused undo of {entry}")
        else:
            assert entry.handle.undo() is True

    def do_keep(self, world: World):
        if not world.entries:
            return
        entry = self.choice(world.entries)
        self.log.append(f"{world.name}: keep {entry}")
        if entry.state == "undone":
            with pytest.raises(RuntimeError, match="this edit was undone"):
                entry.handle.keep()
            return
        self.expect_keep(world, entry)
        entry.handle.keep()

    def open_block(self, world: World):
        if world.replaced:
            return  # its exit could meet an edit stuck on a replaced weight: not modelled
        kind = self.choice(["edited", "edited", "handle", "lowrank"])
        me = self.choice(world.editors)
        if kind == "lowrank":
            editor_me = [e for e in world.editors if e.method not in ("ft", "ft_kl")]
            if not editor_me:
                return
            me = self.choice(editor_me)
            # The block's editor, this second draw (the log named the first one, which misled: a
            # "ProEditor" block was a MoEditor's with rescale_batch_size, seed 1003).
            self.log.append(f"{world.name}: open lowrank ({me.method} {me.layers}, "
                            f"rescale_batch_size={me.rescale_batch_size})")
            reqs = self.requests()
            batch = me.tokenize([r.prompt for r in reqs], [r.target for r in reqs])
            captured = self.try_apply(world, lambda: me.capture(batch))  # under another lowrank_edited
            if captured is None:
                return
            factors, feats, _ = captured
            edits = me.edits_as_applied(factors, feats)
            rows = torch.randint(-1, len(reqs), (self.randint(1, 4),), generator=self.gen)
            cm = lowrank_edited(world.model, edits, rows)
            cm.__enter__()
            world.blocks.append(("lowrank", cm, None, list(world.stack)))
            return
        self.log.append(f"{world.name}: open {kind} ({me.method})")
        outer = list(world.stack)
        before = {k: v.clone() for k, v in world.expected.items()}
        self.counter += 1
        tag = f"{world.name}.h{self.counter}({me.method},{kind})"
        if kind == "edited":
            cm = me.edited(self.requests())
            handle = self.try_apply(world, cm.__enter__)
        else:
            handle = cm = self.try_apply(world, lambda: me.apply(self.requests()))
            assert handle is None or cm.__enter__() is handle
        if handle is None:
            return
        entry = self.record_apply(world, me, handle, before, tag)
        world.blocks.append((kind, cm, entry, outer))

    def close_block(self, world: World):
        if not world.blocks:
            return
        kind, cm, entry, outer = world.blocks.pop()
        raising = self.chance(0.3)
        self.log.append(f"{world.name}: close {kind} {entry} {'raising' if raising else ''}")
        exc = Injected("from the body") if raising else None
        args = (Injected, exc, None) if raising else (None, None, None)
        if kind == "lowrank":
            if raising:
                with pytest.raises(Injected):
                    if not cm.__exit__(*args):
                        raise exc
            else:
                cm.__exit__(*args)
            return
        # The shadow: what exit must undo, and whether it raises.
        err = False
        if kind == "edited":
            while world.stack and world.stack[-1] is not entry and world.stack[-1].state != "kept" \
                    and not any(world.stack[-1] is o for o in outer):
                self.expect_undo(world, world.stack[-1])
            if entry.state == "live":
                if world.stack[-1] is entry:
                    self.expect_undo(world, entry)
                else:
                    err = True
            elif entry.state == "pinned":
                err = True
        else:  # `with handle:` undoes its own edit unless kept
            if entry.state != "kept":
                err = self.expect_undo(world, entry) == "raise"
        if raising:
            with pytest.raises(Injected) as info:
                if not cm.__exit__(*args):
                    raise exc
            notes = getattr(info.value, "__notes__", [])
            if sys.version_info >= (3, 11):
                assert bool(notes) == err, f"{kind} exit: notes {notes}, expected an error: {err}"
        elif err:
            with pytest.raises(RuntimeError):
                cm.__exit__(*args)
        else:
            cm.__exit__(*args)

    def do_second_editor(self, world: World):
        if len(world.editors) < 4:
            self.new_editor(world)

    def do_copy(self, world: World):
        how = self.choice(["deepcopy", "pickle"])
        me = self.choice(world.editors)
        if any(kind == "lowrank" for kind, *_ in world.blocks):
            return  # a model inside lowrank_edited has patched forwards: not copied here
        if world.replaced:
            return  # the copy would hold the replacing Parameters, and the shadow no originals
        self.log.append(f"{world.name}: {how} of a {me.method} editor")
        new = copy.deepcopy(me) if how == "deepcopy" else pickle.loads(pickle.dumps(me))
        assert new.model is not world.model
        # The copy's live edits are the original's, in order; the shadow copies the entries.
        assert len(new._live) == len(world.stack)
        stack, entries = [], []
        ids, copied_ids = parameter_ids(world.model), parameter_ids(new.model)
        for h, e in zip(new._live, world.stack):
            # An edit stuck on a Parameter replaced since (and put back) stays stuck in the copy.
            params = {k: copied_ids[k] if ids[k] == i else -1 for k, i in e.params.items()}
            c = Entry(h, {k: v.clone() for k, v in e.before.items()}, e.tag + "'", params)
            c.state = e.state
            stack.append(c)
            entries.append(c)
        copy_world = World(f"{world.name}'", new.model, new.tokenizer, world.arch, [new],
                           {k: v.clone() for k, v in world.expected.items()}, stack, entries)
        # The copy's flags and modes are the original's; torch copies no .grad with a Parameter.
        assert {k: copy_world.caller[k] for k in ("flags", "modes")} == {k: world.caller[k] for k in ("flags", "modes")}
        self.worlds.append(copy_world)
        self.check(copy_world, f"after {how}")
        self.check(world, f"after {how} (the original)")

    def do_copy_handle(self, world: World):
        """A handle copied alone (deepcopy, pickle): a live one is refused (TypeError, or an unpickled
        copy's undo raises); any other copies and its copy answers as the shadow says; the world stays."""
        if not world.entries:
            return
        entry = self.choice(world.entries)
        how = self.choice(["deepcopy", "pickle"])
        self.log.append(f"{world.name}: {how} of the handle {entry}")
        frozen = self.frozen(world)
        if how == "deepcopy" and entry.state == "live":
            with pytest.raises(TypeError, match="copied with its ModelEditor"):
                copy.deepcopy(entry.handle)
        else:
            new = copy.deepcopy(entry.handle) if how == "deepcopy" else pickle.loads(pickle.dumps(entry.handle))
            if entry.state == "undone":
                assert new.undo() is False
                with pytest.raises(RuntimeError, match="this edit was undone"):
                    new.keep()
            else:  # live (unpickled alone), kept, pinned: nothing a copy could restore
                with pytest.raises(RuntimeError):
                    new.undo()
        self.assert_unchanged(world, frozen, f"after a {how} of the handle {entry}")

    def do_save_load(self, world: World):
        me = self.choice(world.editors)
        path = os.path.join(self.tmp.name, f"e{self.counter}.safetensors")
        self.counter += 1
        self.log.append(f"{world.name}: save/load of a {me.method} editor")
        me.save(path)
        state = torch.random.get_rng_state()
        loaded = ModelEditor.load(path, world.model, world.tok, capture_batch_size=me.capture_batch_size)
        assert torch.equal(torch.random.get_rng_state(), state), "load moved torch's global generator"
        a, b = me.state_tensors(), loaded.state_tensors()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        # editor_kwargs gain the arguments whose default changed (MoEditor's top_k, gate_norm), as saved
        a, b = me.config(), loaded.config()
        assert {**a, "editor_kwargs": None} == {**b, "editor_kwargs": None}
        assert a["editor_kwargs"].items() <= b["editor_kwargs"].items()
        world.editors.append(loaded)

    def do_fit(self, world: World):
        """One training step of an editor: the model's weights and live edits stay as they were."""
        if any(kind == "lowrank" for kind, *_ in world.blocks):
            return
        trainable = [me for me in world.editors if me.method not in ("ft", "ft_kl") and not me.seq2seq]
        if not trainable or any(v.dtype in (torch.float16,) for v in world.expected.values()):
            return
        me = self.choice(trainable)
        self.log.append(f"{world.name}: fit of a {me.method} editor")
        frozen = self.frozen(world)
        world.fitted = True
        val = random_requests(self.gen, 2) if self.chance(0.5) else None  # validation applies edited()
        try:
            me.fit(random_requests(self.gen, 2), val, steps=1, batch_size=2, progress=False)
        except FloatingPointError:  # the validation's edit of a model whose loss overflows: refused
            REFUSED["fit: FloatingPointError"] = REFUSED.get("fit: FloatingPointError", 0) + 1
        self.assert_unchanged(world, frozen, "after fit")

    def do_measure(self, world: World):
        """evaluate.measure_edit applies, scores and undoes: the weights and live edits stay."""
        from dcedit_kernels.evaluate import measure_edit

        if any(kind == "lowrank" for kind, *_ in world.blocks):
            return
        me = self.choice(world.editors)
        self.log.append(f"{world.name}: measure_edit with a {me.method} editor")
        frozen = self.frozen(world)
        reqs = random_requests(self.gen, self.randint(1, 3))
        try:
            measure_edit(me, reqs, batch_size=self.randint(1, 4))
        except FloatingPointError:
            pass
        self.assert_unchanged(world, frozen, "after measure_edit")

    def do_to_dtype(self, world: World):
        if any(kind == "lowrank" for kind, *_ in world.blocks) or world.replaced:
            return
        dtype = self.choice(DTYPES)
        self.log.append(f"{world.name}: model.to({dtype})")
        world.model.to(dtype)
        world.expected = {k: v.to(dtype) if v.is_floating_point() else v for k, v in world.expected.items()}
        world.caller["grads"] = caller_state(world.model)["grads"]  # torch converts .grad with its Parameter

    def do_caller(self, world: World):
        """The caller changes its own state: train/eval, requires_grad, .grad, a forward hook."""
        what = self.choice(["modes", "flags", "grads", "hooks"])
        model = world.model
        if what == "modes":
            names = [n for n, _ in model.named_modules()]
            module = model if self.chance(0.5) else model.get_submodule(self.choice(names))
            module.train(self.chance(0.5))
        elif what == "flags":
            for p in model.parameters():
                p.requires_grad_(self.chance(0.5))
        elif what == "grads":
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=self.gen).to(p.dtype) if self.chance(0.3) else None
        else:
            if any(kind == "lowrank" for kind, *_ in world.blocks):
                return  # the block's own hooks are on the model: the counts are read after it
            name = self.choice([n for n, _ in model.named_modules()])
            module = model.get_submodule(name)
            (module.register_forward_pre_hook if self.chance(0.5) else module.register_forward_hook)(Counter())
        self.log.append(f"{world.name}: the caller's {what}")
        hooks = world.caller["hooks"]  # counted without an open lowrank_edited block's own hooks
        world.caller = caller_state(model)
        if any(kind == "lowrank" for kind, *_ in world.blocks):
            world.caller["hooks"] = hooks

    def do_replace(self, world: World):
        """The caller replaces an edited layer's weight by a new Parameter of the same values (undo of an
        edit that changed the old one then refuses), or puts a replaced one back."""
        if world.blocks:
            return
        if world.replaced and self.chance(0.6):
            self.put_back(world, self.choice(sorted(world.replaced)))
            return
        name = self.choice(sorted({n for me in world.editors for n in me.layers}))
        key = name + ".weight"
        if key in world.replaced:
            return
        module = world.model.get_submodule(name)
        self.log.append(f"{world.name}: replace {key}")
        original = module.weight
        module.weight = torch.nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
        module.weight.grad = None if original.grad is None else original.grad.clone()
        world.replaced[key] = (module, original)
        world.caller = caller_state(world.model)

    def put_back(self, world: World, key: str):
        """The caller's original Parameter back in its module (with the values it had when replaced)."""
        module, original = world.replaced.pop(key)
        self.log.append(f"{world.name}: put back {key}")
        module.weight = original
        world.expected[key] = original.detach().clone()
        world.caller = caller_state(world.model)

    def do_drop_world(self):
        """Free a copied world's model: its live edits end (undo returns False)."""
        import gc

        copies = [w for w in self.worlds[1:] if not w.blocks]
        if not copies:
            return
        world = self.choice(copies)
        self.log.append(f"{world.name}: dropped")
        self.worlds.remove(world)
        entries = world.entries
        world.model = world.editors = world.expected = world.stack = None
        del world
        gc.collect()
        for e in entries:
            if e.state in ("live", "undone"):
                assert e.handle.undo() is False, f"{e} of a freed model undid"

    # -- the run -----------------------------------------------------------------------------------
    def run(self):
        self.new_world()
        self.check_all("start")
        actions = [(self.do_apply, 6), (self.do_failed_apply, 3), (self.do_undo, 6), (self.do_keep, 1),
                   (self.open_block, 3), (self.close_block, 3), (self.do_second_editor, 1), (self.do_copy, 1),
                   (self.do_save_load, 1), (self.do_to_dtype, 1), (self.do_fit, 1),
                   (self.do_measure, 1), (self.do_copy_handle, 1), (self.do_caller, 3), (self.do_replace, 1)]
        weights = torch.tensor([w for _, w in actions], dtype=torch.float)
        for step in range(self.steps):
            world = self.choice(self.worlds)
            if self.chance(0.02) and len(self.worlds) > 1:
                self.do_drop_world()
                continue
            action = actions[int(torch.multinomial(weights, 1, generator=self.gen))][0]
            action(world)
            self.check_all(f"step {step} ({self.log[-1] if self.log else ''})")
        for world in self.worlds:  # close every block, then undo what is live, latest first
            while world.blocks:
                self.close_block(world)
                self.check(world, "closing")
            for key in sorted(world.replaced):
                self.put_back(world, key)
            while world.stack and world.stack[-1].state == "live":
                entry = world.stack[-1]
                if self.expect_undo(world, entry) == "raise":  # it changed a replacing Parameter, gone since
                    with pytest.raises(RuntimeError, match="no longer parameters of the model"):
                        entry.handle.undo()
                    break
                assert entry.handle.undo() is True
                self.check(world, "final undo")
        self.tmp.cleanup()


def run_seed(seed: int, steps: int) -> list[str]:
    log: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = torch.random.get_rng_state()
    # Editors built without `seed` take their initial weights (and a RaEditor its routing) from
    # torch's global generator, which nothing seeded: a seed's tallies changed from run to run (1112
    # refused 1, 6 or 7 applies).  Seeded from the sequence's seed (another stream than `gen`'s, as
    # conftest's), a seed replays exactly, offline or under pytest, whatever ran before it.
    torch.manual_seed(seed ^ 0x9E3779B97F4A7C15)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Sequence(seed, steps, log).run()
    except BaseException as exc:
        tail = "\n".join(log[-25:])
        raise AssertionError(f"seed {seed}: {exc!r}\nlast steps:\n{tail}") from exc
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
    return log


@pytest.mark.parametrize("seed", range(6))
def test_random_edit_sequences_keep_the_documented_invariants(seed):
    run_seed(seed, steps=60)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes (NaNs compare equal, ±0 do not)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def same_states(a, b) -> bool:
    """Whether two recordings (nested lists, tuples, dicts of tensors) hold the same bits."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(bits(a), bits(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_states(x, y) for x, y in zip(a, b))
    return a == b


def test_a_seed_replays_whatever_torchs_global_generator_held(monkeypatch):
    """Editors built without `seed` draw their initial weights from torch's global generator, which
    run_seed did not seed: seed 1112 refused 1, 6 or 7 applies from run to run (the first step where
    two runs differed was the start, the first editor's weights).  Two runs of one seed, the global
    generator left elsewhere by what ran before, see the same weights and editors at every step, and
    leave the generator as they found it."""
    runs: list[list] = []  # per run, per check: each world's weights and editors
    check_all = Sequence.check_all

    def recording(self, where):
        runs[-1].append([(w.name, snapshot(w.model), [me.state_tensors() for me in w.editors])
                         for w in self.worlds])
        check_all(self, where)

    monkeypatch.setattr(Sequence, "check_all", recording)
    for before in (0, 1):
        torch.manual_seed(before)
        state = torch.random.get_rng_state()
        runs.append([])
        run_seed(1112, steps=8)
        assert torch.equal(torch.random.get_rng_state(), state), "run_seed moved torch's global generator"
    assert len(runs[0]) == len(runs[1])
    for step, (a, b) in enumerate(zip(*runs)):
        assert same_states(a, b), f"check {step}: the runs' weights or editors differ"


if __name__ == "__main__":
    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    failures = 0
    for seed in range(first, first + n):
        try:
            run_seed(seed, steps)
        except AssertionError as exc:
            failures += 1
            print(f"FAIL {exc}\n", flush=True)
    print(f"{n} seeds x {steps} steps, {failures} failed")
    print("refused applies:", REFUSED)
