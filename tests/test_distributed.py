"""Data-parallel editor training (`dcedit_kernels.distributed`): two processes over gloo on CPU,
each with its own replica of the tiny Llama and its ModelEditor.

- Without running norms, two processes with `accumulate` a train the editors as one process with
  2·a: the same batches, the averaged gradient (identical up to the order of the sums).
- With running norms the processes' editors stay identical and every process ends each step with
  the statistics of all the tokens one process with 2·a would have seen; validation (each process
  scores a share of the batches: the scores are one process's), checkpoints and a resume work
  across them, and the resume is exact.
- A resume with another number of processes or from different checkpoints, or processes given
  different settings (the editors' own included), are refused on every process (none waits), and a
  failure on one process (its requests' or its ModelEditor's checks; mid-training: its batch, its
  optimiser step, its validation share, rank 0's best-editor save or checkpoint) raises on both.
Each run has a deadline: a process left waiting in a collective fails the test instead of hanging it.
"""

import copy
import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.train import TrainConfig, evaluate_edits, train_editor

from test_demo import tiny_model_dir  # noqa: F401 (fixture: the tiny Llama saved to a folder)

LAYERS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
WORLD = 2


def _requests(seed, n):
    from test_model_editor import random_requests

    return random_requests(torch.Generator().manual_seed(seed), n)


def _editor(method, editor_kwargs, dtype=None):
    """dtype (float64): the model and the editors in it (the editors are built fp32); editor_kwargs'
    "model_seed" (not a ModelEditor argument): the tiny model's seed, 0 if not given."""
    editor_kwargs = dict(editor_kwargs)
    model_seed = editor_kwargs.pop("model_seed", 0)
    model, tok = tiny_model("llama", seed=model_seed, **({} if dtype is None else dict(dtype=dtype)))
    me = ModelEditor(model, tok, LAYERS, method=method, **{"rank": 5, "seed": 3, **editor_kwargs})
    if dtype is not None:
        me.editors.to(dtype)
    return me


def _train(me, config, val=None):
    result = train_editor(me, _requests(1, 12), val, config)
    return result, {k: v.detach().clone() for k, v in me.state_tensors().items()}


def _inject_failure(fail, rank):
    """`fail` = (name, rank, n): on that rank, the n-th call of editor training's `name` raises
    OSError.  It is patched in dcedit_kernels.train and in each module train is split into that
    holds it (`_save_editor`: the loop's validation and train_checkpoint's `_checkpoint` call it),
    the calls counted together."""
    from dcedit_kernels import train, train_checkpoint, train_config, train_loss, train_validation

    name, on_rank, n = fail
    if rank != on_rank:
        return
    modules = [m for m in (train, train_config, train_loss, train_validation, train_checkpoint) if hasattr(m, name)]
    original, calls = getattr(modules[0], name), []
    assert all(getattr(m, name) is original for m in modules), name

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(f"injected failure in {name}")
        return original(*args, **kwargs)

    for module in modules:
        setattr(module, name, failing)


def _worker(rank, store, out, method, editor_kwargs, runs, with_val, fail, rank_kwargs, rank_editor_kwargs=None,
            dtype=None):
    """Each of `runs` (TrainConfig keyword dicts, updated with `rank_kwargs[rank]`) in turn on one
    ModelEditor, data-parallel; the last state and result, or the error ("Type: message"), go to
    files in `out`."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        if fail is not None:
            _inject_failure(fail, rank)
        me = _editor(method, dict(editor_kwargs, **(rank_editor_kwargs or {}).get(rank, {})), dtype)
        val = _requests(2, 3) if with_val else None
        try:
            for kwargs in runs:
                config = TrainConfig(**dict(kwargs, data_parallel=True, **rank_kwargs.get(rank, {})))
                result, state = _train(me, config, val)
        except Exception as exc:  # noqa: BLE001 -- the test reads it
            with open(f"{out}/error{rank}.txt", "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
            return
        torch.save(state, f"{out}/state{rank}.pt")
        with open(f"{out}/result{rank}.json", "w") as f:
            json.dump(dict(history=result.history, val_history=result.val_history, steps=result.steps,
                           resumed_from=result.resumed_from, skipped=result.skipped_batches), f)
    finally:
        dist.barrier()  # no process tears the group down while another still talks to it
        dist.destroy_process_group()


# The workers' imports (torch, transformers' Llama, the package, this module), done once in the
# forkserver: a spawned worker paid them again in each of the 2 processes of each of the 16 runs
# (about 10 s of every run's 30 on 2 CPUs).  A forkserver child is still a fresh process forked from
# a server that imported only these (no thread pools, no state of the test process).
# A name this transformers lacks is passed over (the Llama tokenizer's module: 5.x's, then 4.x's).
WORKER_IMPORTS = ["torch", "torch.distributed", "transformers.models.llama.modeling_llama",
                  "transformers.models.llama.tokenization_llama", "transformers.models.llama.tokenization_llama_fast",
                  "dcedit_kernels.models", "dcedit_kernels.model_editor", "dcedit_kernels.train", "test_distributed"]


def _start_workers(args, worker=_worker):
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(WORKER_IMPORTS)  # read when the server starts (the first run)
    return mp.start_processes(worker, nprocs=WORLD, join=False, start_method="forkserver", args=args)


def _run(folder, method, editor_kwargs, runs, with_val=False, fail=None, rank_kwargs=None, deadline_s=300,
         rank_editor_kwargs=None, dtype=None):
    folder.mkdir(parents=True, exist_ok=True)
    errors = [folder / f"error{r}.txt" for r in range(WORLD)]
    context = _start_workers(
        (str(folder / "store"), str(folder), method, editor_kwargs, runs, with_val, fail, rank_kwargs or {},
         rank_editor_kwargs or {}, dtype))
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                pytest.fail(f"the processes were still running after {deadline_s} s (one waits for another)")
    except mp.ProcessExitedException as exc:
        # Once in CI (2 loaded cores) a process aborted in gloo's teardown ("terminate called without
        # an active exception") after the test's work; a process that ends before writing its
        # outcome still fails here.
        done = all(errors[r].is_file() or (folder / f"result{r}.json").is_file() for r in range(WORLD))
        if exc.signal_name != "SIGABRT" or not done:
            raise
    if any(e.is_file() for e in errors):
        return None, [e.read_text() if e.is_file() else None for e in errors]
    states = [torch.load(folder / f"state{r}.pt") for r in range(WORLD)]
    results = [json.loads((folder / f"result{r}.json").read_text()) for r in range(WORLD)]
    return states, results


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_train_as_one_with_twice_the_accumulation(tmp_path, one_thread):
    config = dict(steps=3, batch_size=2, accumulate=1, lr=1e-2, lr_lr=1e-2, progress=False)
    # Rank 1 builds its editors from another seed: every process starts from rank 0's (broadcast_state).
    states, results = _run(tmp_path, "mend", dict(norm=False), [config], rank_editor_kwargs={1: dict(seed=4)})
    me = _editor("mend", dict(norm=False))
    single, state = _train(me, TrainConfig(**dict(config, accumulate=2)))
    initial = _editor("mend", dict(norm=False)).state_tensors()
    assert any(not torch.equal(want, initial[key]) for key, want in state.items())  # it did train
    for key, want in state.items():
        assert torch.equal(states[0][key], states[1][key]), key  # the replicas stay identical
        assert torch.allclose(states[0][key], want, rtol=1e-4, atol=1e-6), key
    for got, want in zip(results[0]["history"], single.history):  # the logged losses: all batches'
        for k in ("loss", "edit", "kl"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6)


def test_running_norms_validation_checkpoints_and_an_exact_resume(tmp_path, one_thread):
    config = dict(steps=3, batch_size=2, accumulate=1, lr=1e-2, progress=False, val_every=1,
                  restore_best=False)  # the last state: the norms of every step
    straight, _ = _run(tmp_path / "straight", "moeditor", dict(n_editors=2),
                       [dict(config, checkpoint_dir=str(tmp_path / "a"))], with_val=True)
    ckpt = tmp_path / "b"
    states, results = _run(tmp_path / "resumed", "moeditor", dict(n_editors=2),
                           [dict(config, steps=2, checkpoint_dir=str(ckpt)), dict(config, checkpoint_dir=str(ckpt))],
                           with_val=True)
    assert results[0]["val_history"] == results[1]["val_history"] and len(results[0]["val_history"]) == 3
    assert results[0]["resumed_from"] == 2 and results[0]["steps"] == 3
    assert (ckpt / "trainer.safetensors").is_file() and (ckpt / "best.safetensors").is_file()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
        assert torch.equal(states[0][key], straight[0][key]), key  # every process's RNG states came back
    # The norms hold every token (and the gate's, every edit) of the run: those one process with
    # accumulate=2 would have seen.
    me = _editor("moeditor", dict(n_editors=2))
    _, single = _train(me, TrainConfig(**dict(config, accumulate=2)))
    norm_keys = [k for k in single if ".norm." in k or ".gate_norm." in k]  # MoEditor's gate statistics too
    assert any(".gate_norm." in k for k in norm_keys)
    for key in norm_keys:
        assert torch.allclose(states[0][key], single[key], rtol=1e-4, atol=1e-7), key
    # The processes scored a share of the validation batches each: the scores are one process's.
    me.load_state_tensors(states[0])
    assert dict(step=3, **evaluate_edits(me, _requests(2, 3), config["batch_size"])) == results[0]["val_history"][-1]


def _row_statistics(rows):
    """Count, column means, sums of squared deviations and (count − 1) stds of the rows of `rows` (a
    list of (n, d) tensors), rounded to fp32 as the running norms read them, then in float64."""
    x = torch.cat([r.to(torch.float32) for r in rows]).double()
    mean = x.mean(0)
    s = (x - mean).square().sum(0)
    return x.shape[0], mean, s, (s / (x.shape[0] - 1)).sqrt()


def _assert_norm_holds(buffers, kinds, rtol, atol):
    """`buffers`: a norm's, by name (RunningNorm's u_mean, u_s, u_std, v_…, k; FeatureNorm's mean, s,
    std, k); `kinds`: {buffer name prefix: the rows that norm saw}."""
    for prefix, rows in kinds.items():
        k, mean, s, std = _row_statistics(rows)
        assert float(buffers["k"]) == k, (prefix, float(buffers["k"]), k)
        for name, want in (("mean", mean), ("s", s), ("std", std)):
            got = buffers[prefix + name].double()
            assert torch.allclose(got, want, rtol=rtol, atol=atol), (prefix + name, float((got - want).abs().max()))


def test_float64_running_norms_of_two_processes_hold_every_row_one_process_saw(tmp_path, one_thread, gen, monkeypatch):
    """float64 editors (fit's other dtype) with MEND's running norms, 2 steps of a drawn batch order: the
    processes' editors stay identical (rank 1 built other ones), and their norms hold the count,
    means, sums of squared deviations and (k − 1) stds of every μ and η row that one process with
    twice the accumulation fed its norm in those steps (recorded from its norm's updates; the
    statistics computed here in float64)."""
    from dcedit_kernels.editors.running_norm import RunningNorm

    config = dict(steps=2, batch_size=2, accumulate=1, lr=1e-2, progress=False,
                  seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    states, _ = _run(tmp_path, "mend", {}, [config], rank_editor_kwargs={1: dict(seed=4)}, dtype=torch.float64)
    rows, update = [], RunningNorm.update

    def recording(self, mu, eta):
        rows.append((mu.detach().clone(), eta.detach().clone()))
        return update(self, mu, eta)

    monkeypatch.setattr(RunningNorm, "update", recording)
    _train(_editor("mend", {}, torch.float64), TrainConfig(**dict(config, accumulate=2)))
    assert len(rows) == 2 * 2 * len(LAYERS)  # 2 steps of 2 batches, each edited layer's rows (one shape: one norm)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    prefix = "editors.37x24.norm."
    merged = {key[len(prefix):]: t for key, t in states[0].items() if key.startswith(prefix)}
    assert merged["u_mean"].dtype == torch.float64
    _assert_norm_holds(merged, {"u_": [mu for mu, _ in rows], "v_": [eta for _, eta in rows]}, rtol=1e-10, atol=1e-13)


def test_float64_proeditor_two_processes_take_the_steps_of_one_with_twice_the_accumulation(tmp_path, one_thread, gen):
    """ProEditor without running norms (it draws no random numbers in training), float64 editors,
    accumulate=2 (a process's step: its batches b·2 + rank of the step's 4), a drawn batch order and α
    moved by SGD (by the averaged gradient's size, which Adam's steps nearly ignore): every editor
    tensor and logged loss is the one-process run's with accumulate=4, to float64 rounding; rank 1
    built other editors."""
    config = dict(steps=2, batch_size=2, accumulate=2, lr=1e-2, lr_lr=1e-2, lr_optimizer="sgd", progress=False,
                  seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    states, results = _run(tmp_path, "proeditor", dict(norm=False), [config], rank_editor_kwargs={1: dict(seed=4)},
                           dtype=torch.float64)
    single, want = _train(_editor("proeditor", dict(norm=False), torch.float64), TrainConfig(**dict(config, accumulate=4)))
    initial = _editor("proeditor", dict(norm=False), torch.float64).state_tensors()
    assert any(not torch.equal(t, initial[key]) for key, t in want.items())  # it did train
    assert not torch.equal(want["editors.37x24.alpha"], initial["editors.37x24.alpha"])  # α too
    for key, t in want.items():
        assert t.dtype == torch.float64 and torch.equal(states[0][key], states[1][key]), key
        assert torch.allclose(states[0][key], t, rtol=1e-10, atol=1e-13), (key, float((states[0][key] - t).abs().max()))
    assert len(results[0]["history"]) == len(single.history) == 2
    for got, expected in zip(results[0]["history"], single.history):
        for k in ("loss", "edit", "kl"):
            assert got[k] == pytest.approx(expected[k], rel=1e-10, abs=1e-15)


def test_a_resume_with_another_number_of_processes_is_refused_everywhere(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    config = dict(steps=1, batch_size=2, progress=False, checkpoint_dir=str(ckpt))
    _train(_editor("mend", {}), TrainConfig(**config))  # one process
    _, errors = _run(tmp_path / "run", "mend", {}, [dict(config, steps=2)])
    assert all(e is not None and "processes 1 -> 2" in e for e in errors)


@pytest.mark.parametrize("field", ["bad_validations", "best_nll"])
def test_processes_resuming_from_different_checkpoints_of_one_step_are_refused_everywhere(field, tmp_path, one_thread):
    """A stale copy of checkpoint_dir on one process's node, at the same step but with other validation
    counters: one process would stop early (patience) while the other waits in its next step's
    all-reduce; both refuse before the first step.  The best validation's NLL in val_history (which
    an equal ES is compared with, `train._better_at_no_gain`) too: the processes kept different
    best states."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file

    from dcedit_kernels.safetensors_file import save_safetensors

    config = dict(steps=2, batch_size=2, progress=False, val_every=1, checkpoint_dir=str(tmp_path / "a"))
    states, _ = _run(tmp_path / "first", "mend", {}, [config], with_val=True)
    assert states is not None
    stale = tmp_path / "b"
    shutil.copytree(tmp_path / "a", stale)
    path = stale / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    counters = json.loads(meta["counters"])
    if field == "bad_validations":
        counters["bad_validations"] += 1
    else:
        for v in counters["val_history"]:
            v["nll"] += float(v["step"] == counters["best_step"])
    save_safetensors(load_file(str(path)), path, dict(meta, counters=json.dumps(counters)))
    _, errors = _run(tmp_path / "resumed", "mend", {}, [dict(config, steps=4, patience=2)], with_val=True,
                     rank_kwargs={1: dict(checkpoint_dir=str(stale))}, deadline_s=120)
    assert all(e is not None and e.startswith("ValueError: the processes resumed from different checkpoints "
                                              f"(resumed.{field}) at step 2") for e in errors), errors


@pytest.mark.parametrize("fail, where", [
    (("batch_loss", 0, 2), "another process failed in the same training step (rank 0: OSError"),
    (("_optimizer_step", 1, 2), "another process failed in the optimiser step (rank 1: OSError"),
    (("_batch_scores", 1, 2), "another process failed validating (rank 1: OSError"),
    (("_save_editor", 0, 1), "rank 0 failed saving the best editor (OSError"),
    (("_checkpoint", 0, 2), "rank 0 failed writing a checkpoint (OSError"),
    (("validate_requests", 1, 1), "another process failed to start training (rank 1: OSError"),
    # fit's checks of the process's own ModelEditor (its editors' dtypes here; their requires_grad, an
    # inference_mode, ...): a real fp16 editor on rank 1 left rank 0 waiting in agree_on_start until
    # rank 1's process ended, then raising gloo's "Connection closed by peer".
    (("check_trainable_dtypes", 1, 1), "another process failed to start training (rank 1: OSError"),
], ids=["batch", "optimiser", "validation", "best", "checkpoint", "requests", "editor-checks"])
def test_a_failure_on_one_process_raises_on_every_process(tmp_path, one_thread, fail, where):
    """Without the failure counted in the step's all-reduce (or rank 0's outcome broadcast), the
    other process waits in its next collective: this test then hits `_run`'s deadline."""
    config = dict(steps=3, batch_size=2, progress=False, val_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    _, errors = _run(tmp_path / "run", "mend", {}, [config], with_val=True, fail=fail, deadline_s=120)
    failed = fail[1]
    assert errors[failed] == f"OSError: injected failure in {fail[0]}"
    assert errors[1 - failed].startswith("PeerFailure: ") and where in errors[1 - failed], errors


def _unsendable_worker(rank, store, out, collective):
    """`collective` ("on_rank0" or "gather_outcomes") of a `fn` whose result cannot be pickled (a
    lambda) on rank 0 (on_rank0's only runner) or rank 1; the outcome ("returned" or the error) to
    `out`/outcome{rank}.txt.  Each process then stays for the other's outcome (at most 30 s): one that
    ended at once would end the other's wait in the collective with gloo's "Connection closed by
    peer", where a caller that catches its error (a notebook) keeps it waiting."""
    from pathlib import Path

    from dcedit_kernels import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        try:
            if collective == "on_rank0":
                distributed.on_rank0(lambda: (lambda: 0), "sending a lambda")
            else:
                distributed.gather_outcomes(lambda: (lambda: 0) if rank == 1 else 0, "sending a lambda")
            outcome = "returned"
        except Exception as exc:  # noqa: BLE001 -- the test reads it
            outcome = f"{type(exc).__name__}: {exc}"
        (Path(out) / f"outcome{rank}.txt").write_text(outcome)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all((Path(out) / f"outcome{r}.txt").is_file() for r in range(WORLD)):
            time.sleep(0.1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("collective, failed", [("on_rank0", 0), ("gather_outcomes", 1)])
def test_a_result_that_cannot_be_pickled_raises_on_every_process(tmp_path, collective, failed):
    """A result that the collective cannot pickle is the failure of the process that made it: it
    raises the pickling error, the other a PeerFailure with it.  Pickled by the collective itself, it
    raised on that process alone before anything was sent, and the other waited in the collective
    until that process ended (30 s here), then raised gloo's "Connection closed by peer"."""
    context = _start_workers((str(tmp_path / "store"), str(tmp_path), collective), _unsendable_worker)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail("the processes were still running after 120 s")
    outcomes = [(tmp_path / f"outcome{r}.txt").read_text() for r in range(WORLD)]
    assert outcomes[failed].startswith("AttributeError: Can't pickle local object"), outcomes
    who = "rank 0 failed sending a lambda (" if failed == 0 else "another process failed sending a lambda (rank 1: "
    assert outcomes[1 - failed] == f"PeerFailure: {who}{outcomes[failed]})", outcomes


def test_a_resume_failing_to_restore_rng_states_on_one_process_raises_on_every_process(tmp_path, one_thread):
    """The RNG states are set inside the training loop's setup, after agree_on_start: without the
    failure shared there, the other process waited for the failed one in broadcast_state."""
    config = dict(steps=2, batch_size=2, progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    _, errors = _run(tmp_path / "run", "mend", {}, [config, dict(config, steps=3)],
                     fail=("_set_rng_states", 1, 1), deadline_s=120)
    assert errors[1] == "OSError: injected failure in _set_rng_states"
    assert errors[0].startswith("PeerFailure: another process failed restoring the checkpoint's RNG states "
                                "(rank 1: OSError"), errors


def test_processes_given_different_settings_are_refused_everywhere(tmp_path, one_thread):
    """Processes with different validation schedules would call different collectives (one waits
    forever): both refuse before the first step."""
    config = dict(steps=2, batch_size=2, progress=False, val_every=1)
    _, errors = _run(tmp_path, "mend", {}, [config], with_val=True, rank_kwargs={1: dict(val_every=2, lr=1e-3)},
                     deadline_s=120)
    assert all(e is not None and e.startswith("ValueError: the processes were given different training "
                                              "settings (config.lr, val_every)") for e in errors), errors


def test_processes_given_different_restore_best_are_refused_everywhere(tmp_path, one_thread):
    """restore_best on one process only (a field a resume may change, so not among the run's settings):
    the processes ran the same collectives and then ended with different editors, one at its best
    validation's state (step 1: the tiny model's ES stays 0), the other at its last step's."""
    config = dict(steps=2, batch_size=2, progress=False, val_every=1)
    _, errors = _run(tmp_path, "mend", {}, [config], with_val=True, rank_kwargs={1: dict(restore_best=False)},
                     deadline_s=120)
    assert all(e is not None and e.startswith("ValueError: the processes were given different training "
                                              "settings (restore_best)") for e in errors), errors


def test_processes_given_different_editors_are_refused_everywhere(tmp_path, one_thread):
    """Editors without running norms on one process: the broadcast of the editors' start would run over
    tensors of other sizes (gloo aborts that process); both refuse before the first step."""
    config = dict(steps=1, batch_size=2, progress=False)
    _, errors = _run(tmp_path, "mend", {}, [config], rank_editor_kwargs={1: dict(norm=False)}, deadline_s=120)
    assert all(e is not None and e.startswith("ValueError: the processes were given different training "
                                              "settings (editor.editors.37x24.norm, editor.tensors)")
               for e in errors), errors


def test_processes_given_editors_of_other_settings_but_equal_tensors_are_refused_everywhere(tmp_path, one_thread):
    """A fusion of its own on one process: the editors' tensors have the same shapes, so nothing would
    hang, but that process would validate (and ProEditor's fisher_keep: train) another editor than the
    others while the gradients are averaged; both refuse before the first step, as a resume does."""
    config = dict(steps=1, batch_size=2, progress=False)
    _, errors = _run(tmp_path, "moeditor", dict(n_editors=2), [config], rank_editor_kwargs={1: dict(fusion="max")},
                     deadline_s=120)
    assert all(e is not None and e.startswith("ValueError: the processes were given different training "
                                              "settings (editor.editors.37x24.fusion)") for e in errors), errors


@pytest.mark.parametrize("also", [{}, dict(lr=1e-3)], ids=["model", "model_and_settings"])
def test_processes_given_different_models_are_refused_everywhere(tmp_path, also, one_thread):
    """A replica of another model on one process (another checkpoint: here the tiny model of another
    seed) with the same settings, requests and editors: it trained the shared editors on its own
    gradients without a word.  Both refuse before the first step, naming the weights (and any
    setting that differs as well)."""
    config = dict(steps=1, batch_size=2, progress=False)
    _, errors = _run(tmp_path, "mend", {}, [config], rank_editor_kwargs={1: dict(model_seed=1)},
                     rank_kwargs={1: also}, deadline_s=120)
    tail = "; their training settings differ too (config.lr)" if also else ""
    assert all(e is not None and e.startswith("ValueError: the processes' models differ: the edited layers' weights")
               and e.endswith(tail) for e in errors), errors


def test_dcedit_train_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m dcedit_kernels.cli train ...`: two processes over gloo train
    data-parallel, rank 0 alone saves the editor and prints (the saved line, the --batch-size note),
    and the editor loads.  One run for all of it: each torchrun start costs seconds.

    With data_parallel=False (mutation testing) each process trained alone on the same batches and
    the run still ended in one saved line naming "2 processes": only fit's UserWarning
    ("data_parallel=False: this process trains its editors on its own") on stderr told.  The note
    printed on every rank said the same thing twice."""
    import subprocess
    import sys

    from test_demo import _counterfact_file

    model_dir = tmp_path / "tiny"
    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = _counterfact_file(tmp_path / "cf.json", n=8)
    out = tmp_path / "mend.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dcedit_kernels.cli", "train", "--model", str(model_dir), "--method", "mend",
               "--rank", "3", "--data", str(data), "--steps", "2", "--batch-size", "9", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout and run.stdout.count("saved the trained") == 1
    assert run.stderr.count("dcedit: note: --batch-size 9 is more than the 8 training edits") == 1, run.stderr[-3000:]
    assert "data_parallel=False" not in run.stderr, run.stderr[-3000:]
    assert ModelEditor.load(out, model, tok).method == "mend"


_GROUP_OUTLIVES_DESTROY = """
import os
import torch.distributed as dist
from dcedit_kernels import distributed

def threads():
    return set(os.listdir("/proc/self/task"))


os.environ.update(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
join = dist.distributed_c10d.init_process_group
# torchrun's group of 2, as a group of 1 in this process (the leak does not depend on its size)
dist.init_process_group = lambda backend: join(backend, store=dist.HashStore(), rank=0, world_size=1)
before = threads()
device, joined = distributed.init_from_env("cpu")
# gloo's worker and transport threads: those the join started.  By id, not by name: torch 2.11 names
# two 'pt_gloo_runloop' (2.13 also 'gloo_tcp_loop'), 2.5.1 to 2.10 leave all three 'python'.
gloo = threads() - before
assert joined and gloo, gloo
import transformers.modeling_utils  # what loading the model imports, inside the group
dist.destroy_process_group()
print("gloo threads after destroy:", len(gloo & threads()))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_the_group_init_from_env_joins_ends_at_destroy(tmp_path):
    """The group `dcedit train` joins under torchrun is gone, with gloo's threads, once it destroys
    it: transformers imports torch.distributed.nn.functional when the model loads, whose functions
    take group=group.WORLD as a default argument, so imported inside the group it kept the group
    alive after destroy_process_group().  A gloo worker thread that freed a finished all-reduce
    while the interpreter exited then aborted the process ("terminate called without an active
    exception", SIGABRT), in about 1 of 250 two-process runs (a core dump showed the thread waiting
    for the finalizing interpreter's GIL).  init_from_env imports it before joining.  In a fresh
    process: in this one, an earlier test imported the module already."""
    import subprocess
    import sys

    import dcedit_kernels

    script = tmp_path / "group.py"
    script.write_text(_GROUP_OUTLIVES_DESTROY)
    # The package this test imports, also where it is built in place and not installed (run_gpu.sh and
    # check_gpu_stack_on_cpu.sh): a script's own folder, not the working one, starts its sys.path.
    package_root = os.path.dirname(os.path.dirname(dcedit_kernels.__file__))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gloo threads after destroy: 0" in run.stdout, run.stdout


def test_dcedit_train_leaves_the_process_group_it_joined(monkeypatch, tmp_path, tiny_model_dir):
    """`dcedit train` joins torchrun's process group (distributed.init_from_env) and destroys it when
    it ends: main() called from Python under a launcher (a script, a notebook) otherwise returned
    with the process still in the group, which the next main() took for one already up and did not
    join again.  A one-process gloo group stands in for torchrun's (a real one needs two processes)."""
    from dcedit_kernels import cli, distributed
    from test_demo import _counterfact_file

    def join(device):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return device, True
    monkeypatch.setattr(distributed, "init_from_env", join)
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    try:
        assert cli.main(["train", "--model", str(tiny_model_dir), "--rank", "3", "--data", str(data), "--steps", "1",
                         "--batch-size", "2", "--out", str(tmp_path / "mend.safetensors")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():  # the other tests start without a group
            dist.destroy_process_group()


def test_dcedit_train_gives_the_excepthook_back_when_it_leaves_the_group(monkeypatch, tmp_path, tiny_model_dir):
    """init_process_group wraps sys.excepthook to put "[rank0]: " before every line of a traceback, and
    destroy_process_group leaves the wrapper: after two `dcedit train` runs from Python the group was
    gone, yet every line of any later traceback of the process read "[rank0]: [rank0]: ".  main() puts
    the caller's hook back as it leaves the group; a traceback on its way out of main() keeps the
    wrapper, which says which process it came from.  (Found by a scratch fixture that compared the
    process's global state before and after each test: this file's stand-in group left the wrapper.)"""
    from dcedit_kernels import cli, distributed
    from dcedit_kernels.cli import commands
    from test_demo import _counterfact_file

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # put back after the test, whatever it leaves
    caller_s = sys.excepthook

    def join(device):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return device, True
    monkeypatch.setattr(distributed, "init_from_env", join)
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    args = ["train", "--model", str(tiny_model_dir), "--rank", "3", "--data", str(data), "--steps", "1",
            "--batch-size", "2"]
    try:
        for run in range(2):
            assert cli.main(args + ["--out", str(tmp_path / f"mend{run}.safetensors")]) == 0
            assert sys.excepthook is caller_s, run
        def crashing(*args):
            raise RuntimeError("a bug")
        monkeypatch.setattr(commands, "_train", crashing)
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main(args + ["--out", str(tmp_path / "mend2.safetensors")])
        assert sys.excepthook is not caller_s and sys.excepthook.__name__ == "_distributed_excepthook"
    finally:
        if dist.is_initialized():  # the other tests start without a group
            dist.destroy_process_group()


def test_under_torchrun_rank_0_alone_checks_and_writes_out(monkeypatch, tmp_path, capsys):
    """Under torchrun rank 0 alone saves train's editor and writes edit's and evaluate's --out, so
    main() checks --out (and --out against the input files) on RANK 0 only: check_out creates the
    file to see that it can be written and removes it again, and N processes doing so at once
    removed one another's file ("cannot be written (No such file or directory)").  edit and evaluate
    checked and wrote --out on every rank, and printed "wrote" once per process (their processes
    join no group: each runs the whole command).  Every rank still checks the --editor it reads."""
    from dcedit_kernels import cli

    checked, written = [], []
    monkeypatch.setattr(cli, "check_out", lambda out: checked.append("out"))
    monkeypatch.setattr(cli, "check_inputs", lambda args, out: checked.append(("inputs", out)))
    monkeypatch.setattr(cli, "write_json", lambda path, data: written.append(path))
    for command in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, command, lambda args: {})
    out = str(tmp_path / "e.out")
    for command in ("train", "edit", "evaluate"):
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            checked.clear()
            written.clear()
            assert cli.main([command, "--out", out]) == 0
            expected = ["out", ("inputs", out)] if rank == "0" else [("inputs", None)]
            assert checked == expected, (command, rank, checked)
            assert written == ([out] if rank == "0" and command != "train" else []), (command, rank, written)
            assert capsys.readouterr().out == (f"wrote {out}\n" if written else ""), (command, rank)


def test_dcedit_edit_under_torchrun_writes_out_once(tmp_path):
    """`torchrun --nproc_per_node 2 -m dcedit_kernels.cli edit ... --out R.json`: each process runs the
    edit (they share no work), rank 0 alone writes the record and says so."""
    import subprocess

    model_dir = tmp_path / "tiny"
    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "edit.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dcedit_kernels.cli", "edit", "--model", str(model_dir), "--prompt", "The river flows into",
               "--target", " the sea", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and run.stdout.count(f"wrote {out}\n") == 1, run.stdout
    assert json.loads(out.read_text())["edits"][0]["target"] == " the sea"
    assert [p.name for p in tmp_path.iterdir() if p.name != "tiny"] == ["edit.json"]  # no temporary file left


def test_training_in_a_process_group_without_data_parallel_warns(monkeypatch):
    """A torchrun script that forgets TrainConfig(data_parallel=True) trains alone per process:
    fit says so (every process would repeat the work and write checkpoint_dir)."""
    import dcedit_kernels.distributed as distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    with pytest.warns(UserWarning, match="data_parallel=False"):
        result = train_editor(_editor("mend", {}), _requests(1, 4), None,
                              TrainConfig(steps=1, batch_size=2, progress=False))
    assert result.steps == 1


def test_data_parallel_under_torchrun_without_a_process_group_is_refused(monkeypatch, tmp_path):
    """A torchrun script that sets TrainConfig(data_parallel=True) but never calls
    init_process_group: each of the W processes trained on its own, on the same batches, and all
    of them wrote checkpoint_dir, without a word (a user trial); the mirror case, a group without
    data_parallel, warns.  Now refused before any work, naming what to call."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not (dist.is_available() and dist.is_initialized())
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="data_parallel=True.*WORLD_SIZE=2.*init_process_group"):
        train_editor(_editor("mend", {}), _requests(1, 4), None,
                     TrainConfig(steps=1, batch_size=2, progress=False, data_parallel=True, checkpoint_dir=str(ckpt)))
    assert not ckpt.exists()
    # One process (no launcher, or torchrun --nproc_per_node 1): data_parallel=True trains as before.
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = train_editor(_editor("mend", {}), _requests(1, 4), None,
                          TrainConfig(steps=1, batch_size=2, progress=False, data_parallel=True))
    assert result.steps == 1


def test_data_parallel_in_a_plain_process_warns_that_it_trains_alone(monkeypatch):
    """A script that sets TrainConfig(data_parallel=True) run with `python` instead of torchrun (no
    process group, WORLD_SIZE unset) trained in its one process without a word, and its user took
    the run for one over several GPUs (a new-user audit).  Now it trains as before and warns, naming
    torchrun; under torchrun with one process (WORLD_SIZE=1) it says nothing."""
    import warnings

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not (dist.is_available() and dist.is_initialized())
    config = TrainConfig(steps=1, batch_size=2, progress=False, data_parallel=True)
    with pytest.warns(UserWarning, match=r"data_parallel=True.*no launcher.*trains alone, in one process.*torchrun"):
        result = train_editor(_editor("mend", {}), _requests(1, 4), None, config)
    assert result.steps == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_editor(_editor("mend", {}), _requests(1, 4), None, config)
    assert not [w for w in caught if "data_parallel" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("gpus", [0, 1])
def test_dcedit_train_under_torchrun_without_a_gpu_for_each_process_says_so(monkeypatch, capsys, tmp_path, gpus):
    """`torchrun --nproc_per_node 2 -m dcedit_kernels.cli train --device cuda` on a machine without
    CUDA (or with fewer GPUs than processes): every process printed a traceback from
    torch.cuda.set_device (CPU torch: "AttributeError: module 'torch._C' has no attribute
    '_cuda_setDevice'"; too few GPUs: "invalid device ordinal") where one process says "--device
    'cuda' is not usable here" in one line (a user trial).  Now one line naming LOCAL_RANK and the
    GPUs visible, before the process group is joined."""
    from dcedit_kernels import cli, distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("set_device called"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("init_process_group called"))
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29555").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"LOCAL_RANK=1 .*{gpus} visible"):
        distributed.init_from_env("cuda")
    code = cli.main(["train", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "e.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("dcedit: error: ") and "LOCAL_RANK=1" in err and err.count("\n") == 1, err


def test_init_from_env_refuses_a_cuda_index_other_than_the_processs_local_rank(monkeypatch):
    """Under torchrun, device "cuda:1" in the process of LOCAL_RANK=0 was replaced by cuda:0 without a
    word; it is refused before the group is joined ("cuda" and the process's own index are taken)."""
    from dcedit_kernels import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append(a))
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29555").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"^device 'cuda:1': under torchrun each process takes the GPU of its "
                                         r"LOCAL_RANK \(this one, LOCAL_RANK=0, cuda:0\)"):
        distributed.init_from_env("cuda:1")
    assert not joined
    assert distributed.init_from_env("cuda:0") == ("cuda:0", True)
    assert distributed.init_from_env("cuda") == ("cuda:0", True)
    assert joined == [("nccl",), ("nccl",)]


def test_without_data_parallel_each_process_validates_on_its_own(monkeypatch):
    """Outside data-parallel mode a process of a group (here rank 1 of 2) validates its own
    editors: it neither waits for rank 0's scores nor skips its validation."""
    import dcedit_kernels.distributed as distributed

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    with pytest.warns(UserWarning, match="data_parallel=False"):
        result = train_editor(_editor("mend", {}), _requests(1, 4), _requests(2, 2),
                              TrainConfig(steps=1, batch_size=2, progress=False, val_every=1))
    assert len(result.val_history) == 1 and result.best_step == 1


def _with_a_peer(monkeypatch, rank, peer):
    """This process as `rank` of 2 without a process group: the other process's side of each
    collective is the next item of `peer` (its tensor for an all_reduce, rank 0's tensor or object
    for a broadcast, its object for an all_gather_object)."""
    import dcedit_kernels.distributed as distributed

    sent = iter(peer)

    def broadcast(t, src):
        assert src == 0 != rank
        t.copy_(next(sent))

    def broadcast_object_list(box, src):
        assert src == 0 != rank
        box[0] = next(sent)

    def all_gather_object(out, obj):
        out[rank], out[1 - rank] = obj, next(sent)

    monkeypatch.setattr(distributed, "world", lambda: (rank, 2))
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(next(sent)))
    monkeypatch.setattr(dist, "broadcast", broadcast)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    return distributed


def test_a_config_invalid_on_one_process_is_shared_before_it_raises(monkeypatch):
    """A TrainConfig field set invalid after the config was built, on one process only: fit's
    validate() raised there alone, before agree_on_start, and the others waited in agree_on_start
    until that process ended (2 gloo processes: then gloo's "Connection closed by peer").  This
    process plays rank 1, its peer's side of agree_on_start given: it sends its error there, then
    raises it."""
    distributed = _with_a_peer(monkeypatch, 1, [(None, 0, {})])
    sent, gather = [], dist.all_gather_object
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: sent.append(obj) or gather(out, obj))
    config = TrainConfig(steps=1, batch_size=2, progress=False, data_parallel=True)
    config.lr = -1.0
    with pytest.raises(ValueError, match="lr must be a non-negative finite number, got -1.0"):
        train_editor(_editor("mend", {}), _requests(1, 4), None, config)
    assert distributed.world() == (1, 2)
    assert len(sent) == 1 and sent[0][0] == "ValueError: lr must be a non-negative finite number, got -1.0", sent


@pytest.mark.parametrize("rank", [0, 1])
def test_warnings_about_the_runs_requests_come_from_rank_0_alone(monkeypatch, rank):
    """train_editor's warnings about its requests and settings (a batch_size larger than the training
    requests, a val_size larger than val_requests) say the same on every process of a data-parallel
    run, whose requests and settings agree_on_start holds equal: torchrun's W processes printed each
    W times; rank 0 alone says them now, as it says the skipped batches.  This process plays `rank`;
    its peer fails to start, so the run ends in agree_on_start, after the warnings."""
    import warnings

    distributed = _with_a_peer(monkeypatch, rank, [("OSError: the peer's", 0, {})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(distributed.PeerFailure, match=f"rank {1 - rank}: OSError: the peer's"):
            train_editor(_editor("mend", {}), _requests(1, 4), _requests(2, 2),
                         TrainConfig(steps=1, batch_size=8, val_size=5, progress=False, data_parallel=True))
    said = sorted(str(w.message) for w in caught if str(w.message).startswith("train_editor: "))
    if rank == 0:
        assert len(said) == 2, said
        assert said[0].startswith("train_editor: batch_size 8 is larger than the 4 training requests"), said
        assert said[1].startswith("train_editor: val_size 5 is larger than the 2 val_requests"), said
    else:
        assert said == [], said


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_cli_notes_about_its_inputs_come_from_rank_0_alone(monkeypatch, capsys, tmp_path, tiny_model_dir, rank):
    """Under torchrun every process reads the same --data and builds the same editor: the notes about
    them (a data file's blank records, an untrained editor of `edit --method mend`) were printed once
    per process; rank 0 alone prints them now.  The library's UserWarning that the note replaces
    stays silenced on every rank, and an error is still every rank's own."""
    import warnings

    from dcedit_kernels import cli
    from test_demo import _counterfact_file

    monkeypatch.setenv("RANK", rank)
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps([dict(src=f"Question {i}?", alt="" if i == 1 else f"answer {i}", rephrase=f"Q {i}?",
                                     loc=f"nq question: q{i}", loc_ans=f"a{i}", subject=f"s{i}") for i in range(3)]))
    assert len(cli.load_requests(str(zsre), None)) == 2
    note = "1 record(s) with a blank prompt or target left out (record 1)"
    assert (note in capsys.readouterr().err) == (rank == "0")
    data = _counterfact_file(tmp_path / "cf.json", n=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["edit", "--model", str(tiny_model_dir), "--method", "mend", "--data", str(data),
                         "--n-edits", "1"]) == 0
    err = capsys.readouterr().err
    assert ("dcedit: note: --method mend without --editor edits with an untrained editor" in err) == (rank == "0")
    assert not [w for w in caught if "at their initialisation" in str(w.message)]
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--prompt", "a", "--target", "b", "--n-edits", "1"]) == 2
    assert "dcedit: error: --n-edits goes with --data" in capsys.readouterr().err


def test_average_gradients_averages_over_the_processes_and_leaves_a_grad_nobody_has_none(monkeypatch, gen):
    """A param with a grad on the other process only gets half of it; one without a grad on any keeps
    None (the optimisers skip it, as in one process: a zero grad would still move Adam's moments)."""
    mine, theirs, theirs_only = (torch.randn(3, generator=gen) for _ in range(3))
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    params[0].grad = mine.clone()
    # The peer's head (no failure, its numbers, which params it has a grad for), then its grads.
    distributed = _with_a_peer(monkeypatch, 0, [torch.tensor([0, 3.0, 0.5, 1, 1, 0], dtype=torch.float64),
                                                theirs, theirs_only])
    assert distributed.average_gradients(params, [1.0, 2.5]) == [4.0, 3.0]
    assert torch.allclose(params[0].grad, (mine + theirs) / 2)
    assert torch.allclose(params[1].grad, theirs_only / 2)
    assert params[2].grad is None


def test_agree_on_start_refuses_processes_that_would_start_from_different_steps(monkeypatch):
    distributed = _with_a_peer(monkeypatch, 0, [(None, 3, dict(config=dict(lr=0.1)))])
    with pytest.raises(ValueError, match=r"different steps \[0, 3\]: a resume needs the same checkpoint_dir"):
        distributed.agree_on_start(None, 0, dict(config=dict(lr=0.1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weights_digest_tells_one_changed_entry_dtype_or_module_name(dtype, gen):
    """Equal for a copy; another for one entry changed by one ulp, another dtype or another name; a
    weight on "meta" (offloaded) by its name, shape and dtype."""
    from dcedit_kernels.distributed import weights_digest

    layer = torch.nn.Linear(int(torch.randint(1, 9, (1,), generator=gen)), 5).to(dtype)
    digest = weights_digest({"a": layer})
    twin = copy.deepcopy(layer)
    assert weights_digest({"a": twin}) == digest
    assert weights_digest({"b": twin}) != digest
    with torch.no_grad():
        flat = twin.weight.view(-1)
        i = int(torch.randint(0, flat.numel(), (1,), generator=gen))
        flat[i] = torch.nextafter(flat[i], flat[i] + 1)
    assert weights_digest({"a": twin}) != digest
    assert weights_digest({"a": copy.deepcopy(layer).to(torch.float16)}) != digest
    on_meta = copy.deepcopy(layer).to("meta")
    assert weights_digest({"a": on_meta}) == weights_digest({"a": copy.deepcopy(layer).to("meta")}) != digest


def test_broadcast_state_sets_every_parameter_and_buffer_to_rank_0s(monkeypatch, gen):
    """Running norms included: a process whose editors saw other tokens before starts from rank 0's."""
    from dcedit_kernels.editors.running_norm import RunningNorm

    rank0, mine = (torch.nn.Sequential(torch.nn.Linear(3, 2), RunningNorm(3, 2)) for _ in range(2))
    rank0[1].update(torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen))
    distributed = _with_a_peer(monkeypatch, 1, [t.detach().clone() for t in [*rank0.parameters(), *rank0.buffers()]])
    distributed.broadcast_state(mine)
    for (key, want), got in zip(rank0.state_dict().items(), mine.state_dict().values()):
        assert torch.equal(got, want), key


def test_a_rank_resuming_a_checkpoint_without_its_rng_states_is_seeded_for_its_rank_and_step(monkeypatch, tmp_path):
    """A multi-process checkpoint written before each rank's RNG states were stored under "rank{r}."
    holds rank 0's only: rank 1 resuming it draws from _rank_seed(seed, step, 1) (its routing
    generators from _rank_seed of their own seed), not from rank 0's or a fresh run's states.  One
    process plays each rank in turn, the collectives replaced by what a 2-process run returns."""
    from dcedit_kernels import distributed, train

    config = dict(batch_size=2, progress=False, data_parallel=True, checkpoint_dir=str(tmp_path), seed=7)
    for name in ("agree_on_start", "settle", "broadcast_state", "merge_running_norms"):
        monkeypatch.setattr(distributed, name, lambda *a: None)
    monkeypatch.setattr(distributed, "average_gradients", lambda params, numbers, error: numbers)
    monkeypatch.setattr(distributed, "gather_outcomes", lambda fn, what: [fn()])  # rank 0's states only
    monkeypatch.setattr(distributed, "on_rank0", lambda fn, what: fn())
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    _train(_editor("mend", {}), TrainConfig(steps=1, **config))
    monkeypatch.setattr(distributed, "on_rank0", lambda fn, what: None)
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    me, drawn = _editor("mend", {}), []
    seeds = {key: gen.initial_seed() for key, gen in me.route_generators().items()}
    accumulate = train._accumulate

    def first_draws(*args):  # the RNG states the resumed step starts drawing from
        drawn.append((torch.get_rng_state(), {key: gen.get_state() for key, gen in me.route_generators().items()}))
        return accumulate(*args)

    monkeypatch.setattr(train, "_accumulate", first_draws)
    result, _ = _train(me, TrainConfig(steps=2, **config))
    assert result.resumed_from == 1 and len(drawn) == 1
    state, routes = drawn[0]
    assert seeds and routes.keys() == seeds.keys()
    assert torch.equal(state, torch.Generator().manual_seed(train.torch_seed(train._rank_seed(7, 1, 1))).get_state())
    for key, seed in seeds.items():
        assert torch.equal(routes[key], torch.Generator().manual_seed(
            train.torch_seed(train._rank_seed(seed, 1, 1))).get_state()), key


def test_on_rank0_runs_only_on_rank_0_and_gives_the_others_its_result(monkeypatch):
    """Rank 0 alone writes the checkpoints: another rank running `fn` too would write the same files
    at once on a shared checkpoint_dir."""
    distributed = _with_a_peer(monkeypatch, 1, [(None, "rank 0's")])
    calls = []
    assert distributed.on_rank0(lambda: calls.append(1) or "rank 1's", "writing a checkpoint") == "rank 0's"
    assert calls == []


def test_a_collective_failing_after_this_processs_own_failure_raises_from_it(monkeypatch):
    """A third process died too: the collective's error is raised from this process's own, so that
    the first failure is still in the traceback."""
    import dcedit_kernels.distributed as distributed

    def gone(t):
        raise RuntimeError("connection closed by peer")

    monkeypatch.setattr(dist, "all_reduce", gone)
    own = OSError("disk full")
    with pytest.raises(RuntimeError, match="connection closed by peer") as raised:
        distributed.settle(own, "in the optimiser step", torch.device("cpu"))
    assert raised.value.__cause__ is own


@pytest.mark.parametrize("rows", [(5, 3, 4), (0, 1, 0)], ids=["rows", "one_row_in_all"])
def test_merge_running_norms_gives_the_statistics_of_every_processs_rows(monkeypatch, gen, rows):
    """`rows`: the norm's rows before the step, this process's in it, the other's.  Each process ends
    the step with what one norm that saw all of them holds, also after a first step of one row."""
    from dcedit_kernels.distributed import norm_sums
    from dcedit_kernels.editors.running_norm import RunningNorm

    start, mine, theirs = [(torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)) for n in rows]

    def seen(*batches):
        norm = RunningNorm(3, 2)
        for u, v in batches:
            norm.update(u, v)
        return norm

    norm, every = seen(start, mine), seen(start, mine, theirs)
    distributed = _with_a_peer(monkeypatch, 0, [torch.cat(norm_sums(seen(start, theirs)))])
    distributed.merge_running_norms([norm], [norm_sums(seen(start))])
    for key, want in every.state_dict().items():
        assert torch.allclose(norm.state_dict()[key], want, rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_norms_hold_the_statistics_of_every_row_as_a_step_merges_them(monkeypatch, gen, dtype):
    """As train_editor runs a step: `before` = norm_sums at its start, then this process's batches
    update its norms (a RunningNorm and MoEditor's FeatureNorm), then the merge, the other process
    adding its norms' sums after its own batches.  The merged count, means, sums of squared
    deviations and (k − 1) stds are those of every row, computed here from the rows in float64.
    A `before` that follows the norms' later updates (float64 buffers: `.double()` is the buffer
    itself) gave each process the other one's count."""
    from dcedit_kernels.distributed import norm_sums
    from dcedit_kernels.editors.running_norm import FeatureNorm, RunningNorm

    widths = (4, 3, 5)  # μ, η, the gate's features

    def batches(n):
        return [tuple(torch.randn(rows, d, generator=gen, dtype=torch.float64) * 3 + torch.randn(d, generator=gen,
                                                                                                 dtype=torch.float64)
                      for d in widths) for rows in torch.randint(1, 6, (n,), generator=gen).tolist()]

    def replica(*seen):
        norm, feat = RunningNorm(*widths[:2]).to(dtype), FeatureNorm(widths[2]).to(dtype)
        for mu, eta, x in seen:
            norm.update(mu, eta)
            feat.update(x)
        return norm, feat

    start = batches(int(torch.randint(1, 3, (1,), generator=gen)))  # the steps before (a first step: the test above)
    mine, theirs = batches(2), batches(int(torch.randint(1, 3, (1,), generator=gen)))
    norm, feat = replica(*start)
    before = [norm_sums(norm), norm_sums(feat)]
    for mu, eta, x in mine:
        norm.update(mu, eta)
        feat.update(x)
    distributed = _with_a_peer(monkeypatch, 0, [torch.cat(norm_sums(n)) for n in replica(*start, *theirs)])
    distributed.merge_running_norms([norm, feat], before)
    every = start + mine + theirs
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    _assert_norm_holds(norm.state_dict(), {"u_": [b[0] for b in every], "v_": [b[1] for b in every]}, **tol)
    _assert_norm_holds(feat.state_dict(), {"": [b[2] for b in every]}, **tol)
