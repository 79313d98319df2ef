"""Rarer paths around the editors: ModelEditor and EditHandle, the FT baselines, the editor
cache, evaluate, metrics, the data loaders and tokenize (each branch a coverage audit found
untested)."""

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

import dcedit_kernels.edit_capture as edit_capture_module
from dcedit_kernels import editor_cache, metrics
from dcedit_kernels import evaluate as evaluate_module
from dcedit_kernels.capture import Factors
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.requests import EditRequest

from helpers import default_device, reset_default_device, seed_from
from test_model_editor import (  # noqa: F401 (one_thread: autouse fixture)
    LAYERS, assert_bit_identical, make_editor, one_thread, random_requests, snapshot,
)


# ---------------------------------------------------------------------------------------------
# model_editor.py / edit_capture.py / editor_checkpoint.py / edit_handle.py
# ---------------------------------------------------------------------------------------------
def test_model_must_be_a_module():
    _, tok = tiny_model("gpt2", seed=0)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got str"):
        ModelEditor("gpt2", tok, ["lm_head"])
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got dict"):
        ModelEditor.from_mend({}, tok, {}, ["lm_head.weight"])


def test_repr_of_a_baseline_shows_its_options_and_counts_its_texts(gen):
    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    me = ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft_kl", locality_texts=["one two", "three four"])
    text = repr(me)
    assert "method='ft_kl'" in text and "ft_options=" in text and "'locality_texts': '<2 texts>'" in text
    # "ft" without the FT+KL-only options, which it refuses as arguments (they were shown at their defaults)
    text = repr(ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft"))
    assert "method='ft'" in text and "ft_options=" in text and "locality_texts" not in text and "kl_weight" not in text
    assert "'kl_weight': 1.0" in repr(ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft_kl"))


@pytest.mark.parametrize("method", ["mend", "ft"])
def test_non_finite_edit_loss_leaves_model_untouched(method, gen, monkeypatch):
    """A non-finite edit loss raises FloatingPointError before anything changes (editor methods:
    the capture's check; FT: its own, with the weights restored)."""
    me = make_editor("llama", method, gen)
    before = snapshot(me.model)
    flags = {k: p.requires_grad for k, p in me.model.named_parameters()}
    original = edit_capture_module.edit_loss  # the capture's forward, which FT runs too (_scored_edit_loss)
    monkeypatch.setattr(edit_capture_module, "edit_loss", lambda *a, **k: original(*a, **k) * float("inf"))
    with pytest.raises(FloatingPointError, match="not finite"):
        me.apply(random_requests(gen, 2))
    assert_bit_identical(before, me.model)
    assert {k: p.requires_grad for k, p in me.model.named_parameters()} == flags
    assert not me._live


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["mend", "raeditor", "moeditor", "proeditor"])
def test_apply_on_layers_that_never_run_names_them_and_leaves_model_untouched(method, arch, gen):
    """Edit layers off the forward's path (a Linear the model holds but never calls): apply raised
    torch's RuntimeError "`inputs` argument to `grad()` cannot be empty" when none of them ran; now
    it names them ("did not run a forward pass inside the capture"), compute_factors too (it said
    "the loss does not depend on any captured module"), and the model is as it was."""
    from dcedit_kernels.capture import compute_factors

    model, tok = tiny_model(arch, seed=seed_from(gen))
    width = model.get_output_embeddings().in_features
    n = int(torch.randint(1, 3, (1,), generator=gen))
    for i in range(n):
        model.add_module(f"unused{i}", torch.nn.Linear(width, int(torch.randint(1, 40, (1,), generator=gen))))
    names = [f"unused{i}" for i in range(n)]
    me = ModelEditor(model, tok, names, method=method, rank=3, edit_lr=0.1)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"modules \['unused0'.*\] did not run a forward pass inside the capture"):
        me.apply(random_requests(gen, int(torch.randint(1, 4, (1,), generator=gen))))
    assert_bit_identical(before, model)
    assert not me._live and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    ids = torch.randint(3, 100, (2, 5), generator=gen)
    with pytest.raises(RuntimeError, match=r"did not run a forward pass inside the capture"):
        compute_factors(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids), names)


def test_an_index_error_unrelated_to_length_is_raised_as_it_is(gen, monkeypatch):
    """_length_errors turns an IndexError into a ValueError only for a row past the model's
    positions; any other IndexError is re-raised unchanged (and the model is left as it was)."""
    me = make_editor("gpt2", "mend", gen)
    before = snapshot(me.model)

    def failing(self, batch, saved):
        raise IndexError("index 7 is out of bounds (simulated)")

    monkeypatch.setattr(ModelEditor, "_apply_editors", failing)
    with pytest.raises(IndexError, match="simulated"):
        me.apply(random_requests(gen, 2))
    assert_bit_identical(before, me.model)
    assert not me._live


def test_a_row_exactly_at_the_position_limit_is_not_past_it():
    """positions.past_positions names a row only when it is longer than the model's positions: a
    row of exactly n_positions tokens fits the learned table, so an IndexError over its batch is
    not turned into a "more than the model's positions" ValueError."""
    from dcedit_kernels.positions import past_positions

    model, _ = tiny_model("gpt2", seed=0)
    limit = model.config.n_positions
    mask = torch.zeros(3, limit + 1, dtype=torch.long)
    mask[0, :2], mask[1, :limit], mask[2, :5] = 1, 1, 1
    assert past_positions(model, {"attention_mask": mask}, causal=True) is None
    mask[1, limit] = 1
    assert past_positions(model, {"attention_mask": mask}, causal=True) == (1, limit + 1, "prompt + target", limit)


def test_a_batch_without_rows_is_past_no_positions():
    """past_positions of a batch of no rows (an empty (0, L) mask, of the encoder or the decoder)
    is None: there is no row to name, and no max() over nothing."""
    from dcedit_kernels.positions import past_positions

    model, _ = tiny_model("gpt2", seed=0)
    empty = torch.zeros(0, 4, dtype=torch.long)
    assert past_positions(model, {"attention_mask": empty}, causal=True) is None
    assert past_positions(model, {"attention_mask": empty, "decoder_attention_mask": empty}, causal=False) is None


def test_past_positions_names_the_longest_row_and_the_prompt_before_the_target(gen):
    """Random batches of rows around the model's 128 positions, right- or left-padded, several past the
    limit, some of the same length: past_positions names the longest row (the first of equals), its
    token count, what it is and the limit, as a loop over the rows does: a causal LM's "prompt +
    target"; for BART the encoder's "prompt" when any encoder row is past the limit, even where a
    decoder row is longer, else the decoder's "target"; None when no row is past it, and always for
    T5 (no position table, no limit in its config)."""
    from dcedit_kernels.positions import past_positions

    def mask(lengths, width, left):
        m = torch.zeros(len(lengths), width, dtype=torch.long)
        for b, n in enumerate(lengths):
            if left:
                m[b, width - n:] = 1
            else:
                m[b, :n] = 1
        return m

    def longest_past(lengths, what, limit):
        named = None
        for b, n in enumerate(lengths):
            if n > limit and (named is None or n > named[1]):
                named = (b, n, what, limit)
        return named

    models = {arch: tiny_model(arch, seed=seed_from(gen))[0] for arch in ("gpt2", "bart", "t5")}
    named = 0
    for _ in range(30):
        B = int(torch.randint(1, 7, (1,), generator=gen))
        enc = torch.randint(120, 134, (B,), generator=gen).tolist()
        dec = torch.randint(120, 140, (B,), generator=gen).tolist()
        left = bool(torch.randint(0, 2, (1,), generator=gen))
        causal_batch = {"attention_mask": mask(enc, max(enc) + 2, left)}
        seq2seq_batch = {"attention_mask": mask(enc, max(enc), left), "decoder_attention_mask": mask(dec, max(dec), False)}
        limit = models["gpt2"].config.n_positions
        assert limit == models["bart"].config.max_position_embeddings == 128
        want = longest_past(enc, "prompt + target", limit)
        assert past_positions(models["gpt2"], causal_batch, causal=True) == want, (enc, left)
        want = longest_past(enc, "prompt", limit) or longest_past(dec, "target", limit)
        assert past_positions(models["bart"], seq2seq_batch, causal=False) == want, (enc, dec, left)
        assert past_positions(models["t5"], seq2seq_batch, causal=False) is None
        named += want is not None
    assert named > 0


def test_the_position_limit_is_an_int_from_the_config():
    """position_limit reads n_positions, else max_position_embeddings, as an int: a bool (True is
    an int to Python), a float, or no config is no limit (None)."""
    from types import SimpleNamespace

    from dcedit_kernels.positions import position_limit

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert position_limit(model(n_positions=None, max_position_embeddings=64)) == 64
    assert position_limit(model(n_positions=32)) == 32
    for bad in (True, 64.0, "64"):
        assert position_limit(model(max_position_embeddings=bad)) is None
    assert position_limit(SimpleNamespace()) is None


def test_an_edited_block_whose_edit_was_undone_inside_it(gen):
    me = make_editor("gpt2", "mend", gen)
    before = snapshot(me.model)
    with me.edited(random_requests(gen, 2)) as handle:
        assert handle.undo() is True
        assert_bit_identical(before, me.model)
    assert not handle.active and not me._live  # leaving did nothing more, and raised nothing
    assert_bit_identical(before, me.model)


def test_an_edited_block_undoes_edits_applied_after_its_own_was_undone(gen):
    """An edit applied inside edited() after the block's own edit was undone inside it: exit undoes
    it too ("edits applied inside the block that are still live are undone"), and leaves the
    edits from before the block alone."""
    me = make_editor("gpt2", "mend", gen)
    before = snapshot(me.model)
    outer = me.apply(random_requests(gen, 2))
    after_outer = snapshot(me.model)
    with me.edited(random_requests(gen, 2)) as handle:
        assert handle.undo() is True
        inner = me.apply(random_requests(gen, 2))
    assert not inner.active and outer.active and me._live == [outer]
    assert_bit_identical(after_outer, me.model)
    assert outer.undo()
    assert_bit_identical(before, me.model)


def test_an_edit_handle_is_a_context_manager(gen):
    me = make_editor("llama", "mend", gen)
    before = snapshot(me.model)
    with me.apply(random_requests(gen, 2)) as handle:
        assert handle.active and changed_any(before, me.model)
    assert not handle.active and not me._live
    assert_bit_identical(before, me.model)


def test_an_edit_handle_block_that_keeps_its_edit_leaves_it_applied(gen):
    """keep() inside `with handle:` keeps the edit, as inside `edited()`; leaving raised
    RuntimeError ("this edit was kept") instead."""
    me = make_editor("llama", "mend", gen)
    with me.apply(random_requests(gen, 2)) as handle:
        handle.keep()
        kept = snapshot(me.model)
    assert handle.kept
    assert_bit_identical(kept, me.model)


def test_an_exception_leaving_an_edit_handle_block_is_not_replaced(gen):
    """An exception leaving `with handle:` while a later edit is live: the undo refuses (out of
    order) and says so in a note, but the block's own exception propagates, as from `edited()`."""
    me = make_editor("gpt2", "mend", gen)
    with pytest.raises(KeyError, match="raised in the block") as raised:
        with me.apply(random_requests(gen, 2)) as handle:
            later = me.apply(random_requests(gen, 2))
            raise KeyError("raised in the block")
    assert any("undo the later edits first" in note for note in getattr(raised.value, "__notes__", []))
    assert handle.active and later.active
    assert later.undo() and handle.undo() and not me._live


class _ExceptionWithoutAddNote(Exception):
    """An exception as Python 3.10 makes them: no add_note (hasattr is False)."""

    @property
    def add_note(self):
        raise AttributeError("add_note")


def test_a_note_on_python_3_10_is_kept_in_notes_and_warned():
    """Python 3.10 has no add_note and prints no notes: the note that an undo failed was dropped
    there without a word (test_an_exception_leaving_an_edit_handle_block_is_not_replaced failed on
    3.10).  Now it goes to __notes__ (PEP 678) and is warned; on 3.11+ add_note does it all."""
    from dcedit_kernels.edit_handle import add_note

    exc = _ExceptionWithoutAddNote("raised")
    with pytest.warns(RuntimeWarning, match="first note"):
        add_note(exc, "first note")
    with pytest.warns(RuntimeWarning, match="second note"):
        add_note(exc, "second note")
    assert exc.__notes__ == ["first note", "second note"]
    native = KeyError("raised")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3.11+: add_note's own note, no warning
        if hasattr(native, "add_note"):
            add_note(native, "a note")
            assert native.__notes__ == ["a note"]


def changed_any(before, model):
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["mend", "ft"])
def test_edits_apply_and_undo_off_the_main_thread_and_with_sigint_ignored(method, gen, monkeypatch):
    """Weights are written and restored under `deferred_interrupt`, which installs a SIGINT handler:
    off the main thread (signal.signal raises ValueError there) or where SIGINT has no Python handler
    (SIG_IGN) it must do nothing, and the edit apply and undo as on the main thread."""
    import signal
    import threading

    me = make_editor("gpt2", method, gen, **({"ft_steps": 1} if method == "ft" else {}))
    before = snapshot(me.model)
    requests = random_requests(gen, 2)
    outcome = []

    def edit_and_undo():
        try:
            handle = me.apply(requests)
            outcome.append(any(not torch.equal(p, before[n]) for n, p in me.model.named_parameters()))
            outcome.append(handle.undo())
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            outcome.append(exc)

    worker = threading.Thread(target=edit_and_undo)
    worker.start()
    worker.join()
    assert outcome == [True, True], outcome
    assert_bit_identical(before, me.model)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        outcome.clear()
        edit_and_undo()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome == [True, True], outcome
    assert_bit_identical(before, me.model)


def test_a_second_thread_editing_the_same_model_is_refused_before_anything_changes(gen, monkeypatch):
    """One model is edited by one thread at a time (README "Threads"): a second ModelEditor of it,
    applying or undoing in another thread while the first thread's apply runs, raised errors about
    the capture ("ran on input of shape ...", "ran more than once inside one capture"), and 20
    rounds of edited() in each of two threads left the weights changed with no live edit and every
    parameter frozen.  Now the second thread's apply and undo (and keep, which changes the
    live-edit list the first thread's apply reads) raise RuntimeError saying so, before anything
    changes, and the first thread's edit is as it is alone."""
    import threading

    first = make_editor("llama", "mend", gen, seed=1)
    second = ModelEditor(first.model, first.tokenizer, LAYERS["llama"][:2], method="mend", rank=7, seed=2)
    before = snapshot(first.model)
    earlier = second.apply(random_requests(gen, 1))
    edited = snapshot(first.model)
    requests = random_requests(gen, 2)
    handle = first.apply(requests)
    want = snapshot(first.model)
    handle.undo()
    capturing, refused = threading.Event(), threading.Event()
    capture = type(first)._capture  # what apply and capture() both run

    def paused_capture(self, *args, **kwargs):
        if self is first:
            capturing.set()
            refused.wait(10.0)
        return capture(self, *args, **kwargs)

    monkeypatch.setattr(type(first), "_capture", paused_capture)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(first.apply(requests)))
    worker.start()
    assert capturing.wait(30.0)
    try:
        with pytest.raises(RuntimeError, match=r"^ModelEditor.apply: another thread is editing this model"):
            second.apply(random_requests(gen, 1))
        with pytest.raises(RuntimeError, match=r"^EditHandle.undo: another thread is editing this model"):
            earlier.undo()
        with pytest.raises(RuntimeError, match=r"^EditHandle.keep: another thread is editing this model"):
            earlier.keep()
        assert not earlier.kept
        with pytest.raises(RuntimeError, match=r"^ModelEditor.fit: another thread is editing this model"):
            second.fit(random_requests(gen, 2), steps=1)
    finally:
        refused.set()
        worker.join(60)
    assert_bit_identical(want, first.model)
    assert outcome[0].undo()
    assert_bit_identical(edited, first.model)
    assert earlier.undo()
    assert_bit_identical(before, first.model)
    assert all(p.requires_grad for p in first.model.parameters())


@pytest.mark.parametrize("method", ["mend", "ft"])
def test_an_apply_from_a_hook_inside_the_same_models_apply_is_refused(method, gen):
    """An apply (or undo) of a model called from a forward hook of that model while its own apply
    runs (same thread): MEND's raised "ran more than once inside one capture"; under FT the inner
    edit went in, the outer apply then failed and restored the weights it saved, wiping the inner
    edit while its handle stayed live.  The inner call now raises RuntimeError saying so, the outer
    apply fails with it and leaves the model as it was; afterwards edits run as usual."""
    me = make_editor("llama", method, gen)
    other = ModelEditor(me.model, me.tokenizer, LAYERS["llama"][:2], method="ft") if method == "mend" else me
    before = snapshot(me.model)
    calls, inner = [], random_requests(gen, 1)

    def hook(module, args, output):
        if not calls:
            calls.append(1)
            other.apply(inner)

    handle = me.model.register_forward_hook(hook)
    try:
        with pytest.raises(RuntimeError, match=r"ModelEditor.apply: called while ModelEditor.apply of this model runs "
                                               r"in this thread"):
            me.apply(random_requests(gen, 2))
    finally:
        handle.remove()
    assert calls and not me._live and not other._live
    assert_bit_identical(before, me.model)
    assert all(p.requires_grad for p in me.model.parameters())
    assert other.apply(inner).undo() and me.apply(random_requests(gen, 1)).undo()
    assert_bit_identical(before, me.model)


def test_load_state_tensors_names_a_key_of_the_wrong_shape(gen):
    me = make_editor("gpt2", "mend", gen)
    state = me.state_tensors()
    key = next(k for k, v in state.items() if v.dim() == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    with pytest.raises(ValueError, match=f"editor checkpoint key {key} has shape"):
        me.load_state_tensors(state)


# ---------------------------------------------------------------------------------------------
# ft_baseline.py
# ---------------------------------------------------------------------------------------------
# "Paris": a single string without whitespace, whose characters are each a non-empty string
@pytest.mark.parametrize("texts, says", [
    ("a single string", "locality_texts must be a list of non-empty strings"),
    ("Paris", "locality_texts must be a list of non-empty strings"),
    (["fine", 3], "locality_texts must be a list of non-empty strings"),
    # the blank one named (the message named no index)
    (["fine text", "  "], r"^locality_texts\[1\] must be a non-empty string, got '  '$"),
])
def test_ft_kl_locality_texts_are_checked(texts, says, gen):
    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    with pytest.raises(ValueError, match=says):
        ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft_kl", locality_texts=texts)


def test_ft_kl_locality_texts_with_a_lone_surrogate_are_refused_by_the_constructor(gen):
    """Half an emoji pair (JSON's "\\ud83c" escape loads as such a str) was taken, and `apply` then
    failed in the tokenizer with a TypeError naming nothing; a request's field is refused likewise."""
    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    message = r"^locality_texts\[1\] is not valid Unicode \(a lone surrogate '\\ud83c' at index 3\)"
    with pytest.raises(ValueError, match=message):
        ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft_kl", locality_texts=["fine", "abc\ud83c def"])


@pytest.mark.parametrize("bad", [dict(ft_steps=0), dict(ft_lr=0.0), dict(kl_weight=-0.5)])
def test_ft_arguments_just_past_their_bounds_are_refused(bad, gen):
    """ft_steps must be a positive int, ft_lr a positive number, kl_weight a non-negative one: the
    value just past each bound is a ValueError naming the argument, and the bounds' own side (1
    step, a tiny lr, kl_weight 0) is accepted.  The other checks try NaN, inf and bool only:
    mutants accepting ft_steps=0, ft_lr=0 or a negative kl_weight passed every other test."""
    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft_kl", **bad)
    ModelEditor(model, tok, LAYERS["gpt2"][:1], method="ft_kl", ft_steps=1, ft_lr=1e-30, kl_weight=0.0)


def test_ft_kl_refuses_a_seq2seq_model(gen):
    model, tok = tiny_model("bart", seed=seed_from(gen))
    with pytest.raises(ValueError, match="method 'ft_kl' supports causal LMs only"):
        ModelEditor(model, tok, ["model.decoder.layers.0.fc2"], method="ft_kl")
    ModelEditor(model, tok, ["model.decoder.layers.0.fc2"], method="ft")  # plain FT is fine


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ft_kl_locality_texts_are_the_scored_texts(arch, gen):
    """FT+KL's KL text of a request is its locality prompt and target joined as the metrics score
    them (`causal_pair_ids`): a target starting with whitespace gets no extra space (the KL read
    "is  blue", two spaces, where NS and DD read "is blue")."""
    from dcedit_kernels.ft_baseline import locality_texts
    from dcedit_kernels.tokenize import causal_pair_ids, text_ids

    _, tok = tiny_model(arch, seed=seed_from(gen))
    pick = lambda options: options[int(torch.randint(0, len(options), (1,), generator=gen))]  # noqa: E731
    requests = []
    for _ in range(6):
        prompt = pick(["The sky is", "The sky is ", "Paris:\n", "Emoji 😀"])
        target = pick([" blue", "\nblue", "blue", "  grey", ", said Ana"])
        requests.append(EditRequest("ab", "cd", locality=prompt, locality_target=target))
    requests.append(EditRequest("ab", "cd", locality="no target here"))
    texts = locality_texts(requests)
    for r, text in zip(requests[:-1], texts):
        assert text_ids(tok, text) == causal_pair_ids(tok, r.locality, r.locality_target)[0], (r, text)
    assert texts[-1] == "no target here"


@pytest.mark.parametrize("method", ["ft", "ft_kl"])
def test_ft_step_that_makes_a_weight_non_finite_restores(method, gen):
    """Finite gradients and a finite fp32 master step (SGD, lr 1e10), but the step overflows the
    fp16 weights it is copied into: FloatingPointError naming the layer, every weight restored bit
    for bit, flags and .grad as they were."""
    me = make_editor("llama", method, gen, dtype=torch.float16, ft_optimizer="sgd", ft_lr=1e10, ft_steps=1,
                     ft_stop_loss=None)
    before = snapshot(me.model)
    flags = {k: p.requires_grad for k, p in me.model.named_parameters()}
    with pytest.raises(FloatingPointError, match="the fine-tuned weight of layer .* is not finite"):
        me.apply(random_requests(gen, 2))
    assert_bit_identical(before, me.model)
    assert {k: p.requires_grad for k, p in me.model.named_parameters()} == flags
    assert all(p.grad is None for p in me.model.parameters())
    assert not me._live


@pytest.mark.parametrize("with_locality", [True, False])
def test_ft_kl_backpropagates_each_mean_at_its_own_token_counts_scale(with_locality, gen, monkeypatch):
    """FT+KL's two means are backpropagated at their per-token sums' scales (backward_scale, so
    that fp16 gradients do not flush to zero): the edit loss at the batch's target-token count, the
    KL at the locality texts' token count (the requests' locality prompts, else locality_texts)."""
    from dcedit_kernels import ft_baseline, losses

    seen = []
    monkeypatch.setattr(ft_baseline, "backward_scale", lambda n: (seen.append(n), losses.backward_scale(n))[1])
    reqs = random_requests(gen, 3, locality=with_locality)
    texts = ["Many people enjoy reading a good book on a quiet evening at home.", "The train left late."]
    me = make_editor("gpt2", "ft_kl", gen, ft_steps=1, ft_stop_loss=None, locality_texts=texts)
    me.apply(reqs).undo()
    batch = me.tokenize([r.prompt for r in reqs], [r.target for r in reqs])
    n_locality = int(me._locality_batch(me._locality_texts(reqs))["attention_mask"].sum())
    assert seen == [me._n_scored(batch), n_locality]


# ---------------------------------------------------------------------------------------------
# editor_cache.py
# ---------------------------------------------------------------------------------------------
def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DCEDIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert editor_cache.cache_dir() == tmp_path / "xdg" / "dcedit_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert editor_cache.cache_dir() == Path.home() / ".cache" / "dcedit_kernels"
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path / "mine"))
    assert editor_cache.cache_dir() == tmp_path / "mine"


def test_cache_dir_expands_a_home_relative_setting(monkeypatch, tmp_path):
    """DCEDIT_CACHE_DIR="~/cache" (from an env file, or quoted in a shell, neither of which expands
    it) made a folder named "~" in the working folder, where DCEDIT_DATA_DIR="~/data" is expanded
    (a docstring audit's find). Both variables are expanded now, $XDG_CACHE_HOME too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DCEDIT_CACHE_DIR", "~/cache")
    assert editor_cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("DCEDIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert editor_cache.cache_dir() == tmp_path / "xdg" / "dcedit_kernels"


def test_an_empty_dcedit_cache_dir_counts_as_unset(monkeypatch, tmp_path):
    """DCEDIT_CACHE_DIR set to "" (exported empty) falls back to $XDG_CACHE_HOME as an unset one
    does, rather than giving Path(""), the current folder, as the cache."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert editor_cache.cache_dir() == tmp_path / "xdg" / "dcedit_kernels"


def _train_cached(gen_seed, tmp_path, **extra):
    model, tok = tiny_model("llama", seed=gen_seed)
    reqs = random_requests(torch.Generator().manual_seed(gen_seed), 2)
    return editor_cache.trained_editor(model, tok, "mend", ["model.layers.1.mlp.down_proj"], dict(rank=3, seed=1),
                                       dict(steps=1, batch_size=2), reqs, [r.prompt for r in reqs],
                                       str(tmp_path / "model.gguf"), progress=False, **extra)


def test_trained_editor_still_returns_the_editor_when_the_cache_cannot_be_written(gen, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path / "a_file" / "cache"))  # mkdir fails under a file
    me, info = _train_cached(seed_from(gen), tmp_path)
    assert isinstance(me, ModelEditor) and info["cached"] is False and info["steps"] == 1
    assert "could not cache the editor" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "3", "[" * 100000 + "]" * 100000],
                         ids=["not_json", "list", "number", "nested"])
def test_a_cached_editor_with_an_unreadable_info_file_still_loads(text, gen, tmp_path, monkeypatch):
    """An info file that is not JSON, or JSON but no object (a list, a number: AttributeError on its
    .get), or JSON nested too deep for json (its RecursionError; session 54's fuzz of the loaders),
    is no reason to retrain: the cached editor loads, without the earlier run's info."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path / "cache"))
    seed = seed_from(gen)
    trained, info = _train_cached(seed, tmp_path)
    assert info["cached"] is False
    Path(info["path"]).with_suffix(".json").write_text(text)
    loaded, info2 = _train_cached(seed, tmp_path)
    assert info2["cached"] is True and info2["train_s"] == 0.0 and info2["trained_earlier_s"] is None
    a, b = trained.state_tensors(), loaded.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_editor_reports_the_training_time_of_the_run_that_cached_it(gen, tmp_path, monkeypatch):
    """A cached editor's info: train_s 0.0 (nothing trained now), trained_earlier_s the train_s its
    info file recorded, and the earlier run's steps."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path / "cache"))
    seed = seed_from(gen)
    _, info = _train_cached(seed, tmp_path)
    assert info["cached"] is False and info["train_s"] > 0
    _, info2 = _train_cached(seed, tmp_path)
    assert info2["cached"] is True and info2["train_s"] == 0.0 and info2["steps"] == 1
    assert info2["trained_earlier_s"] == info["train_s"]


def test_random_routing_twin_refusals(gen):
    model, tok = tiny_model("llama", seed=seed_from(gen))
    layers = ["model.layers.1.mlp.down_proj"]
    mend = ModelEditor(model, tok, layers, method="mend", rank=3)
    with pytest.raises(ValueError, match="method 'moeditor', got 'mend'"):
        editor_cache.random_routing_twin(mend)
    mo = ModelEditor(model, tok, layers, method="moeditor", n_editors=2, rank=3, norm=False)
    with pytest.raises(ValueError, match="the MoEditor has no .*build the RaEditor with the MoEditor's arguments"):
        editor_cache.random_routing_twin(mo, n_editors=2, rank=3)  # the twin has running norms, the MoEditor none


# ---------------------------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------------------------
def test_unedited_scores_are_the_metrics_of_the_unedited_model(gen):
    model, tok = tiny_model("llama", seed=seed_from(gen))
    reqs = random_requests(gen, 4)
    before = snapshot(model)
    scores = evaluate_module.unedited_scores(model, tok, reqs, batch_size=3)
    assert scores["es"] == metrics.edit_success(model, tok, reqs)
    assert scores["reliability"] == metrics.reliability(model, tok, reqs)
    assert scores["ns"] == metrics.neighbourhood_success(model, tok, reqs)
    assert scores["dd"] == 0.0 and scores["lmp"] == scores["es"]
    bare = [EditRequest(r.prompt, r.target) for r in reqs]
    assert evaluate_module.unedited_scores(model, tok, bare) == dict(
        es=None, reliability=scores["reliability"], dd=None, lmp=None, ns=None)
    # Rephrases but no locality prompt: DD and LMP are None, as measure_edit's are (the row said DD 0.0
    # and LMP = ES beside the methods' None, "–" in report.py's tables; sessions 48 and 51 saw it).
    rephrased = [EditRequest(r.prompt, r.target, rephrase=r.rephrase) for r in reqs]
    unedited = evaluate_module.unedited_scores(model, tok, rephrased)
    assert unedited == dict(es=scores["es"], reliability=scores["reliability"], dd=None, lmp=None, ns=None)
    assert_bit_identical(before, model)
    edited = evaluate_module.measure_edit(ModelEditor(model, tok, LAYERS["llama"], method="ft", ft_steps=1), rephrased)
    none = lambda scores: {k for k in evaluate_module.PREDICTION_METRICS if scores[k] is None}  # noqa: E731
    assert none(edited) == none(unedited) == {"dd", "lmp", "ns"}


@pytest.mark.parametrize("method", ["mend", "ft"])
def test_measure_edit_whose_apply_fails_raises_with_the_model_as_it_was(method, gen):
    """An edit refused by the method itself (a request past the model's positions) propagates out of
    measure_edit naming the request, with nothing to undo: the model is as it was, no edit is live,
    and a base_cache filled before the apply still holds the unedited model's predictions."""
    me = make_editor("gpt2", method, gen, **({"ft_steps": 1} if method == "ft" else {}))
    long = " ".join(["word"] * 200)  # past the tiny GPT-2's 128 positions
    requests = random_requests(gen, int(torch.randint(1, 4, (1,), generator=gen)))
    i = len(requests)
    requests.append(EditRequest(long, "cd", locality="hello there", locality_target="cd"))
    before = snapshot(me.model)
    cache = {}
    with pytest.raises(ValueError, match=rf"^requests\[{i}\] is \d+ tokens \(prompt \+ target\)"):
        evaluate_module.measure_edit(me, requests, batch_size=2, base_cache=cache)
    assert_bit_identical(before, me.model)
    assert not me._live
    key = ("hello there", "cd")
    assert torch.equal(cache[key], metrics.locality_predictions(me.model, me.tokenizer, [requests[i]])[0])


def test_measure_edit_refuses_a_during_that_is_not_callable_before_any_work(gen):
    """`during` is called with the edited model: one that is not callable raised TypeError
    ("'int' object is not callable") after the unedited scoring, the apply and the edited
    scoring had run (and undone the edit); it is a ValueError naming `during` up front."""
    me = make_editor("gpt2", "ft", gen, ft_steps=1)
    calls = []
    me.apply = lambda requests: calls.append(requests)  # nothing may run before the check
    with pytest.raises(ValueError, match="during must be a callable taking the model, or None, got int"):
        evaluate_module.measure_edit(me, random_requests(gen, 2), during=42)
    assert not calls


@pytest.mark.parametrize("cache", [None, {}])
def test_evaluate_errors_name_the_request_by_its_place_in_the_callers_list(cache, gen):
    """ES, NS and DD are scored on the requests that have a rephrase / locality: an error named
    the bad one by its place among those (requests[1] for the caller's requests[3]).  The edit is
    undone and the model left as it was."""
    me = make_editor("gpt2", "ft", gen, ft_steps=1)
    long = " ".join(["word"] * 200)  # past the tiny GPT-2's 128 positions
    k = int(torch.randint(1, 4, (1,), generator=gen))
    plain = [EditRequest("ab", "cd") for _ in range(k)]  # no rephrase, no locality
    full = EditRequest("ab", "cd", rephrase="ab", locality="hello there", locality_target="cd")
    before = snapshot(me.model)
    cases = [(EditRequest("ab", "cd", rephrase=long), r"rephrase \+ requests\[{}\]\.target: a text is"),
             (EditRequest("ab", "cd", locality="z"), r"locality \('z'\) needs at least 2 tokens"),
             (EditRequest("ab", "cd", locality="ab", locality_target=long),
              r"locality \+ requests\[{}\]\.locality_target")]
    for bad, message in cases:
        requests = plain + [full] + plain + [bad]
        i = len(requests) - 1
        with pytest.raises(ValueError, match=rf"^requests\[{i}\]\." + message.format(i)):
            evaluate_module.measure_edit(me, requests, batch_size=2, base_cache=cache)
        if bad.locality is None or bad.locality_target is not None:  # what unedited_scores reads
            with pytest.raises(ValueError, match=rf"^requests\[{i}\]\." + message.format(i)):
                evaluate_module.unedited_scores(me.model, me.tokenizer, requests, batch_size=2)
    assert_bit_identical(before, me.model)
    assert not me._live
    # evaluate_method samples the requests: the error names the sampled request by its place in
    # the caller's list (it was named by its place in the sample).
    seed = seed_from(gen)
    requests = [EditRequest("ab", f"c{i}", rephrase=long) for i in range(6)]
    first = evaluate_module.sample_indices(len(requests), 3, seed, 0)[0]
    with pytest.raises(ValueError, match=rf"^requests\[{first}\]\.rephrase \+ requests\[{first}\]\.target: a text"):
        evaluate_module.evaluate_method(me.model, me.tokenizer, me, requests, n_edits=3, repeats=1, seed=seed,
                                        progress=False)
    assert_bit_identical(before, me.model)


def test_peak_memory_without_clear_refs_uses_ru_maxrss(monkeypatch, tmp_path):
    """Where /proc/self/clear_refs cannot be written, the measure falls back to ru_maxrss; with no
    /proc/self/status, _status_kb is None."""
    monkeypatch.setattr(evaluate_module, "_CLEAR_REFS", tmp_path / "no_dir" / "clear_refs")
    with evaluate_module.PeakMemory("cpu") as m:
        torch.ones(1000)
    assert m.method == "ru_maxrss" and isinstance(m.peak_mb, float) and m.peak_mb >= 0
    monkeypatch.setattr(evaluate_module, "_STATUS", tmp_path / "no_status")
    assert evaluate_module._status_kb("VmRSS") is None
    monkeypatch.setattr(evaluate_module, "_CLEAR_REFS", tmp_path / "clear_refs")  # writable, but no status
    with evaluate_module.PeakMemory(["cpu"]) as m:
        pass
    assert m.method == "ru_maxrss"


def test_peak_memory_names_a_device_it_cannot_read():
    """None raised torch.device's TypeError listing its signatures, a misspelt name its RuntimeError, and
    an empty list a bare IndexError."""
    for bad, shown in ((None, "None"), ("nonsense", "'nonsense'"), (["cpu", None], "None"), (0.5, "0.5")):
        with pytest.raises(ValueError, match=rf"^device must be a torch.device or a device name \(or a list of "
                                             rf"them\), got {shown}: "):
            evaluate_module.PeakMemory(bad)
    with pytest.raises(ValueError, match=r"^device must be a device or a non-empty list of devices, got an empty one$"):
        evaluate_module.PeakMemory([])
    for good in ("cpu", torch.device("cpu"), ["cpu"], ("cpu", torch.device("cpu"))):
        assert all(d == torch.device("cpu") for d in evaluate_module.PeakMemory(good).devices)


def test_without_locality_names_what_is_not_a_request():
    """A str, None or a list holding something other than EditRequests raised AttributeError or
    TypeError; an empty list is still an empty list, and the copies keep every field but the two."""
    for bad, match in (("abc", r"^requests must be a sequence of EditRequest, got str$"),
                       (None, r"^requests must be a sequence of EditRequest, got NoneType$"),
                       (EditRequest("a", "b"), r"^requests must be a sequence of EditRequest, got EditRequest$"),
                       ([EditRequest("a", "b"), "c"], r"^requests\[1\] must be an EditRequest, got str$")):
        with pytest.raises(ValueError, match=match):
            evaluate_module.without_locality(bad)
    assert evaluate_module.without_locality([]) == []
    given = [EditRequest("a", "b", rephrase="c", locality="d", locality_target="e")]
    (held_out,) = evaluate_module.without_locality(iter(given))
    assert (held_out.prompt, held_out.target, held_out.rephrase, held_out.locality, held_out.locality_target) == \
        ("a", "b", "c", None, None)
    assert given[0].locality == "d"


def test_peak_memory_from_rss_is_the_high_water_marks_growth_in_mib(monkeypatch, gen):
    """The growth of VmHWM over the VmRSS read at the start (both in kB) reads in MiB (2**20 bytes);
    a mark below the start reads 0, never a negative peak."""
    start = int(torch.randint(1 << 20, 1 << 21, (1,), generator=gen))  # kB
    growth = int(torch.randint(1, 1 << 20, (1,), generator=gen))
    monkeypatch.setattr(evaluate_module, "_reset_rss_high_water", lambda: True)
    for hwm, want in ((start + growth, growth / 1024), (start - growth, 0.0)):
        monkeypatch.setattr(evaluate_module, "_status_kb", {"VmRSS": start, "VmHWM": hwm}.get)
        with evaluate_module.PeakMemory("cpu") as m:
            pass
        assert m.method == "rss_high_water" and m.peak_mb == want


def _resident_mib(mib: int) -> None:
    """Allocate `mib` MiB, touch every page (resident: RSS grows by it), free it (a tensor this
    large is its own mmap, so RSS drops back): only the process's high-water mark keeps it."""
    torch.empty(mib << 20, dtype=torch.uint8).fill_(1)


def _rss_peak_or_skip():
    with evaluate_module.PeakMemory("cpu") as m:
        pass
    if m.method != "rss_high_water":
        pytest.skip(f"no resettable RSS high-water mark here (PeakMemory reads {m.method})")


def test_peak_memory_on_cpu_reads_the_blocks_own_peak_not_an_earlier_one(gen):
    """A real reading (nothing patched), as the module doc says: the growth of the process's RSS
    high-water mark over the block, reset at its start.  Memory allocated and freed inside the
    block counts (the mark keeps it, RSS at the exit does not); a larger peak just before the block
    does not (the reset drops it); an empty block reads about 0."""
    _rss_peak_or_skip()
    inside = int(torch.randint(40, 81, (1,), generator=gen))
    earlier = inside + int(torch.randint(64, 129, (1,), generator=gen))
    for _ in range(2):
        _resident_mib(earlier)
        with evaluate_module.PeakMemory("cpu") as m:
            _resident_mib(inside)
        assert m.method == "rss_high_water"
        assert 0.95 * inside <= m.peak_mb <= inside + 24, (inside, earlier, m.peak_mb)
        _resident_mib(earlier)
        with evaluate_module.PeakMemory("cpu") as m:
            pass
        assert 0 <= m.peak_mb < 8, (earlier, m.peak_mb)


def test_measure_edit_times_and_measures_the_apply_alone(gen):
    """latency_s is the wall time of `apply` and peak_memory_mb the peak of `apply` only (the module
    doc, measure_edit's docstring; the demo's latency and peak columns): not the unedited locality
    pass before it, nor the scoring passes and `during` after it.  Each pass outside the apply
    (a forward pre-hook on the model) holds a larger block of memory and sleeps 0.2 s; the apply
    (wrapped) a smaller block and 0.1 s.  The model is bit-identical afterwards."""
    me = make_editor("llama", "mend", gen)
    requests = random_requests(gen, 3)
    before = snapshot(me.model)
    inside = int(torch.randint(24, 49, (1,), generator=gen))
    outside = inside + int(torch.randint(48, 97, (1,), generator=gen))
    phase, spans, outside_passes = ["before"], [], []

    def outside_the_apply(module, args):
        if phase[0] != "apply":
            outside_passes.append(phase[0])
            _resident_mib(outside)
            time.sleep(0.2)

    real_apply = me.apply

    def apply(reqs):
        phase[0] = "apply"
        start = time.perf_counter()
        try:
            _resident_mib(inside)
            time.sleep(0.1)
            return real_apply(reqs)
        finally:
            spans.append(time.perf_counter() - start)
            phase[0] = "after"

    def during(model):
        outside_the_apply(model, ())
        return "seen"

    me.apply = apply
    hook = me.model.register_forward_pre_hook(outside_the_apply)
    try:
        run = evaluate_module.measure_edit(me, requests, during=during)
    finally:
        hook.remove()
        del me.apply
    assert_bit_identical(before, me.model)
    assert run["during"] == "seen" and len(spans) == 1
    assert "before" in outside_passes and outside_passes.count("after") >= 3  # scoring passes and `during`
    assert spans[0] <= run["latency_s"] < spans[0] + 0.15, (spans, run["latency_s"])
    if run["memory_method"] == "rss_high_water":
        assert 0.95 * inside <= run["peak_memory_mb"] <= inside + 20, (inside, outside, run["peak_memory_mb"])


def test_evaluate_method_checks_its_arguments(gen):
    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 3)
    for n_edits, message in ((object(), "n_edits must be an int or a sequence of ints, got object"),
                             ([], "n_edits must not be empty"), ([2, 0], "n_edits must hold positive ints, got 0"),
                             ((1, True), "n_edits must hold positive ints, got True")):
        with pytest.raises(ValueError, match=message):
            evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=n_edits, progress=False)
    other, _ = tiny_model("gpt2", seed=0)
    with pytest.raises(ValueError, match="ModelEditor of another model"):
        evaluate_module.evaluate_method(other, me.tokenizer, me, reqs, n_edits=1, progress=False)
    with pytest.raises(ValueError, match="layers and editor arguments go to the ModelEditor"):
        evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=1, layers=["lm_head"], progress=False)
    with pytest.raises(ValueError, match="layers and editor arguments go to the ModelEditor"):
        evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=1, rank=3, progress=False)


def test_evaluate_method_and_measure_edit_check_batch_size_and_progress_before_any_edit(gen, monkeypatch):
    """batch_size was checked by the first scoring pass: after the edit (applied, then undone) where no
    request has a locality prompt; progress="False" was read for its truth and showed the bar."""
    me = make_editor("gpt2", "mend", gen)
    reqs = [EditRequest(r.prompt, r.target, rephrase=r.rephrase) for r in random_requests(gen, 3)]
    applied = []
    monkeypatch.setattr(me, "apply", lambda *a, **k: applied.append(1))
    for batch_size in (0, -1, 1.0, True, None):
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive int, got {batch_size!r}$"):
            evaluate_module.measure_edit(me, reqs, batch_size=batch_size)
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive int, got {batch_size!r}$"):
            evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=1, batch_size=batch_size,
                                            progress=False)
    for progress in ("False", 0, None):
        with pytest.raises(ValueError, match=rf"^progress must be a bool, got {progress!r}$"):
            evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=1, progress=progress)
    assert not applied


def test_evaluate_method_and_gradient_conflict_name_layers_that_are_not_a_collection(gen):
    """layers given as an int (a block index for a layer name): list() raised TypeError "'int'
    object is not iterable", naming nothing (found by an argument sweep).  It now reaches
    ModelEditor, whose ValueError names layers, before any edit."""
    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 4)
    before = snapshot(me.model)
    for layers in (3, 2.5):
        with pytest.raises(ValueError, match=r"^layers must be a list of module names, got "):
            evaluate_module.evaluate_method(me.model, me.tokenizer, "ft", reqs, n_edits=2, layers=layers, progress=False)
        with pytest.raises(ValueError, match=r"^layers must be a list of module names, got "):
            evaluate_module.gradient_conflict(me.model, me.tokenizer, layers, reqs)
    assert_bit_identical(before, me.model)


def test_evaluate_method_refuses_a_seed_or_layers_it_would_misread(gen):
    """The sample is drawn from the seed's text: seed 1.0 or True drew another sample than seed 1
    (and "1" the same one) without a word; a single layer name was split into characters and
    reported as duplicate layers.  Both are ValueErrors naming the argument, before any edit."""
    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 4)
    before = snapshot(me.model)
    for seed in (1.0, True, "1", None):
        with pytest.raises(ValueError, match="seed must be an int"):
            evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=2, seed=seed, progress=False)
        with pytest.raises(ValueError, match="seed must be an int"):
            evaluate_module.sample_indices(4, 2, seed, 0)
    name = "transformer.h.1.mlp.c_proj"
    with pytest.raises(ValueError, match="layers must be a list of module names, got a single str"):
        evaluate_module.evaluate_method(me.model, me.tokenizer, "ft", reqs, n_edits=2, layers=name, progress=False)
    with pytest.raises(ValueError, match="layers must be a list of module names, got a single str"):
        evaluate_module.gradient_conflict(me.model, me.tokenizer, name, reqs)
    for args, message in (((4, 5, 0, 0), "n_edits must be in"), ((4, 2, 0, -1), "must be non-negative"),
                          ((4.0, 2, 0, 0), "n_requests must be an int"), ((4, 2, 0, 1.0), "repeat must be an int")):
        with pytest.raises(ValueError, match=message):
            evaluate_module.sample_indices(*args)
    assert_bit_identical(before, me.model)
    # Still a pure function of its int arguments, any N_u from 0 to all of them.
    seed = seed_from(gen)
    assert evaluate_module.sample_indices(9, 4, seed, 2) == evaluate_module.sample_indices(9, 4, seed, 2)
    # Each repeat draws its own sample (a collision of these two has odds 1 in C(100, 10)).
    assert evaluate_module.sample_indices(100, 10, seed, 0) != evaluate_module.sample_indices(100, 10, seed, 1)
    # And each N_u (the seed's text holds it): the 10 edits are no part of the 11 drawn the same way
    # (odds 1 in C(100, 11) / C(90, 1) of that by chance).
    ten, eleven = (set(evaluate_module.sample_indices(100, n, seed, 0)) for n in (10, 11))
    assert not ten <= eleven
    assert evaluate_module.sample_indices(9, 0, seed, 0) == []
    assert evaluate_module.sample_indices(9, 9, -seed, 0) == list(range(9))


def test_gradient_statistics_under_inference_mode_say_why(gen):
    """gradient_conflict and edit_statistics capture gradients: under inference_mode they failed
    with autograd's "element 0 of tensors does not require grad"; now a RuntimeError that says
    why, as ModelEditor.apply's.  Under no_grad they run, with the numbers they give outside it."""
    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 3)
    layers = list(me.layers)
    want_gc = evaluate_module.gradient_conflict(me.model, me.tokenizer, layers, reqs)
    want_stats = evaluate_module.edit_statistics(me, reqs)
    before = snapshot(me.model)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="gradient_conflict needs autograd.*outside torch.inference_mode"):
            evaluate_module.gradient_conflict(me.model, me.tokenizer, layers, reqs)
        with pytest.raises(RuntimeError, match="edit_statistics needs autograd.*outside torch.inference_mode"):
            evaluate_module.edit_statistics(me, reqs)
    with torch.no_grad():
        assert evaluate_module.gradient_conflict(me.model, me.tokenizer, layers, reqs) == want_gc
        assert evaluate_module.edit_statistics(me, reqs) == want_stats
    assert_bit_identical(before, me.model)


def test_gradient_statistics_of_a_model_built_under_inference_mode_say_why(gen):
    """A model built under inference_mode (its parameters inference tensors): gradient_conflict and
    edit_statistics raised torch's "Inference tensors cannot be saved for backward" from inside the
    capture, where apply and fit name the model's load (check_autograd with the model); they do too."""
    with torch.inference_mode():
        model, tok = tiny_model("gpt2", seed=seed_from(gen))
    me = ModelEditor(model, tok, ["transformer.h.0.mlp.c_fc"], method="mend", rank=3)
    reqs = random_requests(gen, 3)
    why = r"{}: the model's parameters are inference tensors \(built or loaded under torch\.inference_mode\(\)\)"
    with pytest.raises(RuntimeError, match=why.format("gradient_conflict")):
        evaluate_module.gradient_conflict(model, tok, me.layers, reqs)
    with pytest.raises(RuntimeError, match=why.format("edit_statistics")):
        evaluate_module.edit_statistics(me, reqs)


# ---------------------------------------------------------------------------------------------
# metrics.py
# ---------------------------------------------------------------------------------------------
def test_seq2seq_locality_without_a_target_is_a_value_error(gen):
    model, tok = tiny_model("bart", seed=seed_from(gen))
    reqs = [EditRequest("The sky is", "green", locality="A stone is heavy")]
    with pytest.raises(ValueError, match="scoring plain texts needs a causal LM"):
        metrics.locality_predictions(model, tok, reqs)


def test_drawdown_refuses_base_predictions_of_another_shape(gen):
    model, tok = tiny_model("llama", seed=seed_from(gen))
    reqs = random_requests(gen, 2)
    base = metrics.locality_predictions(model, tok, reqs)
    assert metrics.drawdown(model, tok, reqs, base) == 0.0
    bad = [base[0], torch.cat([base[1], base[1]])]
    with pytest.raises(ValueError, match=r"base_predictions\[1\] must be a tensor of shape"):
        metrics.drawdown(model, tok, reqs, bad)
    with pytest.raises(ValueError, match=r"base_predictions\[0\] must be a tensor"):
        metrics.drawdown(model, tok, reqs, [b.tolist() for b in base])


def test_factor_gram_refuses_factors_on_two_devices(gen):
    mu = torch.randn(3, 4, generator=gen)
    eta = torch.randn(3, 5, generator=gen)
    offsets = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="must be on one device"):
        metrics.factor_gram(mu, eta.to("meta"), offsets)
    with pytest.raises(ValueError, match="must be on one device"):
        metrics.factor_gram(mu, eta, offsets.to("meta"))


def test_factors_gram_refuses_an_entry_that_is_not_factors(gen):
    f = Factors(torch.randn(3, 4, generator=gen), torch.randn(3, 5, generator=gen),
                torch.tensor([0, 1, 3], dtype=torch.int32))
    assert metrics.factors_gram({"a": f}).shape == (2, 2)
    with pytest.raises(ValueError, match=r"factors\['b'\] must be a Factors, got tuple"):
        metrics.factors_gram({"a": f, "b": (f.mu, f.eta, f.edit_offsets)})


# ---------------------------------------------------------------------------------------------
# data/, tokenize.py
# ---------------------------------------------------------------------------------------------
def test_data_path_names_the_known_data_sets():
    from dcedit_kernels.data import data_path

    known = r"name must be one of \['counterfact-train', 'counterfact-val', 'zsre-train'\]"
    with pytest.raises(ValueError, match=known):
        data_path("zsre-val")


def test_zsre_skipped_must_be_a_list(tmp_path):
    from dcedit_kernels.data import load_zsre

    path = tmp_path / "z.json"
    path.write_text(json.dumps([dict(src="What is X?", alt=" ", answers=["a"]), dict(src="Who is Y?", alt="Z")]))
    with pytest.raises(ValueError, match="skipped must be a list or None, got set"):
        load_zsre(path, skipped=set())
    skipped = []
    assert [r.target for r in load_zsre(path, skipped=skipped)] == ["Z"] and skipped == [0]


def test_pad_token_id_falls_back_to_eos_then_zero():
    from types import SimpleNamespace

    from dcedit_kernels.tokenize import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_forward_inputs_of_a_seq2seq_model_without_prepare_keeps_its_labels():
    from types import SimpleNamespace

    from dcedit_kernels.tokenize import forward_inputs

    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 2, dtype=torch.long)}
    model = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=True))
    assert forward_inputs(model, batch) == batch and forward_inputs(model, batch) is not batch


def test_forward_inputs_of_a_seq2seq_model_keeps_the_decoder_input_ids_it_is_given(gen):
    """The decoder inputs are built from the labels only where the batch has none."""
    from types import SimpleNamespace

    from dcedit_kernels.tokenize import forward_inputs

    ids, labels = torch.randint(0, 50, (2, 4), generator=gen), torch.randint(0, 50, (2, 3), generator=gen)
    model = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=True),
                            prepare_decoder_input_ids_from_labels=lambda labels: labels + 100)
    built = forward_inputs(model, {"input_ids": ids, "labels": labels})
    assert set(built) == {"input_ids", "decoder_input_ids"} and torch.equal(built["decoder_input_ids"], labels + 100)
    given = torch.randint(0, 50, (2, 3), generator=gen)
    kept = forward_inputs(model, {"input_ids": ids, "labels": labels, "decoder_input_ids": given})
    assert set(kept) == {"input_ids", "decoder_input_ids"} and kept["decoder_input_ids"] is given


def test_measure_edit_and_edit_statistics_name_an_editor_that_is_not_one(gen):
    """measure_edit and edit_statistics given the model, a method name or None for the editor raised
    AttributeError ("'str' object has no attribute 'model'", "... has no attribute 'method'"),
    naming nothing (found by an argument sweep).  Now a ValueError naming editor and what it lacks,
    before any edit."""
    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 3)
    before = snapshot(me.model)
    for bad in ("mend", None, me.tokenizer):
        with pytest.raises(ValueError, match=r"^editor must be a ModelEditor \(or an object with model, tokenizer, apply\)"):
            evaluate_module.measure_edit(bad, reqs)
    with pytest.raises(ValueError, match=r"^editor must be a ModelEditor .* got GPT2LMHeadModel, which has no model, tokenizer"):
        evaluate_module.measure_edit(me.model, reqs)
    for bad in ("mend", None, me.model):
        with pytest.raises(ValueError, match=r"^editor must be a ModelEditor \(or an object with method, "):
            evaluate_module.edit_statistics(bad, reqs)
    assert_bit_identical(before, me.model)


def test_measure_edit_and_evaluate_method_refuse_caches_that_are_not_dicts(gen):
    """base_cache and lower_blocks are dicts shared between calls (or None): a str base_cache raised
    TypeError ("'in <string>' requires string as left operand, not tuple"), a list one "list
    indices must be integers", and a list or str lower_blocks was silently not used (found by an
    argument sweep).  Each is now a ValueError naming it, before any edit."""
    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 3)
    before = snapshot(me.model)
    for name in ("base_cache", "lower_blocks"):
        for bad in ("x", [], 3):
            with pytest.raises(ValueError, match=rf"^{name} must be a dict or None, got {type(bad).__name__}"):
                evaluate_module.measure_edit(me, reqs, **{name: bad})
            with pytest.raises(ValueError, match=rf"^{name} must be a dict or None, got {type(bad).__name__}"):
                evaluate_module.evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=2, repeats=1, progress=False,
                                                **{name: bad})
    assert_bit_identical(before, me.model)


def test_apply_fit_and_metrics_under_a_meta_default_device_give_the_plain_results(gen):
    """torch.set_default_device("meta") (left on after building a model skeleton) sends every factory
    call without a device to "meta".  The model is real, but apply, fit and the metrics raised
    "Cannot copy out of meta tensor" (the padded batch built on the default device, then moved to
    the model's), a seeded RaEditor's split and the training batch order had no data to read (their
    randperm on the default device), and ES's mean was a meta tensor.  Those host-side tensors are
    built on the CPU (the KL mask on the model's device) now: the same weights, losses, editors and
    scores as without the setting."""
    from dcedit_kernels.train import TrainConfig

    seed = seed_from(gen)
    reqs = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, seed=seed)

    def run(me):
        handle = me.apply(reqs[:3])
        edited = snapshot(me.model)
        handle.undo()
        history = me.fit(reqs, None, config).history
        return edited, history, me.state_tensors(), metrics.edit_success(me.model, me.tokenizer, reqs)

    plain, meta = (make_editor("gpt2", "raeditor", torch.Generator().manual_seed(seed), seed=seed) for _ in range(2))
    want = run(plain)
    with default_device("meta"):
        got = run(meta)
    for a, b in ((want[0], got[0]), (want[2], got[2])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got[1] == want[1] and got[3] == want[3]


@pytest.mark.parametrize("method", ["mend", "raeditor"])
def test_apply_in_several_capture_chunks_under_a_meta_default_device(method, gen):
    """Apply's capture in several chunks (capture_batch_size below the edits) placed each chunk's
    rows by offsets meant for the CPU but made without a device: under torch.set_default_device("meta")
    they were meta tensors, and apply raised "Tensor.item() cannot be called on meta tensors".
    They are made on the CPU: the same edited weights as without the setting."""
    seed = seed_from(gen)
    reqs = random_requests(gen, 5)

    def run(me):
        me.capture_batch_size = 2
        handle = me.apply(reqs)
        edited = snapshot(me.model)
        handle.undo()
        return edited

    plain, meta = (make_editor("gpt2", method, torch.Generator().manual_seed(seed), seed=seed) for _ in range(2))
    want = run(plain)
    with default_device("meta"):
        got = run(meta)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("method", ["ft", "ft_kl"])
def test_ft_baselines_step_with_the_cpu_as_default_device_under_a_meta_one(method, gen):
    """The FT baselines' optimiser steps ran under the caller's default device: torch 2.11's Adam
    (the GPU machine's; older ones too) makes each parameter's step count, a CPU scalar by design,
    without a device (torch 2.13's names the CPU), so under torch.set_default_device("meta") (left
    on after building a model skeleton) FT's first step raises "Tensor.item() cannot be called on
    meta tensors" on those torches (not seen here: torch 2.13), as fit's did until its steps ran
    with the CPU as the default (`devices.host_scalars_on_cpu`).  FT's steps run so too now: the
    default device every optimiser step sees (a global step pre-hook) is the CPU, on any torch, and
    the edited weights are the plain run's."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seed = seed_from(gen)
    reqs = random_requests(gen, 3)

    def run(me):
        handle = me.apply(reqs)
        edited = snapshot(me.model)
        handle.undo()
        return edited

    plain, meta = (make_editor("gpt2", method, torch.Generator().manual_seed(seed)) for _ in range(2))
    want = run(plain)
    seen = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(torch.empty(0).device.type))
    try:
        with default_device("meta"):
            got = run(meta)
    finally:
        hook.remove()
    assert seen and set(seen) == {"cpu"}, seen
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_load_model_under_a_meta_default_device_loads_the_plain_model(gen, tmp_path):
    """load_model left the load to transformers' from_pretrained under the caller's default device,
    which transformers 5 takes as where to load: under torch.set_default_device("meta") (left on
    after building a model skeleton) it raised "You are using `from_pretrained` with a meta device
    context manager or `torch.set_default_device('meta')`" for a model folder (so did every `dcedit`
    command called from Python).  The load runs with the CPU as the default device, then the model
    moves to `device` as the docstring says: the same weights as without the setting."""
    from dcedit_kernels.models import load_model

    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    want = load_model(tmp_path)[0].state_dict()
    with default_device("meta"):
        got, _ = load_model(tmp_path)
    assert not got.training and {p.device.type for p in got.parameters()} == {"cpu"}
    got = got.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_editors_built_or_loaded_under_a_meta_default_device_are_the_plain_ones(gen, tmp_path):
    """Under torch.set_default_device("meta") (left on after building a model skeleton), a
    ModelEditor built or loaded for a real model, GroupedEditor.load and compat.mend.load built
    their editors on "meta", then moved them to the layers' device (or copied the checkpoint into
    them): torch's NotImplementedError "Cannot copy out of meta tensor" from each.  The editors
    are built on the CPU now, then moved as before: the same tensors as without the setting."""
    from dcedit_kernels.compat import mend
    from dcedit_kernels.editors import GroupedEditor
    from test_compat_mend import INNER, SHAPES, make_mend_state_dict

    seed = seed_from(gen)
    plain = make_editor("gpt2", "raeditor", seed=seed)
    path, editor_path = tmp_path / "me.safetensors", tmp_path / "editor.safetensors"
    plain.save(path)
    editor = next(iter(plain.editors.values()))
    editor.save(editor_path)
    sd = make_mend_state_dict(gen)
    want_mend = {name: view.editor.state_dict() for name, view in mend.load(sd, INNER, SHAPES).items()}
    with default_device("meta"):
        built = ModelEditor(plain.model, plain.tokenizer, LAYERS["gpt2"], method="raeditor", rank=7, edit_lr=0.1,
                            n_editors=3, seed=seed)
        loaded = ModelEditor.load(path, plain.model, plain.tokenizer)
        loaded_editor = GroupedEditor.load(editor_path)
        got_mend = {name: view.editor.state_dict() for name, view in mend.load(sd, INNER, SHAPES).items()}
    want = plain.state_tensors()
    for me in (built, loaded):
        got = me.state_tensors()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in loaded_editor.state_dict().items())
    for name, state in got_mend.items():
        assert all(torch.equal(v, want_mend[name][k]) for k, v in state.items()), name


def test_tokenize_without_a_device_follows_the_default_device(gen):
    """The padded batches are built on the CPU and moved (the fix above); without a `device` they
    end on torch's default device, as they did when they were built there (a caller with
    set_default_device("cuda") and a GPU model passes them to it as they come), and with one on it."""
    from dcedit_kernels.tokenize import tokenize_causal, tokenize_seq2seq

    _, tok = tiny_model("gpt2", seed=seed_from(gen))
    _, t5_tok = tiny_model("t5", seed=seed_from(gen))
    with default_device("meta"):
        for batch in (tokenize_causal(tok, ["a b"], ["c"]), tokenize_seq2seq(t5_tok, ["a b"], ["c"])):
            assert all(v.is_meta for v in batch.values())
        for batch in (tokenize_causal(tok, ["a b"], ["c"], "cpu"), tokenize_seq2seq(t5_tok, ["a b"], ["c"], "cpu")):
            assert all(v.device.type == "cpu" for v in batch.values())


def test_a_default_device_reset_with_none_is_the_cpu_again(monkeypatch):
    """torch.set_default_device(None) resets the default device; on torch 2.5.1 to 2.9.1 (2.10 does
    not) torch.get_default_device() then raises "AttributeError: 'NoneType' object has no attribute
    'device'", and tiny_model, batches without a device and fit's optimiser steps (which read it)
    failed.  Run for real (torch's reset), then with that behaviour patched in (for a torch that does
    not have it).  The model is built only where torch's reset leaves get_default_device working:
    transformers 5 reads it itself when it builds a model, and raises there on those torches (seen
    on 2.7.1 and 2.8.0 with transformers 5.25)."""
    import contextlib

    from dcedit_kernels import models
    from dcedit_kernels.tokenize import pad_rows
    from dcedit_kernels.devices import host_scalars_on_cpu

    def check():
        with models._seeded(0):  # tiny_model's build (transformers' own reads of the default aside)
            assert torch.rand(1).device.type == "cpu"
        assert all(v.device.type == "cpu" for v in pad_rows([[1, 2], [3]], pad_id=0).values())
        assert isinstance(host_scalars_on_cpu(), contextlib.nullcontext)

    torch.set_default_device("meta")
    torch.set_default_device(None)
    try:
        try:
            torch.get_default_device()
        except AttributeError:  # torch 2.5.1 to 2.9.1: check() meets the raise for real
            check()
        else:
            model, _ = tiny_model("gpt2", seed=0)
            assert next(model.parameters()).device.type == "cpu"
            check()
    finally:
        reset_default_device()  # the tests after this one build models

    def after_a_reset():
        raise AttributeError("'NoneType' object has no attribute 'device'")

    monkeypatch.setattr(torch, "get_default_device", after_a_reset)
    check()


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_token_ids_past_the_embedding_are_named_before_anything_runs(arch):
    """A tokenizer given tokens (`add_tokens`, or a new pad token) without
    `model.resize_token_embeddings` gives ids the embedding lacks: apply, capture, the metrics, FT+KL's
    locality batch, the training rows and the CLI's completions raised torch's bare IndexError
    ("index out of range in self"; on CUDA a device-side assert) from the forward.  Each now raises a
    ValueError naming the text, the id and the embedding's size, read on the host before the batch is
    built (no device sync), and the model is unchanged."""
    from helpers import assert_same_state, model_state

    from dcedit_kernels.cli.inputs import greedy_completions
    from dcedit_kernels.evaluate import measure_edit
    from dcedit_kernels.train_config import TrainConfig
    from dcedit_kernels.train_loss import eval_rows

    model, tok = tiny_model(arch, seed=0)
    size = model.get_input_embeddings().num_embeddings
    tok.add_tokens(["zorblax"])
    new_id = tok.convert_tokens_to_ids("zorblax")
    assert new_id == size
    layers = ["model.layers.1.mlp.down_proj"] if arch == "llama" else ["decoder.block.1.layer.2.DenseReluDense.wo"]
    me = ModelEditor(model, tok, layers=layers, method="mend", rank=4)
    fine = EditRequest("The dog is", " blue", rephrase="A dog is", locality="A dog", locality_target=" y")
    past = f"holds token id {new_id}, past the model's embedding of {size} tokens; .*resize_token_embeddings"
    cases = [
        (lambda: me.apply([fine, EditRequest("The zorblax is", " red")]), r"prompts\[1\] \('The zorblax is'\) " + past),
        (lambda: me.apply([EditRequest("The cat is", " zorblax"), fine]), r"targets\[0\] \(' zorblax'\) " + past),
        (lambda: me.capture(me.tokenize(["The zorblax is"], [" red"])), r"prompts\[0\] \('The zorblax is'\) " + past),
        (lambda: metrics.target_accuracy(model, tok, ["A cat", "zorblax is"], [" x", " y"]),
         r"prompts\[1\] \('zorblax is'\) " + past),
        (lambda: measure_edit(me, [fine, EditRequest("The cat is", " red", rephrase="A cat is", locality="zorblax",
                                                    locality_target=" x")]),
         r"requests\[1\]\.locality \('zorblax'\) " + past),
        (lambda: greedy_completions(model, tok, ["hello", "zorblax is"]), "prompt 'zorblax is' " + past),
        (lambda: eval_rows(me, [fine, EditRequest("The cat is", " red", locality="zorblax", locality_target=" x")],
                           TrainConfig()), "a training row .*zorblax.* " + past),
    ]
    if arch == "llama":  # FT+KL edits causal LMs only
        ft_kl = ModelEditor(model, tok, layers=layers, method="ft_kl", ft_steps=1)
        cases.append((lambda: ft_kl.apply([fine, EditRequest("The cat is", " red", locality="zorblax and",
                                                            locality_target=" x")]),
                      r"requests\[1\]\.locality \('zorblax and x'\) " + past))
    before = model_state(model)
    for i, (call, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            call()
        assert_same_state(before, model, f"case {i}")

    # A pad token the model lacks only matters where a row is padded.
    model, tok = tiny_model(arch, seed=0)
    tok.add_special_tokens({"pad_token": "[NEWPAD]"})
    me = ModelEditor(model, tok, layers=layers, method="mend", rank=4)
    before = model_state(model)
    with pytest.raises(ValueError, match=f"the tokenizer's pad token id {size} is past the model's embedding of {size} "
                                         "tokens"):
        me.apply([EditRequest("The cat is", " red"), EditRequest("The big dog over there is", " blue")])
    assert_same_state(before, model)
    me.apply([EditRequest("The cat is", " red")]).undo()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_deferred_interrupt_holds_a_python_handled_signal_until_the_block_ends(signame):
    """`dcedit` raises SIGTERM as Ctrl-C (cli._sigterm_interrupts); a weight write must finish before
    either unwinds, so deferred_interrupt holds back both signals where a Python handler takes them,
    runs that handler once when the block ends, and puts the handlers back."""
    import os
    import signal

    from dcedit_kernels.edit_handle import deferred_interrupt

    sig = getattr(signal, signame)
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(sig, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), sig)
                os.kill(os.getpid(), sig)
                seen.append("block ran on")
        assert seen == ["block ran on", sig]
        assert signal.getsignal(sig) is handler
    finally:
        signal.signal(sig, previous)


def test_deferred_interrupt_runs_the_handler_of_the_first_signal_held_back():
    """SIGTERM then SIGINT inside the block: the first one's handler runs at the end (dcedit's
    SIGTERM exits 143 with its own message, not Ctrl-C's 130)."""
    import os
    import signal

    from dcedit_kernels.edit_handle import deferred_interrupt

    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGTERM]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
