"""Editor training's argument checks and rarer paths (train.py): TrainConfig's fields, resume
after early stopping, skipped non-finite batches, batches without locality rows."""

import dataclasses
import os
import re

import pytest
import torch
from torch import nn

import dcedit_kernels.train as train_module
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.requests import EditRequest
from dcedit_kernels.train import TrainConfig, batch_edits, batch_loss, eval_rows, evaluate_edits, train_editor

from helpers import default_device, scripted_scores, seed_from, tiny_mend
from test_model_editor import (LAYERS, _lookups_past_the_table_abort, one_thread,  # noqa: F401 (one_thread: autouse)
                               random_requests)


def _editor_params(me):
    return [p.detach().clone() for p in me.editors.parameters()]


# ---------------------------------------------------------------------------------------------
# Checks and resume
# ---------------------------------------------------------------------------------------------
def _rewrite_trainer_checkpoint(path, drop_json=None, keep_tensor=lambda key: True):
    """Rewrite the trainer checkpoint at `path` as an older or damaged one: `drop_json` maps a
    metadata entry holding JSON to the keys to delete from it ("run": ["config", "fisher_mask"]
    deletes run["config"]["fisher_mask"]); tensors whose key `keep_tensor` refuses are left out."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for entry, keys in (drop_json or {}).items():
        value = json.loads(meta[entry])
        inner = value
        for key in keys[:-1]:
            inner = inner[key]
        del inner[keys[-1]]
        meta[entry] = json.dumps(value)
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if keep_tensor(k)}, str(path), metadata=meta)
    return tensors


@pytest.mark.parametrize("changes, steps, stopped", [
    (dict(steps=10, patience=None), 10, False),  # another patience: goes on
    (dict(steps=30), 6, True),                   # the same patience, more steps: stays stopped
])
def test_resume_of_a_run_stopped_early_goes_on_only_with_another_patience(changes, steps, stopped, gen, tmp_path,
                                                                         monkeypatch):
    """A run stopped by patience goes on when resumed with another patience (_RESUMABLE_CHANGES):
    `stopped_early` is cleared when the new patience allows more (it once stayed set, and the
    resumed run stayed at the step it had stopped at).  Resumed with the same patience and more
    steps, it stays where it stopped."""
    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 6)
    # Every validation scores as the first (the same ES and NLL), so the first stays the best and
    # patience runs out.
    scripted_scores(monkeypatch, [0.5] * 20)
    config = TrainConfig(steps=20, batch_size=3, val_every=2, patience=2, progress=False,
                         checkpoint_dir=str(tmp_path))
    first = me.fit(requests[:4], requests[4:], config)
    assert first.stopped_early and first.steps == 6
    resumed = me.fit(requests[:4], requests[4:], config.replace(**changes))
    assert resumed.resumed_from == 6
    assert (resumed.steps, resumed.stopped_early) == (steps, stopped)


def test_resume_takes_another_min_delta_or_restore_best(gen, tmp_path):
    """The early-stopping fields may change on resume, as patience may (_RESUMABLE_CHANGES, the
    module docstring of train_checkpoint): another min_delta, then another restore_best, resume
    the same run rather than raise ResumeMismatchError."""
    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    me.fit(requests, config=config)
    assert me.fit(requests, config=config.replace(steps=2, min_delta=0.1)).resumed_from == 1
    assert me.fit(requests, config=config.replace(steps=3, restore_best=False)).resumed_from == 2


@pytest.mark.parametrize("dropped", [["config", "fisher_mask"], ["world_size"]], ids=["config_field", "world_size"])
def test_a_checkpoint_from_before_a_recorded_field_resumes(dropped, gen, tmp_path):
    """_check_run compares the fields both runs record: a checkpoint written before a field existed
    (its recorded run lacks it) resumes, rather than raise KeyError on the field it lacks.  Here a
    TrainConfig field (fisher_mask), and world_size: a checkpoint from before data-parallel
    training, when every run had one process, resumes in one process rather than be refused as a
    run of another number of processes ("processes None -> 1")."""
    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    me.fit(requests, config=config)
    # As a run before the field existed recorded it.
    _rewrite_trainer_checkpoint(tmp_path / "trainer.safetensors", {"run": dropped})
    assert me.fit(requests, config=config.replace(steps=2)).resumed_from == 1


def test_a_resumed_run_keeps_the_validations_and_bad_validations_before_its_checkpoint(gen, tmp_path, monkeypatch):
    """The checkpoint carries the validation record: a resumed run's val_history holds the
    validations before it, and patience counts the bad validations before it too (scripted scores,
    each worse than the first: 2 steps resumed to 20 stop at step 3, as one run of 20 would; with
    the count restarted at 0 the resumed run went on to step 4)."""
    scripted_scores(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.1])
    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 6)
    config = TrainConfig(steps=20, batch_size=3, val_every=1, patience=2, progress=False, checkpoint_dir=str(tmp_path))
    first = me.fit(requests[:4], requests[4:], config.replace(steps=2))
    assert not first.stopped_early and first.best_step == 1
    resumed = me.fit(requests[:4], requests[4:], config)
    assert resumed.resumed_from == 2 and resumed.stopped_early and resumed.steps == 3, resumed.steps
    assert [(v["step"], v["es"]) for v in resumed.val_history] == [(1, 0.5), (2, 0.4), (3, 0.3)]


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_each_rank_resumes_its_own_rng_states_from_a_three_process_checkpoint(rank, gen, tmp_path):
    """_checkpoint keeps rank r's RNG states under "rank{r}." (rank 0's bare) and _resume gives a
    rank its own: with three processes, rank 1 is not handed rank 2's (whose keys, "rank2.",
    are as long as its own prefix)."""
    from dcedit_kernels import train_checkpoint
    from dcedit_kernels.train_config import TrainResult

    me = tiny_mend("gpt2", gen)
    opt = torch.optim.Adam(list(me.editors.parameters()))
    lr_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    seeds = [seed_from(gen) for _ in range(3)]
    states = [{"rng_state": torch.Generator().manual_seed(s).get_state()} for s in seeds]
    run = train_checkpoint._run_settings(TrainConfig(steps=1, batch_size=2, progress=False), None, None, 3)
    train_checkpoint._checkpoint(me, opt, lr_opt, tmp_path, TrainResult(steps=1, history=[{"step": 1}]), 0, run,
                                 states)
    got, _, _ = train_checkpoint._resume(me, opt, lr_opt, tmp_path, TrainResult(steps=0), run, rank=rank)
    assert got.keys() == states[rank].keys()
    assert torch.equal(got["rng_state"], states[rank]["rng_state"])


def test_a_checkpoint_from_before_the_trainer_file_held_the_best_state_reads_best_safetensors(gen, tmp_path):
    """A checkpoint whose counters have no "best" entry (written before the best state went into
    trainer.safetensors) resumes with the best state of best.safetensors beside it, and with none
    when that file is absent."""
    from safetensors.torch import save_file

    from dcedit_kernels import train_checkpoint
    from dcedit_kernels.train_config import TrainResult

    me = tiny_mend("gpt2", gen)
    opt, lr_opt, run = _checkpoint_with_history(me, tmp_path, [{"step": 1}])
    _rewrite_trainer_checkpoint(tmp_path / "trainer.safetensors", {"counters": ["best"]})
    assert train_checkpoint._resume(me, opt, lr_opt, tmp_path, TrainResult(steps=0), run)[1] is None
    best = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in me.state_tensors().items()}
    save_file(best, str(tmp_path / "best.safetensors"))
    got = train_checkpoint._resume(me, opt, lr_opt, tmp_path, TrainResult(steps=0), run)[1]
    assert got.keys() == best.keys() and all(torch.equal(got[k], best[k]) for k in best)


def test_a_checkpoint_without_routing_generator_states_resumes(gen, tmp_path):
    """_set_rng_states leaves a routing generator the checkpoint holds no state for as it is (a
    seeded RaEditor's route_rng tensors missing, as in a checkpoint written before they were
    saved): the resume goes on, rather than raise KeyError on the missing tensor."""
    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    me = ModelEditor(model, tok, LAYERS["gpt2"], method="raeditor", n_editors=2, rank=3, seed=1)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    me.fit(requests, config=config)
    tensors = _rewrite_trainer_checkpoint(tmp_path / "trainer.safetensors",
                                          keep_tensor=lambda key: not key.startswith("route_rng."))
    assert any(k.startswith("route_rng.") for k in tensors)
    assert me.fit(requests, config=config.replace(steps=2)).resumed_from == 1


def test_resume_refuses_an_unseeded_raeditor_for_a_seeded_runs_checkpoint(gen, tmp_path):
    """The seed is no part of the editors' config, so a run resumed by a RaEditor built without the
    run's seed passed the checks, skipped the checkpoint's routing generator states and went on
    drawing its groups from torch's global generator: other editors than the uninterrupted run's,
    without a word.  It is refused, the editors left as they were; with the seed it resumes."""
    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    ModelEditor(model, tok, LAYERS["gpt2"], method="raeditor", n_editors=2, rank=3, seed=1).fit(requests, config=config)
    unseeded = ModelEditor(model, tok, LAYERS["gpt2"], method="raeditor", n_editors=2, rank=3)
    before = _editor_params(unseeded)
    with pytest.raises(ValueError, match=r"trainer.safetensors was written by a run whose editors \[.+\] drew their "
                                         r"random groups from a seeded generator"):
        unseeded.fit(requests, config=config.replace(steps=2))
    assert all(torch.equal(a, b) for a, b in zip(before, _editor_params(unseeded)))
    seeded = ModelEditor(model, tok, LAYERS["gpt2"], method="raeditor", n_editors=2, rank=3, seed=7)
    assert seeded.fit(requests, config=config.replace(steps=2)).resumed_from == 1


@pytest.mark.parametrize("batch_size", [0, -2])
def test_evaluate_edits_refuses_a_bad_batch_size_with_a_value_error(batch_size, gen):
    """A ValueError naming batch_size, as metrics gives for the same argument (0 once raised
    ZeroDivisionError, -2 a RuntimeError from torch.cat)."""
    me = tiny_mend("gpt2", gen)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_edits(me, random_requests(gen, 3), batch_size=batch_size)


@pytest.mark.parametrize("field, value", [
    ("val_size", True),      # a bool passes isinstance(value, int): validates on 1 request
    ("patience", True),      # the same: patience 1
    ("resume", "no"),        # truthy: the run resumes
    ("restore_best", "no"),  # truthy: the best editor is restored
    ("progress", "off"),     # truthy: the bar is shown
    ("seed", 1.5),           # accepted here, RuntimeError from torch.manual_seed inside fit
    ("data_parallel", "no"),  # truthy: the run would train as data-parallel
])
def test_train_config_checks_every_field(field, value):
    """Every field is checked, bools and ints included (these passed once: a bool as an int,
    a string as a bool, a float seed that failed later inside fit)."""
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# Reachable paths
# ---------------------------------------------------------------------------------------------
class _BytesPath:
    """An os.PathLike whose path is bytes: pathlib refuses it as it refuses b"ckpt"."""

    def __fspath__(self):
        return b"ckpt"


@pytest.mark.parametrize("changes, field", [
    (dict(lr=-1e-3), "lr"), (dict(lr_lr=float("nan")), "lr_lr"), (dict(cedit=-1.0), "cedit"),
    (dict(min_delta=-0.1), "min_delta"), (dict(grad_clip=0.0), "grad_clip"), (dict(val_size=0), "val_size"),
    (dict(balance_weight=-0.5), "balance_weight"), (dict(balance_weight=float("nan")), "balance_weight"),
    (dict(patience=-1), "patience"), (dict(locality_rows="mine"), "locality_rows"),
    (dict(edit_rows="fused"), "edit_rows"),  # "fused" is for the locality rows only
    (dict(reuse_prefix=None), "reuse_prefix"),
    # inf passed `value >= 0`: one step left every editor weight non-finite; a bool passed as 1
    (dict(lr=float("inf")), "lr"), (dict(lr_lr=float("inf")), "lr_lr"), (dict(lr=True), "lr"),
    (dict(cloc=float("inf")), "cloc"), (dict(grad_clip="1"), "grad_clip"), (dict(checkpoint_dir=3), "checkpoint_dir"),
    (dict(checkpoint_dir=""), "checkpoint_dir"),  # Path("") is the current directory
    (dict(checkpoint_dir=b"ckpt"), "checkpoint_dir"), (dict(checkpoint_dir=_BytesPath()), "checkpoint_dir"),
    (dict(length_buckets="yes"), "length_buckets"), (dict(length_buckets=1), "length_buckets"),  # bool or None only
    (dict(val_every=0), "val_every"),  # step % 0 inside the run
    (dict(lr_optimizer="rmsprop"), "lr_optimizer"),  # "adam" or "sgd"
])
def test_train_config_refuses_bad_numbers_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field} must"):
        TrainConfig(**changes)


def test_train_config_defaults_are_the_documented_ones():
    """The defaults the README ("Training": `TrainConfig(fisher_mask=True)`, the default; MEND's
    cedit 0.1 and cloc 1.0; balance_weight 1e-2; the locality rows see every editor's shift) and
    the class docstring (batch_size 4, lr 1e-4) state."""
    c = TrainConfig()
    assert c.fisher_mask is True and c.locality_rows == "all"
    assert (c.cedit, c.cloc, c.balance_weight) == (0.1, 1.0, 1e-2)
    assert (c.batch_size, c.lr) == (4, 1e-4)


def test_any_int_seed_runs_and_the_seeds_torch_takes_are_unchanged(gen):
    """seed=2**70 raised "Overflow when unpacking long long" inside fit; the derived seeds of the
    batch order overflowed from about 2**43 on."""
    assert [train_module.torch_seed(s) for s in (0, -5, 2**63, 2**64 - 1)] == [0, -5, 2**63, 2**64 - 1]
    assert train_module.torch_seed(2**70 + 3) == 3 and train_module.torch_seed(-2**63 - 1) == 2**63 - 1
    me = tiny_mend("gpt2", gen)
    result = me.fit(random_requests(gen, 4), None, TrainConfig(steps=1, batch_size=2, seed=2**70, progress=False))
    assert result.steps == 1


def test_a_seed_past_torchs_range_is_reduced_modulo_2_64():
    """torch_seed reduces a seed outside [-2**63, 2**64) modulo 2**64 (its docstring), so the
    upper half of the unsigned range stays reachable: 2**64 + 2**63 + 7 is 2**63 + 7, not 7."""
    assert train_module.torch_seed(2**64 + 2**63 + 7) == 2**63 + 7
    assert train_module.torch_seed(-2**64 - 1) == 2**64 - 1
    assert train_module.torch_seed(2**64) == 0  # the first seed past the range (torch refuses 2**64)


def test_every_epoch_covers_the_requests_in_an_order_of_its_own(gen):
    """`_batch_indices`: epoch-wise random permutations, a pure function of (seed, batch index):
    each epoch's batches hold every request once, and the epochs are shuffled anew."""
    from dcedit_kernels.train import _batch_indices

    seed = seed_from(gen)
    epochs = [_batch_indices(6, 3, seed, 2 * e) + _batch_indices(6, 3, seed, 2 * e + 1) for e in range(4)]
    assert all(sorted(order) == list(range(6)) for order in epochs), epochs
    assert len({tuple(order) for order in epochs}) > 1, epochs
    assert epochs[1] == _batch_indices(6, 3, seed, 2) + _batch_indices(6, 3, seed, 3)


def test_train_editor_checks_its_arguments(gen):
    me = tiny_mend("gpt2", gen)
    reqs = random_requests(gen, 2)
    with pytest.raises(ValueError, match="config must be a TrainConfig, got dict"):
        train_editor(me, reqs, None, dict(steps=1))
    # fit(train, TrainConfig(...)), as a user trial wrote it: the config lands in val_requests
    with pytest.raises(ValueError, match=r"val_requests is a TrainConfig: pass it as config="):
        me.fit(reqs, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="me must be a ModelEditor, got Module"):
        train_editor(nn.Module(), reqs, None, TrainConfig(progress=False))
    ft = ModelEditor(me.model, me.tokenizer, LAYERS["gpt2"], method="ft")
    with pytest.raises(ValueError, match="method 'ft' has no editor to train"):
        train_editor(ft, reqs, None, TrainConfig(progress=False))  # fit() refuses first; this is train_editor's own
    # batch_edits and batch_loss on their own: a bare KeyError naming a layer, after the capture's passes
    for call in (lambda: batch_edits(ft, reqs), lambda: batch_loss(ft, reqs, TrainConfig(progress=False))):
        with pytest.raises(ValueError, match="method 'ft' has no editor to train"):
            call()
    bart, tok = tiny_model("bart", seed=seed_from(gen))
    seq2seq = ModelEditor(bart, tok, ["model.decoder.layers.0.fc2"], method="mend", rank=3)
    with pytest.raises(ValueError, match="causal LMs only"):
        train_editor(seq2seq, reqs, None, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="causal LMs only"):
        batch_loss(seq2seq, reqs, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="causal LMs only"):
        evaluate_edits(seq2seq, reqs)


@pytest.mark.parametrize("refusal,match", [
    ("seq2seq", "causal LMs only"), ("no_editor", "has no editor to train"),
    ("bf16_editor", "float32 or float64 to train"), ("train_requests", "train_requests"),
    ("val_requests", "val_requests")])
def test_a_refused_training_run_leaves_no_checkpoint_dir(refusal, match, gen, tmp_path):
    """Every refusal of train_editor comes before checkpoint_dir is made: a run refused for a
    seq2seq model, a method without editors, a 16-bit editor or invalid requests leaves no empty
    folder behind (a mutant moving the seq2seq refusal after the loop's start(), which makes the
    folder, passed every other test)."""
    reqs, val = random_requests(gen, 2), None
    if refusal == "seq2seq":
        bart, tok = tiny_model("bart", seed=seed_from(gen))
        me = ModelEditor(bart, tok, ["model.decoder.layers.0.fc2"], method="mend", rank=3)
    else:
        me = tiny_mend("gpt2", gen)
    if refusal == "no_editor":
        me = ModelEditor(me.model, me.tokenizer, LAYERS["gpt2"], method="ft")
    elif refusal == "bf16_editor":
        me.editors.to(torch.bfloat16)
    elif refusal == "train_requests":
        reqs = reqs + ["The capital of France is Paris"]
    elif refusal == "val_requests":
        val = [reqs[0], 3]
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=match):
        train_editor(me, reqs, val, TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(ckpt)))
    assert not ckpt.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_train_editor_refuses_16_bit_editors(dtype, gen):
    """Editors moved to fp16 trained to NaN: Adam's state underflows there (eps 1e-8 is 0), and one
    step made every weight of the low-rank layers non-finite with no batch skipped; in bf16 the
    steps (lr 1e-4) rounded away on most weights.  train_editor refuses them with a ValueError
    naming a parameter, before anything changes; the same editors in fp32 train to finite weights."""
    me = tiny_mend("llama", gen)
    me.editors.to(dtype)
    reqs = random_requests(gen, 4)
    before = _editor_params(me)
    norms = [b.detach().clone() for b in me.editors.buffers()]
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"float32 or float64 to train, got '\d+x\d+\.alpha' in {name}:"):
        me.fit(reqs, None, steps=1, batch_size=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, _editor_params(me)))
    assert all(torch.equal(a, b) for a, b in zip(norms, me.editors.buffers()))
    me.editors.float()
    result = me.fit(reqs, None, steps=2, batch_size=2, progress=False)
    assert result.steps == 2 and result.skipped_batches == 0
    assert all(bool(torch.isfinite(p).all()) for p in me.editors.parameters())
    me.editors.to(dtype)  # moved after training, as the message says: it edits
    me.apply(reqs[:2]).undo()


def test_one_edit_without_locality_trains_with_no_kl_row(gen):
    """A batch of one edit without a locality prompt has no locality row (`_locality_row` gives
    None): one rephrase row, KL 0, and a training step still moves the editor."""
    me = tiny_mend("gpt2", gen)
    request = random_requests(gen, 1, locality=False)
    rows = eval_rows(me, request, TrainConfig())
    assert rows["input_ids"].shape[0] == 1 and bool(rows["is_edit_row"].all()) and not bool(rows["kl_mask"].any())
    me.train()
    loss, parts = batch_loss(me, request, TrainConfig(progress=False))
    assert parts["kl"] == 0.0 and parts["edit"] > 0 and torch.isfinite(loss)
    before = _editor_params(me)
    result = me.fit(request, config=TrainConfig(steps=1, batch_size=1, lr=1e-2, lr_lr=1e-2, progress=False))
    assert result.history[0]["kl"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, me.editors.parameters()))


def test_a_one_token_neighbour_prompt_gives_no_locality_row(gen):
    """Without locality prompts, edit e's locality row is edit e+1's prompt minus its last token;
    a one-token prompt leaves no KL position, so that row is left out (the other one is kept)."""
    me = tiny_mend("gpt2", gen)
    assert len(me.tokenizer("a", add_special_tokens=True)["input_ids"]) == 1  # the tiny GPT-2's char tokens
    requests = [EditRequest("a", "xyz"), EditRequest("b cde fgh", "ij")]
    rows = eval_rows(me, requests, TrainConfig())
    # rows: 2 edit rows, then edit 1's locality row (edit 0's prompt "a" has no KL position left).
    assert rows["is_edit_row"].tolist() == [True, True, False]
    assert rows["row_edit"].tolist() == [0, 1, 0]
    kl_positions = rows["kl_mask"][2].sum()
    assert int(kl_positions) == len(me.tokenizer("b cde fgh")["input_ids"]) - 1
    # A two-token prompt leaves one KL position: its row is kept.
    assert len(me.tokenizer("ab", add_special_tokens=True)["input_ids"]) == 2
    rows = eval_rows(me, [EditRequest("b cde", "xyz"), EditRequest("ab", "ij")], TrainConfig())
    assert rows["is_edit_row"].tolist() == [True, True, False, False]
    assert rows["row_edit"].tolist() == [0, 1, 0, 1]
    assert rows["kl_mask"][2].sum().item() == 1 and bool(rows["kl_mask"][2, 0])  # edit 0's: edit 1's "ab"


def _poison_batches(monkeypatch, bad):
    """batch_loss returns a NaN loss for the batches whose first prompt is in `bad`; returns the
    list of (first prompt, poisoned) per call."""
    original, calls = train_module.batch_loss, []

    def poisoned(me, requests, config):
        loss, parts = original(me, requests, config)
        hit = requests[0].prompt in bad
        calls.append((requests[0].prompt, hit))
        return (loss * float("nan") if hit else loss), parts

    monkeypatch.setattr(train_module, "batch_loss", poisoned)
    return calls


def test_a_batch_with_non_finite_gradients_is_skipped_and_counted(gen, monkeypatch):
    """A batch whose gradients stay non-finite unscaled is skipped and counted; the step goes on
    with the other batches of its accumulation, and a step with none left moves no parameter."""
    from dcedit_kernels.train import _batch_indices

    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, accumulate=2, lr=1e-2, lr_lr=1e-2, progress=False, seed=seed_from(gen))
    first = [requests[i] for i in _batch_indices(4, 2, config.seed, 0)]
    calls = _poison_batches(monkeypatch, {first[0].prompt})
    before = _editor_params(me)
    # And said: counted only, a run whose every batch was skipped returned untrained editors silently.
    with pytest.warns(UserWarning, match=r"train_editor: 1 of this run's 2 batches were skipped: .*non-finite"):
        result = me.fit(requests, config=config)
    assert result.skipped_batches == 1 and result.steps == 1
    assert [hit for _, hit in calls] == [True, True, False]  # the poisoned batch ran again unscaled, then skipped
    assert set(result.history[0]) == {"step", "loss", "edit", "kl", "balance"}
    assert all(torch.isfinite(torch.tensor(result.history[0][k])) for k in ("loss", "edit", "kl"))
    assert any(not torch.equal(a, b) for a, b in zip(before, me.editors.parameters()))
    assert all(bool(torch.isfinite(p).all()) for p in me.editors.parameters())

    # Every batch of the step poisoned: no optimiser step, nothing logged but the step number.
    me2 = tiny_mend("gpt2", gen)
    _poison_batches(monkeypatch, {r.prompt for r in requests})
    before = _editor_params(me2)
    with pytest.warns(UserWarning, match=r"2 of this run's 2 batches were skipped"):
        result = me2.fit(requests, config=config)
    assert result.skipped_batches == 2 and result.history == [{"step": 1}]
    assert all(torch.equal(a, b) for a, b in zip(before, me2.editors.parameters()))


def test_a_non_finite_batch_backpropagated_unscaled_is_not_run_again(gen, monkeypatch):
    """The unscaled rerun is for an overflow of a scaled backward only: a batch whose backward ran
    at scale 1 already (one target token) and came out non-finite is skipped at once, not run a
    second time for the same outcome."""
    from dcedit_kernels.train import _batch_indices

    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, accumulate=2, progress=False, seed=seed_from(gen))
    first = [requests[i] for i in _batch_indices(4, 2, config.seed, 0)]
    monkeypatch.setattr(train_module, "backward_scale", lambda n_scored: 1.0)
    calls = _poison_batches(monkeypatch, {first[0].prompt})
    with pytest.warns(UserWarning, match=r"1 of this run's 2 batches were skipped"):
        result = me.fit(requests, config=config)
    assert result.skipped_batches == 1 and result.steps == 1
    assert [hit for _, hit in calls] == [True, False]


@pytest.mark.parametrize("method", ["mend", "moeditor", "raeditor"])
def test_an_overflowing_scaled_backward_reruns_the_batch_from_the_state_it_started_from(method, gen, monkeypatch):
    """A scaled backward whose gradients come out non-finite (fp16 overflow, here forced) runs the
    batch again unscaled from the editors' buffers and RNG states before its first forward: the
    trained editor equals, bit for bit, one trained with no scaling at all.  Without the restore the
    rerun would update MEND's running norms from the batch twice, and draw MoEditor's gate noise or
    RaEditor's groups a second time."""
    model_seed = seed_from(gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=2, batch_size=2, lr=1e-2, lr_lr=1e-2, progress=False, seed=seed_from(gen))
    kwargs = dict(rank=4, seed=1) if method == "mend" else dict(rank=4, seed=1, n_editors=2)
    original = train_module._scaled_grads
    scales = []

    def trained(scale, overflow):
        model, tok = tiny_model("gpt2", seed=model_seed)
        me = ModelEditor(model, tok, LAYERS["gpt2"], method=method, **kwargs)

        def scaled_grads(loss, params, s):
            scales.append(s)
            grads = original(loss, params, s)
            return [g if g is None else g * float("inf") for g in grads] if overflow and s != 1 else grads

        monkeypatch.setattr(train_module, "backward_scale", lambda n_scored: scale)
        monkeypatch.setattr(train_module, "_scaled_grads", scaled_grads)
        result = me.fit(requests, config=config)
        assert result.steps == 2 and result.skipped_batches == 0
        return {k: v.detach().clone() for k, v in me.state_tensors().items()}

    want = trained(1.0, overflow=False)
    assert scales == [1, 1]
    scales.clear()
    got = trained(4.0, overflow=True)
    assert scales == [4.0, 1, 4.0, 1]  # each batch: the scaled backward, then the rerun unscaled
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_step_logs_the_mean_of_the_batches_that_were_not_skipped(gen, monkeypatch):
    """history's loss parts of a step average the batches that contributed to it: with accumulate
    3 and one batch skipped as non-finite, the mean of the other two batches' parts (not a third
    of their sum)."""
    from dcedit_kernels.train import _batch_indices
    from dcedit_kernels.train_config import PART_KEYS

    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 6)
    config = TrainConfig(steps=1, batch_size=2, accumulate=3, lr=1e-2, lr_lr=1e-2, progress=False, seed=seed_from(gen))
    bad = requests[_batch_indices(6, 2, config.seed, 1)[0]].prompt
    original, parts_seen = train_module.batch_loss, []

    def scripted(me_, batch, config_):
        loss, parts = original(me_, batch, config_)
        if batch[0].prompt == bad:
            return loss * float("nan"), parts
        parts_seen.append({k: float(parts[k]) for k in PART_KEYS})
        return loss, parts

    monkeypatch.setattr(train_module, "batch_loss", scripted)
    with pytest.warns(UserWarning, match=r"1 of this run's 3 batches were skipped"):
        result = me.fit(requests, config=config)
    assert result.skipped_batches == 1 and len(parts_seen) == 2
    for k in PART_KEYS:
        assert result.history[0][k] == pytest.approx((parts_seen[0][k] + parts_seen[1][k]) / 2, rel=1e-6), k


def test_a_resumed_run_counts_the_batches_skipped_before_its_checkpoint(gen, tmp_path, monkeypatch):
    """skipped_batches sums every run of a checkpoint_dir, as elapsed_s does: the checkpoint holds
    the count up to its step, and a resume adds its own skipped batches to it."""
    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 4)
    _poison_batches(monkeypatch, {r.prompt for r in requests})  # every batch non-finite: one skipped per step
    config = TrainConfig(steps=1, batch_size=2, progress=False, seed=seed_from(gen), checkpoint_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"1 of this run's 1 batches were skipped"):
        assert me.fit(requests, config=config).skipped_batches == 1
    with pytest.warns(UserWarning, match=r"1 of this run's 1 batches were skipped"):  # the resume's own
        resumed = me.fit(requests, config=config.replace(steps=2))
    assert resumed.resumed_from == 1 and resumed.skipped_batches == 2, resumed.skipped_batches


def test_resume_refuses_a_file_that_is_not_a_trainer_checkpoint(gen, tmp_path):
    from dcedit_kernels.safetensors_file import save_safetensors

    me = tiny_mend("gpt2", gen)
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "trainer.safetensors", {"something": "else"})
    with pytest.raises(ValueError, match="is not a train_editor checkpoint"):
        me.fit(random_requests(gen, 2), config=TrainConfig(steps=1, batch_size=2, progress=False,
                                                            checkpoint_dir=str(tmp_path)))
    for size in (0, 5, 40):  # truncated: a raw SafetensorError, naming no file, before
        with open(tmp_path / "trainer.safetensors", "r+b") as f:
            f.truncate(size)
        with pytest.raises(ValueError, match=r"trainer.safetensors is not a train_editor checkpoint \(not a readable"):
            me.fit(random_requests(gen, 2), config=TrainConfig(steps=1, batch_size=2, progress=False,
                                                                checkpoint_dir=str(tmp_path)))
    # resume=False starts over (and overwrites it).
    result = me.fit(random_requests(gen, 2), config=TrainConfig(steps=1, batch_size=2, progress=False, resume=False,
                                                                 checkpoint_dir=str(tmp_path)))
    assert result.resumed_from is None


@pytest.mark.parametrize("entry", ["opt", "lr_opt", "counters", "model_editor"])
def test_resume_refuses_a_trainer_file_without_one_of_its_metadata_entries(entry, gen, tmp_path):
    """A trainer.safetensors that lacks any of the metadata entries a resume reads (the optimisers',
    the counters, the editor's config) is refused as no train_editor checkpoint, a ValueError
    naming the file, not a KeyError on the entry it lacks."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    me = tiny_mend("gpt2", gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    me.fit(requests, config=config)
    path = tmp_path / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del meta[entry]
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"trainer\.safetensors is not a train_editor checkpoint$"):
        me.fit(requests, config=config.replace(steps=2))


def test_resume_refuses_a_checkpoint_of_another_loss_reduction_or_tokens(gen, tmp_path):
    seed = seed_from(gen)
    reqs = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    model, tok = tiny_model("gpt2", seed=seed)
    ModelEditor(model, tok, LAYERS["gpt2"], method="mend", rank=4, loss_reduction="token").fit(reqs, config=config)
    other = ModelEditor(model, tok, LAYERS["gpt2"], method="mend", rank=4, loss_reduction="edit")
    with pytest.raises(ValueError, match="loss_reduction='token', this ModelEditor uses 'edit'"):
        other.fit(reqs, config=config.replace(steps=2))
    # tokens: which tokens' factors the editors see (a resume once went on with the other setting)
    other = ModelEditor(model, tok, LAYERS["gpt2"], method="mend", rank=4, loss_reduction="token", tokens="target")
    with pytest.raises(ValueError, match="tokens='all', this ModelEditor uses 'target'"):
        other.fit(reqs, config=config.replace(steps=2))


def test_a_checkpoint_from_before_loss_reduction_was_recorded_resumes_as_token(gen, tmp_path):
    """A training checkpoint whose editor config lacks loss_reduction (written before it was
    recorded) was trained with the batch-mean scale, "token" (LEGACY_LOSS_REDUCTION, as
    ModelEditor.load reads such a file): a ModelEditor with loss_reduction="edit" is refused,
    one with "token" resumes it."""
    seed = seed_from(gen)
    reqs = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    model, tok = tiny_model("gpt2", seed=seed)
    ModelEditor(model, tok, LAYERS["gpt2"], method="mend", rank=4, loss_reduction="token").fit(reqs, config=config)
    _rewrite_trainer_checkpoint(tmp_path / "trainer.safetensors", {"model_editor": ["loss_reduction"]})
    other = ModelEditor(model, tok, LAYERS["gpt2"], method="mend", rank=4, loss_reduction="edit")
    with pytest.raises(ValueError, match="loss_reduction='token', this ModelEditor uses 'edit'"):
        other.fit(reqs, config=config.replace(steps=2))
    same = ModelEditor(model, tok, LAYERS["gpt2"], method="mend", rank=4, loss_reduction="token")
    assert same.fit(reqs, config=config.replace(steps=2)).resumed_from == 1


def _damage(meta, tensors, how):
    """A trainer checkpoint's metadata and tensors damaged as `how` names (a file edited by hand)."""
    import json

    entry, _, rest = how.partition(":")
    if entry == "tensor":  # one Adam state one row longer than its parameter
        key = next(k for k in tensors if k.startswith("opt.state.") and k.endswith(".exp_avg"))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
        return
    if entry.startswith("history."):  # the per-step history (`_history_tensors`): a row short, or another dtype
        tensors[entry] = tensors[entry][:-1] if rest == "short" else tensors[entry].double()
        return
    if entry == "rng_state":  # torch's generator state, one byte longer or of another dtype
        tensors[entry] = torch.cat([tensors[entry], tensors[entry][:1]]) if rest == "long" else tensors[entry].int()
        return
    value = json.loads(meta[entry])
    if entry == "opt" and rest == "lr":
        value["param_groups"][0]["lr"] = "x"
    elif rest.startswith("-"):
        del value[rest[1:]]
    else:
        field, _, text = rest.partition("=")
        value[field] = json.loads(text)
    meta[entry] = json.dumps(value)


@pytest.mark.parametrize("how", ["opt:-scalars", "lr_opt:scalars=[1]", "opt:lr", "model_editor:editors=[1]",
                                 "model_editor:-layers", "run:config=3", "counters:-history_keys", "counters:steps=-1",
                                 "counters:steps=1.5", "counters:steps=1000000000000000000000000000000",
                                 "counters:steps=2", "counters:history=\"x\"", "counters:history_keys={}",
                                 "counters:best=[1]", "tensor", "history.value:short", "history.logged:float",
                                 'counters:history_keys=["loss", "edit", "kl", "step"]',
                                 'counters:history_keys=["loss", "edit", "kl", "kl"]', 'counters:history=[{"step": 1, "loss": "x"}]',
                                 'counters:history=[{"step": "x"}]', "rng_state:long", "rng_state:int"])
def test_resume_of_a_damaged_trainer_checkpoint_names_it_and_leaves_the_editors(how, gen, tmp_path):
    """A trainer.safetensors whose metadata entries or optimiser tensors are damaged (edited by hand,
    or another program's): each raised KeyError, TypeError or AttributeError from inside the resume,
    or a TypeError or RuntimeError at the first step (a learning rate "x", an Adam state of another
    shape, a history that is no list), most after the editors had taken the checkpoint's state, or
    resumed a run at step -1; a damaged RNG state raised RuntimeError or TypeError as the loop set it;
    counters' steps other than the history's last step resumed (10**30: a step, then an overflow
    writing the next checkpoint; with no step left, that count reported as done).
    Each is now a ValueError naming the file, with the editors as they were (session 54's resume fuzz:
    996 damaged files: 272 raised another error than ValueError, and 262 left the editors changed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path))
    tiny_mend("gpt2", gen).fit(requests, config=config)
    path = tmp_path / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    _damage(meta, tensors, how)
    save_file(tensors, str(path), metadata=meta)
    me = tiny_mend("gpt2", gen)
    before = {k: v.clone() for k, v in me.state_tensors().items()}
    with pytest.raises(ValueError, match=r"trainer\.safetensors"):
        me.fit(requests, config=config.replace(steps=2))
    assert all(torch.equal(before[k], v) for k, v in me.state_tensors().items())


def test_fit_with_a_config_and_overrides(gen):
    me = tiny_mend("gpt2", gen)
    config = TrainConfig(steps=5, batch_size=2, progress=False)
    result = me.fit(random_requests(gen, 2), config=config, steps=1)
    assert result.steps == 1 and config.steps == 5  # the override, on a copy
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields: \['stepz'\]"):
        me.fit(random_requests(gen, 2), config=config, stepz=1)


@pytest.mark.parametrize("field, value", [
    ("grad_clip", -1.0),    # clip_grad_norm_ takes it and flips every gradient: the run climbed the loss
    ("batch_size", 0),      # ZeroDivisionError in the batch order
    ("accumulate", 0),      # steps counted, nothing trained
    ("edit_rows", "mine"),  # silently "own"
])
def test_a_config_changed_after_it_was_built_is_checked_by_train_editor(field, value, gen):
    """TrainConfig's fields stay assignable: train_editor checks them again before it starts, and
    a refused run leaves the editors as they were."""
    me = tiny_mend("gpt2", gen)
    config = TrainConfig(steps=1, batch_size=2, progress=False)
    setattr(config, field, value)
    before = _editor_params(me)
    with pytest.raises(ValueError, match=f"^{field} must"):
        me.fit(random_requests(gen, 4), None, config)
    assert all(torch.equal(a, b) for a, b in zip(before, me.editors.parameters()))


def test_a_batch_whose_capture_is_not_finite_is_skipped_and_counted(gen):
    """One request runs the model into NaN (a NaN embedding row of a token only its prompt holds):
    the capture of its batch finds a non-finite edit loss, and that batch is skipped and counted as a
    batch with non-finite gradients is (the capture's FloatingPointError once ended the run); the
    other batches train, and the model itself is untouched."""
    me = tiny_mend("gpt2", gen)
    model, tok = me.model, me.tokenizer
    requests = random_requests(gen, 4)
    used = {i for r in requests for t in (r.prompt, r.target, r.rephrase, r.locality, r.locality_target, " ")
            for i in tok(t)["input_ids"]}
    bad = next(i for i in range(3, model.config.vocab_size) if i not in used)
    with torch.no_grad():
        model.transformer.wte.weight[bad] = float("nan")
    poisoned = tok.decode([bad]).strip() + " " + requests[0].prompt
    assert bad in tok(poisoned)["input_ids"]
    requests[0] = EditRequest(poisoned, requests[0].target, requests[0].rephrase, requests[0].locality,
                              requests[0].locality_target)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _editor_params(me)
    with pytest.warns(UserWarning, match=r"1 of this run's 4 batches were skipped"):
        result = me.fit(requests, None, TrainConfig(steps=4, batch_size=1, progress=False, seed=seed_from(gen)))
    assert result.steps == 4 and result.skipped_batches == 1
    assert sum("loss" not in h for h in result.history) == 1
    assert all(bool(torch.isfinite(p).all()) for p in me.editors.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, me.editors.parameters()))
    for k, v in model.state_dict().items():  # bit for bit (the NaN row included)
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0, equal_nan=True)


def test_train_editor_gives_each_editor_module_its_mode_back(gen):
    """Editors in mixed train/eval modes come back in those modes (fit set every module to the
    container's flag)."""
    me = tiny_mend("gpt2", gen)
    me.editors.eval()
    next(iter(me.editors.values())).norm.train()
    modes = {k: m.training for k, m in me.editors.named_modules()}
    me.fit(random_requests(gen, 4), None, TrainConfig(steps=1, batch_size=2, progress=False))
    assert {k: m.training for k, m in me.editors.named_modules()} == modes


def test_fit_under_no_grad_trains_as_outside_it(gen):
    """A caller's `torch.no_grad()` around fit (a script wrapping everything in it, as for
    inference) trained nothing: the step's loss division ran under the caller's mode, the loss lost
    its graph and every batch gave no gradient, silently (steps and losses logged, editors left as
    they were).  fit turns grad on for its own steps: the same editors as a run outside no_grad."""
    me = tiny_mend("llama", gen)
    state = {k: v.clone() for k, v in me.state_tensors().items()}
    reqs = random_requests(gen, 4)
    config = TrainConfig(steps=2, batch_size=2, progress=False)
    me.fit(reqs, None, config)
    outside = me.state_tensors()
    me.load_state_tensors(state)
    with torch.no_grad():
        result = me.fit(reqs, None, config)
        assert not torch.is_grad_enabled()  # the caller's mode back
    assert result.steps == 2 and result.skipped_batches == 0
    inside = me.state_tensors()
    params = [f"editors.{n}" for n, _ in me.editors.named_parameters()]
    assert all(not torch.equal(state[k], inside[k]) for k in params), "fit under no_grad left parameters as they were"
    for k in outside:
        torch.testing.assert_close(inside[k], outside[k], rtol=0, atol=0)


def test_fit_under_inference_mode_says_why(gen):
    """Under torch.inference_mode fit raised autograd's "element 0 of tensors does not require grad
    and does not have a grad_fn", which names neither fit nor inference mode; it says so, as
    `apply` does, before anything changes."""
    me = tiny_mend("llama", gen)
    state = {k: v.clone() for k, v in me.state_tensors().items()}
    why = r"ModelEditor\.fit .*needs autograd.*outside torch\.inference_mode"
    with torch.inference_mode(), pytest.raises(RuntimeError, match=why):
        me.fit(random_requests(gen, 4), None, TrainConfig(steps=1, batch_size=2, progress=False))
    after = me.state_tensors()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("norm", [True, False])
def test_fit_of_editors_built_under_inference_mode_says_why_and_changes_nothing(norm, gen):
    """A ModelEditor built under torch.inference_mode (the model loaded outside it) has editors of
    inference tensors, which apply runs but no step can train.  fit raised torch's "Inplace update
    to inference tensor outside InferenceMode" from the running norm's merge, after it had already
    updated u_mean (norm=True), or "Inference tensors cannot be saved for backward" (norm=False);
    it names the editors' build now, before anything changes."""
    model, tok = tiny_model("llama", seed=seed_from(gen))
    with torch.inference_mode():
        me = ModelEditor(model, tok, LAYERS["llama"], method="mend", rank=4, seed=1, norm=norm)
    state = {k: v.clone() for k, v in me.state_tensors().items()}
    why = r"ModelEditor\.fit .*the editors' tensors are inference tensors.*'[^']+'.*outside torch\.inference_mode"
    with pytest.raises(RuntimeError, match=why):
        me.fit(random_requests(gen, 4), None, TrainConfig(steps=1, batch_size=2, progress=False))
    after = me.state_tensors()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("frozen", ["all", "alpha", "one editor"])
def test_fit_of_frozen_editor_parameters_says_why_and_changes_nothing(frozen, gen):
    """Editor parameters a caller froze (requires_grad_(False), as for serving an editor):
    with all of them frozen fit ran its steps and logged their losses but trained nothing, with no
    batch skipped; with some (every α, or one shape's editor) it raised autograd's "One of the
    differentiated Tensors does not require grad" from the first step, after that batch had
    already merged into the running norms.  fit trains every editor parameter: it refuses, naming
    the first frozen one, before anything changes."""
    me = tiny_mend("llama", gen)
    if frozen == "all":
        me.editors.requires_grad_(False)
    elif frozen == "alpha":
        for editor in me.editors.values():
            editor.alpha.requires_grad_(False)
    else:
        next(iter(me.editors.values())).requires_grad_(False)
    state = {k: v.clone() for k, v in me.state_tensors().items()}
    flags = [p.requires_grad for p in me.editors.parameters()]
    why = r"ModelEditor\.fit .*trains every editor parameter.*'[^']+' .*requires_grad=False"
    with pytest.raises(ValueError, match=why):
        me.fit(random_requests(gen, 4), None, TrainConfig(steps=1, batch_size=2, progress=False))
    after = me.state_tensors()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [p.requires_grad for p in me.editors.parameters()] == flags


def test_fit_trains_editors_left_in_eval_mode_as_in_train_mode(gen):
    """Editors a caller left in eval mode (after `apply`, or `me.editors.eval()`) train in train
    mode: their running norms update and the run trains the same editors as one started in train
    mode; eval mode comes back after."""
    me = tiny_mend("gpt2", gen)
    state = {k: v.clone() for k, v in me.state_tensors().items()}
    reqs = random_requests(gen, 4)
    config = TrainConfig(steps=2, batch_size=2, progress=False, seed=seed_from(gen))
    me.fit(reqs, None, config)
    in_train = me.state_tensors()
    me.load_state_tensors(state)
    me.editors.eval()
    me.fit(reqs, None, config)
    assert not any(m.training for m in me.editors.modules())
    in_eval = me.state_tensors()
    norms = [k for k in state if ".norm." in k]
    assert norms and any(not torch.equal(state[k], in_eval[k]) for k in norms), "the running norms did not update"
    for k in in_train:
        torch.testing.assert_close(in_eval[k], in_train[k], rtol=0, atol=0)


def test_fit_leaves_the_callers_random_state_as_it_was(gen):
    """fit seeds torch's generator with its own seed for the run (gate noise, random groups), in a
    fork: the caller's random stream goes on after fit as if fit had not run."""
    me = tiny_mend("gpt2", gen)
    reqs = random_requests(gen, 4)
    torch.manual_seed(seed_from(gen))
    state = torch.get_rng_state()
    me.fit(reqs, None, TrainConfig(steps=1, batch_size=2, progress=False, seed=seed_from(gen) + 1000))
    assert torch.equal(torch.get_rng_state(), state)


def test_grad_clip_beyond_floats_range_is_refused_before_training():
    """grad_clip=10**400 (an int beyond float's range) passed TrainConfig's check and
    clip_grad_norm_ raised OverflowError ("int too large to convert to float") at the first step
    (found by an argument sweep).  It is now refused naming grad_clip, at construction and by
    validate; inf (no clipping) and floats up to float's max are still taken."""
    import math

    with pytest.raises(ValueError, match=r"^grad_clip must be positive .* or None, got 1000"):
        TrainConfig(grad_clip=10**400)
    config = TrainConfig()
    config.grad_clip = -(10**400)
    with pytest.raises(ValueError, match=r"^grad_clip must be positive"):
        config.validate()
    for ok in (math.inf, 1e308, 10**300, 5, None):
        assert TrainConfig(grad_clip=ok).grad_clip == ok


_FIT_INTO = """
import sys
import dcedit_kernels.train as train
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.requests import EditRequest

steps = []
accumulate = train._accumulate
train._accumulate = lambda *args, **kwargs: (steps.append(1), accumulate(*args, **kwargs))[1]
model, tok = tiny_model("gpt2", seed=0)
me = ModelEditor(model, tok, ["transformer.h.1.mlp.c_proj"], method="mend", rank=2, seed=1)
reqs = [EditRequest(prompt=f"The {w} is in", target=t, locality="The sky is", locality_target="blue")
        for w, t in (("cat", "Paris"), ("dog", "Rome"))]
try:
    me.fit(reqs, steps=1, batch_size=2, progress=False, checkpoint_dir=sys.argv[1])
    print("trained", len(steps))
except OSError as exc:
    print(type(exc).__name__, exc.filename, len(steps))
"""


def test_fit_refuses_a_checkpoint_dir_it_may_not_write_before_the_first_step(tmp_path):
    """Only `dcedit train` checked that --checkpoint-dir could be written: a library `fit` into a
    read-only folder (or one holding a read-only checkpoint file) trained val_every steps, then its
    first checkpoint failed and the training done so far was lost.  fit now makes the CLI's check
    (`train_checkpoint.check_checkpoint_dir`, one function for both) before the first step: the
    OS's PermissionError naming the folder or file, no step run.  A writable folder trains."""
    import os

    from test_editor_save_load import _run_unprivileged

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    try:
        for ckpt in (read_only, read_only / "new"):
            out = _run_unprivileged(_FIT_INTO, ckpt).splitlines()
            assert out[-1] == f"PermissionError {read_only} 0", out
    finally:
        os.chmod(read_only, 0o755)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "editor.safetensors").write_bytes(b"kept")
    os.chmod(kept / "editor.safetensors", 0o444)
    out = _run_unprivileged(_FIT_INTO, kept).splitlines()
    assert out[-1] == f"PermissionError {kept / 'editor.safetensors'} 0", out
    out = _run_unprivileged(_FIT_INTO, tmp_path / "writable").splitlines()
    assert out[-1] == "trained 1", out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_checkpoint_dir_where_no_folder_can_be_made_is_refused_even_as_root(tmp_path, capsys):
    """os.access passes every folder for root, /proc and /sys included: `dcedit train
    --checkpoint-dir /proc/x` loaded the model, then failed at fit's mkdir.  The check makes (and
    removes) a folder of its own in the nearest folder that exists, as the CLI's --out check does."""
    from dcedit_kernels.cli import main
    from dcedit_kernels.train_checkpoint import check_checkpoint_dir

    with pytest.raises(PermissionError) as caught:
        check_checkpoint_dir("/proc/dcedit-checkpoint/deeper")
    assert caught.value.filename == "/proc"
    assert main(["train", "--checkpoint-dir", "/proc/dcedit-checkpoint", "--out", str(tmp_path / "e.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("dcedit: error: --checkpoint-dir /proc/dcedit-checkpoint: cannot "
                                              "write in /proc (its checkpoints would fail after --val-every steps)")


def test_an_older_checkpoints_best_file_saved_over_while_it_resumes_gives_one_files_tensors(gen, tmp_path,
                                                                                             monkeypatch):
    """A checkpoint from before the best state went into trainer.safetensors resumes with the best
    state of best.safetensors, which the resume read with load_file: it parses the header of the
    file it opens, then maps the path again for the tensors, so a save over it in between gave
    tensors read at the first file's offsets from the second's bytes (neither file's).  It is read
    as trainer.safetensors is (`read_safetensors`): the tensors of the file now there."""
    import os

    from safetensors.torch import save_file

    from dcedit_kernels import train_checkpoint
    from dcedit_kernels.train_config import TrainResult

    me = tiny_mend("gpt2", gen)
    opt, lr_opt, run = _checkpoint_with_history(me, tmp_path, [{"step": 1}])
    _rewrite_trainer_checkpoint(tmp_path / "trainer.safetensors", {"counters": ["best"]})
    best, other = tmp_path / "best.safetensors", tmp_path / "other.safetensors"
    states = [{k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in me.state_tensors().items()}
              for _ in range(2)]
    save_file(states[0], str(best))
    save_file(states[1], str(other), metadata={"note": "x" * 13})  # another header length
    original = torch.UntypedStorage.from_file

    def saved_over_meanwhile(filename, *args, **kwargs):
        if os.path.basename(filename) == best.name and other.exists():
            os.replace(other, best)
        return original(filename, *args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "from_file", saved_over_meanwhile)
    got = train_checkpoint._resume(me, opt, lr_opt, tmp_path, TrainResult(steps=0), run)[1]
    assert not other.exists()  # the save did land during the resume
    assert got.keys() == states[1].keys() and all(torch.equal(got[k], states[1][k]) for k in got)


def _checkpoint_with_history(me, folder, history):
    """train_checkpoint._checkpoint of `me` at step len(history) with `history` as TrainResult.history,
    in `folder`; returns (optimisers, run settings) for a `_resume` of it."""
    from dcedit_kernels import train_checkpoint
    from dcedit_kernels.train_config import TrainResult

    opt = torch.optim.Adam(list(me.editors.parameters()))
    lr_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    run = train_checkpoint._run_settings(TrainConfig(steps=1, batch_size=2, progress=False), None, None)
    train_checkpoint._checkpoint(me, opt, lr_opt, folder, TrainResult(steps=len(history), history=history), 0, run,
                                 [train_checkpoint._rng_states(me)])
    return opt, lr_opt, run


def _header_bytes(path) -> int:
    import struct

    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_the_trainer_checkpoints_header_does_not_grow_with_the_steps_and_the_history_resumes_exactly(gen, tmp_path):
    """trainer.safetensors held TrainResult.history as JSON in its counters: its header grew by ~125
    bytes a step (127 KB at 1,000 steps, 12.5 MB at 100,000: 1.9 s a save, 2.2 s a resume), and
    past ~800,000 steps over safetensors' 100 MB header limit, a checkpoint saved and then refused
    by its resume ("header too large").  The history is now tensors: the header is the same size at
    10 and 10,000 steps, and a resume gives the history back exactly (Python floats, int steps, a
    step whose batches were all skipped logging its step alone, non-finite values)."""
    import math
    import random

    from dcedit_kernels import train_checkpoint
    from dcedit_kernels.train_config import PART_KEYS, TrainResult

    me = tiny_mend("gpt2", gen)
    rnd = random.Random(seed_from(gen))
    sizes = {}
    for n in (10, 10_000):
        history = [dict(step=i + 1, **{k: rnd.random() * 10 ** rnd.randint(-30, 30) for k in PART_KEYS})
                   for i in range(n)]
        history[3] = dict(step=4)  # every batch skipped
        history[5]["kl"], history[6]["edit"] = math.inf, -0.0
        folder = tmp_path / str(n)
        folder.mkdir()
        opt, lr_opt, run = _checkpoint_with_history(me, folder, history)
        sizes[n] = _header_bytes(folder / "trainer.safetensors")
        resumed = TrainResult(steps=0)
        train_checkpoint._resume(me, opt, lr_opt, folder, resumed, run)
        assert resumed.history == history
        assert [list(map(type, e.values())) for e in resumed.history] == [list(map(type, e.values())) for e in history]
        assert math.copysign(1, resumed.history[6]["edit"]) == -1
    assert sizes[10_000] - sizes[10] < 1024, sizes  # the digits of larger offsets and shapes (JSON: 1.2 MB more)


def test_checkpoints_under_a_meta_default_device_save_and_resume(gen, tmp_path):
    """Under torch.set_default_device("meta") (left on after building a model skeleton), fit built
    its checkpoint's per-step history tensors (`_history_tensors`) on "meta", and the save raised
    "Cannot copy out of meta tensor" at the run's first checkpoint, after its steps (a run that
    checkpointed and resumed there before the history went into tensors).  They are made on the
    CPU: the run checkpoints, and resumes to the history of a plain run."""
    seed = seed_from(gen)
    requests = random_requests(gen, 4)
    config = TrainConfig(steps=1, batch_size=2, progress=False, seed=seed)
    want = tiny_mend("gpt2", torch.Generator().manual_seed(seed)).fit(requests, config=config.replace(steps=2))
    me = tiny_mend("gpt2", torch.Generator().manual_seed(seed))
    with default_device("meta"):
        me.fit(requests, config=config.replace(checkpoint_dir=str(tmp_path)))
        got = me.fit(requests, config=config.replace(steps=2, checkpoint_dir=str(tmp_path), resume=True))
    assert got.resumed_from == 1 and got.history == want.history


def test_a_checkpoint_holding_its_history_in_its_counters_resumes_with_it(gen, tmp_path):
    """A trainer.safetensors written before the history went into tensors (counters["history"], no
    "history." tensors) resumes with that history; one whose counters name a history it lacks the
    tensors of is refused as no train_editor checkpoint (ValueError naming it), the editors as they were."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dcedit_kernels import train_checkpoint
    from dcedit_kernels.train_config import TrainResult

    me = tiny_mend("gpt2", gen)
    history = [dict(step=1, loss=0.5, edit=0.25, kl=0.125, balance=0.0), dict(step=2)]
    opt, lr_opt, run = _checkpoint_with_history(me, tmp_path, history)
    path = tmp_path / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    counters = json.loads(meta["counters"])
    del counters["history_keys"]
    old = dict(meta, counters=json.dumps(dict(counters, history=history)))
    save_file({k: v for k, v in tensors.items() if not k.startswith("history.")}, str(path), metadata=old)
    resumed = TrainResult(steps=0)
    train_checkpoint._resume(me, opt, lr_opt, tmp_path, resumed, run)
    assert resumed.history == history and resumed.steps == 2
    save_file({k: v for k, v in tensors.items() if k != "history.value"}, str(path), metadata=meta)
    me.load_state_tensors({k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in me.state_tensors().items()})
    before = {k: v.clone() for k, v in me.state_tensors().items()}
    with pytest.raises(ValueError, match=r"trainer\.safetensors is not a train_editor checkpoint .*history\.value"):
        train_checkpoint._resume(me, opt, lr_opt, tmp_path, TrainResult(steps=0), run)
    assert all(torch.equal(before[k], v) for k, v in me.state_tensors().items())



@pytest.mark.parametrize("field", ["prompt", "rephrase", "locality", "val_rephrase", "val_locality"])
def test_a_request_past_a_learned_position_table_is_refused_before_the_first_step(field, gen):
    """A training request longer than GPT-2's learned positions failed with torch's bare IndexError
    at its batch, however many steps in (a GPU's lookup is a device-side assert), after the
    editors' running norms had taken the batch in; now every request is checked before the first
    step, named by its field, and the editors are left as they were.  A validation request's
    locality is not run (validation scores the edit rows), so it is not refused; nor is a long
    request of a rotary model, which runs past its max_position_embeddings as transformers lets it."""
    me = tiny_mend("gpt2", gen)
    limit = me.model.config.n_positions
    long = "word " * int(torch.randint(limit, 2 * limit, (1,), generator=gen))
    reqs, val = random_requests(gen, 5), random_requests(gen, 3)
    k, j = int(torch.randint(0, 5, (1,), generator=gen)), int(torch.randint(0, 3, (1,), generator=gen))
    if field.startswith("val_"):
        val[j] = dataclasses.replace(val[j], **{field[4:]: long})
    else:
        reqs[k] = dataclasses.replace(reqs[k], **{field: long})
    _lookups_past_the_table_abort(me.model)  # as a GPU's device-side assert: never read past the table
    state = [t.detach().clone() for t in [*me.editors.parameters(), *me.editors.buffers()]]
    config = TrainConfig(steps=3, batch_size=2, val_every=2, val_size=3, progress=False)
    if field == "val_locality":
        me.fit(reqs, val, config)
        return
    name = {"prompt": f"train_requests[{k}].prompt + train_requests[{k}].target",
            "rephrase": f"train_requests[{k}].rephrase + train_requests[{k}].target",
            "locality": f"train_requests[{k}].locality + train_requests[{k}].locality_target",
            "val_rephrase": f"val_requests[{j}].rephrase + val_requests[{j}].target"}[field]
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} is \d+ tokens, more than the model's {limit} "
                                         r"positions$"):
        me.fit(reqs, val, config)
    assert all(torch.equal(a, b) for a, b in zip(state, [*me.editors.parameters(), *me.editors.buffers()]))
    if field == "rephrase":
        tiny_mend("llama", gen).fit(reqs, None, TrainConfig(steps=1, batch_size=5, progress=False))


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_target_the_tokenizer_cannot_spell_is_refused_before_the_first_step(where, gen):
    """A tokenizer without byte fallback (a SentencePiece model's) spells "巴黎" as ['▁', '<unk>'],
    which tokenize refuses; training tokenizes a request only when a batch draws it, so a run
    stopped at that batch, the editors trained that far, naming the request's place in its batch
    (a helper's trial: step 13 of 20, "targets[2]").  Now every target is checked before the first
    step, named by its request, and the editors are left as they were."""
    from tokenizers import models

    me = tiny_mend("llama", gen)
    backend = me.tokenizer.backend_tokenizer
    backend.model = models.BPE(vocab=backend.get_vocab(), merges=[], byte_fallback=False, unk_token="<unk>",
                               fuse_unk=True)
    reqs, val = random_requests(gen, 6), random_requests(gen, 3)
    k = int(torch.randint(0, 6 if where == "train" else 3, (1,), generator=gen))
    (reqs if where == "train" else val)[k] = dataclasses.replace((reqs if where == "train" else val)[k], target="巴黎")
    state = [t.detach().clone() for t in [*me.editors.parameters(), *me.editors.buffers()]]
    with pytest.raises(ValueError, match=rf"^{where}_requests\[{k}\]\.target \('巴黎'\) tokenizes to \['▁', '<unk>'\], "
                                         "which spells none of its characters"):
        me.fit(reqs, val, TrainConfig(steps=4, batch_size=2, val_every=2, val_size=3, progress=False))
    assert all(torch.equal(a, b) for a, b in zip(state, [*me.editors.parameters(), *me.editors.buffers()]))
    if where == "val":  # past val_size a request is not validated on, so not refused
        val[k] = dataclasses.replace(val[k], target="fine")
        me.fit(reqs, [*val, dataclasses.replace(val[0], target="巴黎")],
               TrainConfig(steps=2, batch_size=2, val_every=2, val_size=3, progress=False))


def test_fit_and_evaluate_without_progress_build_no_bar(gen, monkeypatch):
    """tqdm(disable=True) started tqdm's monitor thread, which outlived the bar: after
    fit(progress=False) the process held a second thread for good (Python 3.12's fork warns of a
    multi-threaded process).  Without progress no bar is built (tqdm is made to fail if one is:
    the thread, started once per process, would not tell after an earlier test's bar)."""
    import tqdm.auto

    from dcedit_kernels.evaluate import evaluate_method

    def no_bar(*args, **kwargs):
        raise AssertionError("a tqdm bar was built with progress off")

    monkeypatch.setattr(tqdm.auto, "tqdm", no_bar)
    me = tiny_mend("gpt2", gen)
    reqs = random_requests(gen, 4)
    me.fit(reqs, None, TrainConfig(steps=2, batch_size=2, progress=False))
    evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=(2,), repeats=1, progress=False)


@pytest.mark.parametrize("fn", ["batch_loss", "eval_rows", "evaluate_edits"])
def test_trainings_public_steps_refuse_a_row_past_a_learned_position_table(fn, gen):
    """batch_loss, eval_rows and evaluate_edits, called on their own (fit checks every request
    first), let a long row reach GPT-2's position table: a bare IndexError on the CPU, a device-side
    assert on a GPU.  Each refuses it before the model reads it, naming the request and field
    (evaluate_edits by its place in `requests`, not in the batch it applies)."""
    me = tiny_mend("gpt2", gen)
    _lookups_past_the_table_abort(me.model)
    limit = me.model.config.n_positions
    long = "w" * int(torch.randint(limit + 1, 2 * limit, (1,), generator=gen))
    reqs = random_requests(gen, 3)
    cases = {"rephrase": (dataclasses.replace(reqs[2], rephrase=long), r"requests\[2\]\.rephrase \+ requests\[2\]\.target"),
             "prompt": (dataclasses.replace(reqs[2], prompt=long),
                        r"requests\[2\]( is \d+ tokens \(prompt \+ target\)|\.prompt \+ requests\[2\]\.target)"),
             "locality": (dataclasses.replace(reqs[2], locality=long),
                          r"requests\[2\]\.locality \+ requests\[2\]\.locality_target")}
    run = {"batch_loss": lambda r: batch_loss(me, r, TrainConfig(progress=False)),
           "eval_rows": lambda r: eval_rows(me, r, TrainConfig(progress=False)),
           "evaluate_edits": lambda r: evaluate_edits(me, r, batch_size=2)}[fn]
    for field, (bad, name) in cases.items():
        # Rows a step does not read: validation scores the edit rows only, eval_rows' edit row is the
        # rephrase (the capture, batch_edits', reads the prompt).
        if (fn, field) in (("evaluate_edits", "locality"), ("eval_rows", "prompt")):
            run(reqs[:2] + [bad])
            continue
        with pytest.raises(ValueError, match=rf"^{name}.* more than the model's {limit} positions"):
            run(reqs[:2] + [bad])
    if fn == "eval_rows":  # an edit without a locality prompt gets the next edit's prompt as its row
        rows = [EditRequest("ab", "cd"), EditRequest(long, "x", rephrase="r")]
        with pytest.raises(ValueError, match=r"^requests\[1\]\.prompt \(the locality row of requests\[0\]\) is"):
            run(rows)
