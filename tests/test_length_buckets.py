"""Passes of rows of similar length (length_buckets): the plan and the reordering of its picks."""

import itertools

import pytest
import torch

from dcedit_kernels import length_buckets
from dcedit_kernels.length_buckets import plan_passes, run_in_passes
from helpers import default_device


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def plan_cost(lengths, passes, pass_cost):
    return sum(len(p) * max(lengths[r] for r in p) + pass_cost for p in passes)


@pytest.mark.parametrize("trial", range(6))
def test_plan_is_the_cheapest_partition(trial, gen):
    """Every row in exactly one pass, rows ascending in each pass, and no partition of the rows
    (checked against all of them, up to 7 rows) costs less."""
    n = int(torch.randint(1, 8, (1,), generator=gen))
    lengths = torch.randint(1, 30, (n,), generator=gen).tolist()
    pass_cost = int(torch.randint(0, 40, (1,), generator=gen))
    passes = plan_passes(lengths, pass_cost)
    assert sorted(r for p in passes for r in p) == list(range(n))
    assert all(p == sorted(p) and p for p in passes)
    best = min(plan_cost(lengths, q, pass_cost) for q in set_partitions(list(range(n))))
    assert plan_cost(lengths, passes, pass_cost) == best


def test_plan_edge_cases(monkeypatch):
    assert plan_passes([]) == []
    assert plan_passes([5]) == [[0]]
    assert plan_passes([4, 4, 4], 0) in ([[0, 1, 2]], [[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]])
    assert plan_passes([3, 3, 3, 30], 10**6) == [[0, 1, 2, 3]]  # a pass costs more than any padding
    assert plan_passes([30, 2, 2, 2, 2], 1) == [[1, 2, 3, 4], [0]]
    # The default pass cost is read at the call, so a test (or a user) can change it.
    assert plan_passes([30, 20, 20, 20, 20]) == [[0, 1, 2, 3, 4]]  # padding 4 × 10 slots < PASS_COST = 64
    monkeypatch.setattr(length_buckets, "PASS_COST", 1)
    assert plan_passes([30, 20, 20, 20, 20]) == [[1, 2, 3, 4], [0]]


@pytest.mark.parametrize("lengths,pass_cost,word", [([3, 0], 1, "lengths"), ([3, 2.5], 1, "lengths"),
                                                     ([3, True], 1, "lengths"), ([3, 2], -1, "pass_cost"),
                                                     ([3, 2], 1.5, "pass_cost")])
def test_plan_refuses_bad_input(lengths, pass_cost, word):
    with pytest.raises(ValueError, match=word):
        plan_passes(lengths, pass_cost)


def test_plan_takes_a_tensor_of_lengths():
    assert plan_passes(torch.tensor([30, 20, 20]), 1) == plan_passes([30, 20, 20], 1) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="lengths must be a sequence"):
        plan_passes(None)


@pytest.mark.parametrize("passes", [[[0], [1]], [[0, 1], [1, 2]], [[], [0, 1, 2]], [[0, 1, 3], [2]]])
def test_run_in_passes_refuses_passes_that_miss_or_repeat_a_row(passes, gen):
    batch = padded_batch(gen, [3, 1, 2], 3)
    with pytest.raises(ValueError, match="passes must hold each of the batch's 3 rows exactly once"):
        run_in_passes(batch, batch["attention_mask"].bool(), passes, lambda sub, where, rows: where)
    with pytest.raises(ValueError, match="positions must have input_ids' shape"):
        run_in_passes(batch, batch["attention_mask"].bool()[:2], [[0, 1, 2]], lambda sub, where, rows: where)
    with pytest.raises(ValueError, match="positions must be a bool mask, got torch.int64"):  # an IndexError before
        run_in_passes(batch, batch["attention_mask"], [[0, 1, 2]], lambda sub, where, rows: where)


def padded_batch(gen, lengths, width):
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, 100, (n,), generator=gen)
        mask[b, :n] = 1
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("pass_cost", [0, 3, 10**6])
def test_run_in_passes_gives_the_one_pass_order(pass_cost, gen):
    """The picks of every pass come back in the row-major order of the one padded pass, each pass
    seeing its own rows trimmed to its longest one (a pass's picks depend on its rows only): its
    input_ids and its attention_mask alike."""
    lengths = torch.randint(1, 12, (9,), generator=gen).tolist()
    batch = padded_batch(gen, lengths, max(lengths) + 2)  # wider than any row, as a sub-batch may be
    positions = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=gen) < 0.6)
    table = torch.randn(100, 5, generator=gen, dtype=torch.float64)
    seen, subs = [], []

    def run(sub, where, rows):
        seen.append((rows.tolist(), sub["input_ids"].shape[1]))
        subs.append(sub)
        feats = table[sub["input_ids"]] + torch.arange(sub["input_ids"].shape[1], dtype=torch.float64)[:, None]
        return feats[where]

    whole = table[batch["input_ids"]] + torch.arange(batch["input_ids"].shape[1], dtype=torch.float64)[:, None]
    want = whole[positions]
    passes = plan_passes(lengths, pass_cost)
    got = run_in_passes(batch, positions, passes, run)
    assert torch.equal(got, want)
    assert [rows for rows, _ in seen] == passes
    # Each pass trimmed to its longest row, one pass of every row too.
    assert [w for _, w in seen] == [max(lengths[r] for r in p) for p in passes]
    for (rows, width), sub in zip(seen, subs):
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(sub[key], batch[key][rows, :width])


@pytest.mark.parametrize("trial", range(4))
def test_the_reordering_under_a_meta_default_device(trial, gen):
    """Under torch.set_default_device("meta") (left on after building a model skeleton; training
    runs there), the picks' destinations were filled from an arange made on "meta": assigning it
    to the CPU index left that index as torch.empty_like made it, and the picks went to arbitrary
    rows or out of range (index_copy_'s IndexError, seen in CI).  The same picks as without it."""
    lengths = torch.randint(1, 12, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen).tolist()
    batch = padded_batch(gen, lengths, max(lengths))
    positions = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=gen) < 0.6)
    table = torch.randn(100, 5, generator=gen, dtype=torch.float64)
    rows = torch.randperm(len(lengths), generator=gen).tolist()
    cut = int(torch.randint(1, len(rows), (1,), generator=gen))
    passes = [rows[:cut], rows[cut:]]  # rows out of order: the picks must be put back in place

    def run(sub, where, rows):
        return table[sub["input_ids"]][where]

    want = run_in_passes(batch, positions, passes, run)
    assert torch.equal(want, table[batch["input_ids"]][positions])
    with default_device("meta"):
        got = run_in_passes(batch, positions, passes, run)
    assert torch.equal(got, want)


def test_no_plan_runs_the_batch_as_it_is(gen):
    batch = padded_batch(gen, [3, 1, 2], 5)
    positions = batch["attention_mask"].bool()
    got = run_in_passes(batch, positions, None, lambda sub, where, rows: (sub, where, rows))
    assert got[0] is batch and got[1] is positions and got[2].tolist() == [0, 1, 2]


def test_one_pass_in_any_row_order_and_an_empty_batch(gen):
    """A pass's rows may come in any order: one pass of every row, not ascending, still gives the
    batch's row-major order.  An empty batch (plan_passes([]) == []) runs as one empty pass."""
    lengths = torch.randint(1, 6, (5,), generator=gen).tolist()
    batch = padded_batch(gen, lengths, max(lengths))
    positions = batch["attention_mask"].bool()
    table = torch.randn(100, 3, generator=gen, dtype=torch.float64)

    def run(sub, where, rows):
        return table[sub["input_ids"]][where]

    want = table[batch["input_ids"]][positions]
    order = torch.randperm(5, generator=gen).tolist()
    while order == sorted(order):
        order = torch.randperm(5, generator=gen).tolist()
    assert torch.equal(run_in_passes(batch, positions, [order], run), want)
    empty = dict(input_ids=torch.zeros(0, 4, dtype=torch.long), attention_mask=torch.zeros(0, 4, dtype=torch.long))
    got = run_in_passes(empty, torch.zeros(0, 4, dtype=torch.bool), plan_passes([]), run)
    assert got.shape == (0, 3)


def test_a_position_in_the_trimmed_padding_is_refused(gen):
    """A pass keeps its rows' columns up to its longest row: a True position past that would be
    dropped without a word, so it is a ValueError."""
    batch = padded_batch(gen, [3, 1, 2], 5)
    positions = batch["attention_mask"].bool()
    positions[1, 3] = True  # in row 1's padding, past every row
    with pytest.raises(ValueError, match="positions must be False in the rows' padding"):
        run_in_passes(batch, positions, [[0, 1, 2]], lambda sub, where, rows: where)


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the calls that read a tensor's values into Python (int(), bool(), .item()) or size
    their output by its values (nonzero): each a device sync on a GPU.  (.tolist() and .cpu() do
    not dispatch here: they are one read each, seen by no mode.)"""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
        return func(*args, **(kwargs or {}))


def test_run_in_passes_reads_nothing_per_pass(gen):
    """The passes' widths, the padding check and the picks' order are read from one host copy of
    the lengths and the positions: no value read or nonzero per pass (three a pass before, each a
    device sync on a GPU), and the picks as the one pass gives them."""
    lengths = torch.randint(1, 12, (int(torch.randint(4, 30, (1,), generator=gen)),), generator=gen).tolist()
    batch = padded_batch(gen, lengths, max(lengths) + 1)
    positions = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=gen) < 0.6)
    table = torch.randn(100, 3, generator=gen, dtype=torch.float64)

    def run(sub, where, rows):
        return table[sub["input_ids"]][where]

    want = table[batch["input_ids"]][positions]
    counts = []
    for passes in ([list(range(len(lengths)))], [[r] for r in torch.randperm(len(lengths), generator=gen).tolist()]):
        with DeviceReads() as reads:
            got = run_in_passes(batch, positions, passes, run)
        assert torch.equal(got, want)
        counts.append(reads.count)
    assert counts == [0, 0]


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_run_in_passes_takes_an_attention_mask_of_any_dtype(dtype, gen):
    """A bool, int32 or float attention mask (transformers takes each) gives the picks of the int64
    one: the host copy of the lengths held a float mask's sums as floats, and a float width raised
    TypeError ("slice indices must be integers") where the per-pass int() of before took it."""
    lengths = torch.randint(1, 9, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
    batch = padded_batch(gen, lengths, max(lengths) + int(torch.randint(0, 3, (1,), generator=gen)))
    positions = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=gen) < 0.6)
    table = torch.randn(100, 3, generator=gen, dtype=torch.float64)

    def run(sub, where, rows):
        assert sub["attention_mask"].dtype == dtype
        return table[sub["input_ids"]][where]

    passes = plan_passes(lengths, int(torch.randint(0, 4, (1,), generator=gen)))
    got = run_in_passes(dict(batch, attention_mask=batch["attention_mask"].to(dtype)), positions, passes, run)
    assert torch.equal(got, table[batch["input_ids"]][positions])


def test_gradients_flow_through_the_reordering(gen):
    lengths = [4, 1, 3, 2]
    batch = padded_batch(gen, lengths, 4)
    positions = batch["attention_mask"].bool()
    # Distinct ids: a weight row picked twice sums its two gradients in the order of the passes, which
    # may round differently from the one pass's order (seed 2216053567 drew a repeated id and failed
    # torch.equal by one float64 rounding). Each row's gradient then comes from one pick only.
    batch["input_ids"][positions] = torch.randperm(99, generator=gen)[:int(positions.sum())] + 1
    weight = torch.randn(100, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    def run(sub, where, rows):
        return weight[sub["input_ids"]][where] * torch.arange(1, 4, dtype=torch.float64)

    coef = torch.randn(int(positions.sum()), 3, generator=gen, dtype=torch.float64)
    got, = torch.autograd.grad((run_in_passes(batch, positions, plan_passes(lengths, 0), run) * coef).sum(), weight)
    want, = torch.autograd.grad((run(batch, positions, None) * coef).sum(), weight)
    assert torch.equal(got, want)
    assert len(plan_passes(lengths, 0)) == 4


class RowsMade(torch.utils._python_dispatch.TorchDispatchMode):
    """The distinct storages of the (n, C) tensors the ops make."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages = shape, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_the_reordering_makes_one_copy_of_the_picks(gen):
    """The passes' picks are copied once, into their rows of the output: a cat then a gather by the
    sorted keys made two (n, C) tensors, both alive at the gather (SmolLM2, 32 CounterFact edits:
    66.6 MiB each, at the forward's peak of a training step), and the gather's backward one more;
    each pass's gradient is now a gather of its rows."""
    lengths = torch.randint(1, 12, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
    batch = padded_batch(gen, lengths, max(lengths))
    positions = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=gen) < 0.7)
    positions[:, 0] = True  # every row has a pick: no pass holds all n of them
    weight = torch.randn(100, 7, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(sub, where, rows):
        return weight[sub["input_ids"]][where]

    passes = [[r] for r in torch.randperm(len(lengths), generator=gen).tolist()]  # never row-major
    n = int(positions.sum())
    coef = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    with RowsMade((n, 7)) as made:
        got = run_in_passes(batch, positions, passes, run)
    assert len(made.storages) == 1
    with RowsMade((n, 7)) as made:
        grad, = torch.autograd.grad(got, weight, coef)
    assert len(made.storages) == 0
    want = weight[batch["input_ids"]][positions]
    assert torch.equal(got, want)
    # A weight row picked twice sums its gradients in the passes' order: within rounding only.
    assert torch.allclose(grad, torch.autograd.grad(want, weight, coef)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_passes_of_a_real_model_give_the_one_padded_pass_and_its_gradients(arch, gen):
    """Clean-room check on tiny float64 models (GPT-2's absolute positions, Llama's rotary ones,
    T5's bidirectional encoder, whose real tokens would see a padding slot the sub-batch's mask
    let through): the picks of run_in_passes are one padded pass's, and so are the gradients in
    the model's weights and in an input added to the embeddings, which each pass reads through
    `rows`; for plan_passes' passes at pass cost 0 (a pass per length) and 10**6 (one pass of
    rows of every length, trimmed) and for 3 passes of shuffled rows.  Lengths with ties, rows
    of length 1, a batch wider than its longest row."""
    from dcedit_kernels.models import tiny_model

    model, tok = tiny_model(arch, seed=int(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float64)
    body = model.encoder if arch == "t5" else model
    lengths = [1, 4, 4, 1] + torch.randint(1, 8, (4,), generator=gen).tolist()
    order = torch.randperm(len(lengths), generator=gen).tolist()
    lengths = [lengths[i] for i in order]
    batch = padded_batch(gen, lengths, max(lengths) + 1)
    batch["input_ids"] = batch["input_ids"] % (len(tok) - 3) + 3 * batch["attention_mask"]
    positions = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=gen) < 0.7)
    positions[:, 0] = True
    embed = model.get_input_embeddings()
    shift = torch.randn(*batch["input_ids"].shape, embed.weight.shape[1], generator=gen, dtype=torch.float64)
    shift = (0.1 * shift).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(sub, where, rows):
        x = embed(sub["input_ids"]) + shift[rows, :sub["input_ids"].shape[1]]
        out = body(inputs_embeds=x, attention_mask=sub["attention_mask"], use_cache=False)
        return (out.last_hidden_state if arch == "t5" else out.logits)[where]

    # The oracle: every row in one pass, padded to the batch's width, picked row-major.
    want = run(batch, positions, torch.arange(len(lengths)))
    coef = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * coef).sum(), params + [shift], allow_unused=True)
    scale = max(float(g.abs().max()) for g in want_grads if g is not None)
    # A pass per length (pass cost 0), one pass of every row, and 3 passes of rows in any order
    # (passes of rows of other lengths, so each sub-batch has padding of its own).
    shuffled = torch.randperm(len(lengths), generator=gen).tolist()
    plans = [plan_passes(lengths, 0), plan_passes(lengths, 10**6), [shuffled[:3], shuffled[3:5], shuffled[5:]]]
    assert len(plans[0]) >= len(set(lengths)) > 1 and len(plans[1]) == 1  # at pass cost 0 no pass mixes two lengths
    for passes in plans:
        got = run_in_passes(batch, positions, passes, run)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.detach().abs().max()))
        got_grads = torch.autograd.grad((got * coef).sum(), params + [shift], allow_unused=True)
        for g_got, g_want in zip(got_grads, want_grads):
            if g_want is None or g_got is None:  # a weight no pick reads (T5's decoder): none in either
                assert g_want is None and g_got is None
                continue
            # atol: a gradient that is 0 in exact arithmetic (Llama's attention over one token) rounds
            # to ~1e-19 in one pass and to 0 in another.
            assert torch.allclose(g_got, g_want, rtol=1e-9, atol=1e-12 * scale)


def test_set_partitions_counts():
    assert [sum(1 for _ in set_partitions(list(range(n)))) for n in range(6)] == [1, 1, 2, 5, 15, 52]  # Bell numbers
    assert all(sorted(itertools.chain(*p)) == [0, 1, 2] for p in set_partitions([0, 1, 2]))
