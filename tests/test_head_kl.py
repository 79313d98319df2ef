"""head_kl (the training KL from the head's input rows) against picked_kl of the head's logits, and
logits_at's rows_only mode that feeds it."""

import threading

import pytest
import torch
from torch import nn

from dcedit_kernels import head_kl_function, picked_kl_function
from dcedit_kernels.head_kl_function import head_kl, head_logits
from dcedit_kernels.losses import picked_kl
from dcedit_kernels.models import tiny_model
from dcedit_kernels.scored_logits import MIN_HEAD_ROWS, logits_at, rows_head


class RowwiseHead(nn.Module):
    """A head that is no nn.Linear (no out_features): head_kl learns its width from one row."""

    def __init__(self, H, V, gen, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.randn(V, H, generator=gen, dtype=dtype), requires_grad=False)

    def forward(self, x):
        return torch.tanh(x) @ self.w.T * 3


def random_head(kind, H, V, gen, dtype):
    if kind == "rowwise":
        return RowwiseHead(H, V, gen, dtype)
    head = nn.Linear(H, V, bias=kind == "bias", dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen, dtype=dtype))
        if head.bias is not None:
            head.bias.copy_(torch.randn(V, generator=gen, dtype=dtype) * 3)
    return head.requires_grad_(False)


def random_rows(gen, n, H, dtype):
    base = torch.randn(n, H, generator=gen, dtype=torch.float64)
    rows = base + torch.randn(n, H, generator=gen, dtype=torch.float64) * float(torch.rand(1, generator=gen))
    return base.to(dtype), rows.to(dtype)


def logits_kl(base, rows, head):
    """The oracle: picked_kl of the head's logits (the path of before, through autograd)."""
    with torch.no_grad():
        base_logp = torch.log_softmax(picked_kl_function.upcast(head(base)), -1)
    return picked_kl(base_logp, head(rows))


@pytest.mark.parametrize("kind", ["linear", "bias", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_kl_gives_picked_kl_of_the_heads_logits(kind, dtype, gen, monkeypatch):
    """Values and gradients in the rows against picked_kl of the head's logits and against float64,
    in blocks of one row to several (HEAD_ROWS_BUDGET), odd sizes, and no rows (0, no NaN)."""
    H, V = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(2, 60, (1,), generator=gen))
    n = int(torch.randint(0, 25, (1,), generator=gen))
    monkeypatch.setattr(head_kl_function, "HEAD_ROWS_BUDGET", V * int(torch.randint(1, 8, (1,), generator=gen)))
    monkeypatch.setattr(head_kl_function, "HEAD_MIN_ROWS", 1)
    head = random_head(kind, H, V, gen, dtype)
    base, rows = random_rows(gen, n, H, dtype)
    a, b = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    got = head_kl(base, a, head)
    assert got.shape == () and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if not n:
        assert float(got) == 0.0  # as picked_kl's of no positions: a constant 0
        return
    want = logits_kl(base, b, head)
    (g_got,), (g_want,) = torch.autograd.grad(got, a), torch.autograd.grad(want, b)
    assert g_got.dtype == dtype and g_got.shape == (n, H)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    assert torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
    assert torch.allclose(g_got.double(), g_want.double(), rtol=tol, atol=tol * max(1.0, float(g_want.abs().max())))
    head64 = random_head(kind, H, V, gen, torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    z64 = rows.double().requires_grad_()
    want64 = logits_kl(base.double(), z64, head64)
    g64, = torch.autograd.grad(want64, z64)
    tol64 = {torch.float64: 1e-12, torch.float32: 1e-4}.get(dtype, 5e-2)
    assert torch.allclose(got.double(), want64, rtol=tol64, atol=tol64)
    assert torch.allclose(g_got.double(), g64, rtol=tol64, atol=tol64 * max(1.0, float(g64.abs().max())))


def test_head_kl_gives_the_head_at_least_four_rows_a_block(gen, monkeypatch):
    """A block of 1-3 rows (the last of a run, or all of a few) went through the head's matmuls as
    such, whose backward this CPU torch's MKL runs with a less accurate kernel below 4 rows
    (`scored_logits.MIN_HEAD_ROWS`): padded with zero rows, whose logits are dropped; the KL and its
    gradient are picked_kl's of the head's logits, in float64."""
    H, V = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(2, 60, (1,), generator=gen))
    n = int(torch.randint(1, 12, (1,), generator=gen))
    monkeypatch.setattr(head_kl_function, "HEAD_ROWS_BUDGET", V * int(torch.randint(1, 6, (1,), generator=gen)))
    monkeypatch.setattr(head_kl_function, "HEAD_MIN_ROWS", 1)
    head = random_head("bias", H, V, gen, torch.float64)
    base, rows = random_rows(gen, n, H, torch.float64)
    seen, forward = [], head.forward  # the rows of each call whose backward runs (the base rows' has none)
    head.forward = lambda x: (x.requires_grad and seen.append(x.shape[1]), forward(x))[1]
    a, b = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    got = head_kl(base, a, head)
    assert seen and min(seen) >= min(MIN_HEAD_ROWS, n) and (n >= MIN_HEAD_ROWS or min(seen) == MIN_HEAD_ROWS)
    del head.forward
    want = logits_kl(base, b, head)
    (g_got,), (g_want,) = torch.autograd.grad(got, a), torch.autograd.grad(want, b)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_got, g_want, rtol=1e-12, atol=1e-12 * max(1.0, float(g_want.abs().max())))


def test_head_kl_passes_gradcheck(gen, monkeypatch):
    """Its gradient (computed in the forward, scaled in the backward) against finite differences,
    over blocks of rows, under a non-uniform output gradient (each row's KL weighted)."""
    n, H, V = int(torch.randint(1, 6, (1,), generator=gen)), 3, int(torch.randint(2, 9, (1,), generator=gen))
    monkeypatch.setattr(head_kl_function, "HEAD_ROWS_BUDGET", V * 2)
    monkeypatch.setattr(head_kl_function, "HEAD_MIN_ROWS", 1)
    head = random_head("bias", H, V, gen, torch.float64)
    base, rows = random_rows(gen, n, H, torch.float64)
    weights = torch.rand(n, generator=gen, dtype=torch.float64)
    from dcedit_kernels.head_kl_function import HeadKLRows
    assert torch.autograd.gradcheck(lambda r: (HeadKLRows.apply(r, base, head) * weights).sum(),
                                    (rows.requires_grad_(),))


def test_head_kl_saves_no_tensor_of_the_vocabularys_width(gen):
    """What the backward holds is one (n, H) gradient: no (n, V) logits, log-probabilities or
    gradient (the logits path held four at its peak)."""
    n, H, V = int(torch.randint(2, 20, (1,), generator=gen)), 5, int(torch.randint(30, 80, (1,), generator=gen))
    head = random_head("linear", H, V, gen, torch.float32)
    base, rows = random_rows(gen, n, H, torch.float32)
    rows.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kl = head_kl(base, rows, head)
    # The head's weight is saved by each block's own backward inside the forward: a view of the
    # parameter, no copy.
    weight = head.weight.untyped_storage().data_ptr()
    assert [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() != weight] == [(n, H)]
    kl.backward()
    assert rows.grad.shape == (n, H)


def test_head_kl_names_rows_of_other_shapes(gen):
    head = random_head("linear", 4, 7, gen, torch.float32)
    with pytest.raises(ValueError, match="base_rows and rows"):
        head_kl(torch.zeros(3, 4), torch.zeros(2, 4), head)
    with pytest.raises(ValueError, match="base_rows and rows"):
        head_kl(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), head)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_only_keeps_the_heads_input_and_gives_the_head_no_rows(arch, gen):
    """The head computes no logits; `rows` is its input at the positions (the hidden state there),
    and the head's logits of them are the model's at the positions."""
    model, _ = tiny_model(arch, seed=int(torch.randint(0, 100, (1,), generator=gen)))
    B, L = 3, 7
    ids = torch.randint(0, 50, (B, L), generator=gen)
    positions = torch.rand(B, L, generator=gen) < 0.5
    positions[0, 0] = True
    head = rows_head(model)
    assert head is model.get_output_embeddings()
    # A pre-hook of the caller's that changes the head's input by position (neither idempotent nor
    # rowwise): it runs on the full input as in a plain forward, the rows are taken after it, and
    # head_logits runs the head's forward on them without it.
    seen = []
    scale = torch.arange(1, L + 1, dtype=torch.float32).reshape(1, L, 1) / 4

    def by_position(module, args):
        seen.append(tuple(args[0].shape))
        return (args[0] * scale,)

    handle = head.register_forward_pre_hook(by_position)
    try:
        full = model(input_ids=ids).logits
        assert rows_head(model) is head
        with logits_at(model, positions, rows_only=True) as scored:
            logits = model(input_ids=ids).logits
        assert seen == [(B, L, head.in_features)] * 2
        assert logits.shape[:2] == (1, 0) and scored.rows_give_logits(logits)
        assert scored.rows.shape == (int(positions.sum()), head.in_features)
        assert torch.allclose(head_logits(head, scored.rows), full[positions], rtol=1e-5, atol=1e-5)
        assert len(seen) == 2
    finally:
        handle.remove()
    assert not scored.rows_give_logits(logits * 1)  # another tensor: a transform after the head
    logits.mul_(1)  # changed in place after the head (Chameleon's masking of image tokens)
    assert not scored.rows_give_logits(logits)


def test_rows_only_does_not_stop_another_threads_gather(gen):
    """The forward hook rows_only puts on the head is logits_at's own: another thread's logits_at
    still gathers (a hook of the caller's on the head turns gathering off)."""
    model, _ = tiny_model("gpt2", seed=int(torch.randint(0, 100, (1,), generator=gen)))
    ids = torch.randint(0, 50, (2, 5), generator=gen)
    positions = torch.zeros(2, 5, dtype=torch.bool)
    positions[:, -1] = True
    inside, done, result = threading.Event(), threading.Event(), {}

    def other():
        inside.wait()
        with logits_at(model, positions) as scored:
            result["shape"] = tuple(model(input_ids=ids).logits.shape)
            result["gathered"] = scored.gathered
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with logits_at(model, positions, rows_only=True):
        inside.set()
        assert done.wait(60)
    thread.join()
    # 2 scored rows, padded to MIN_HEAD_ROWS for the head's matmuls (their pick gives the 2)
    assert result == {"shape": (1, MIN_HEAD_ROWS, model.get_output_embeddings().out_features), "gathered": True}
    assert not model.get_output_embeddings()._forward_hooks and not model.get_output_embeddings()._forward_pre_hooks


def test_kl_head_is_none_for_a_trained_head_or_a_model_known_to_change_its_logits(gen):
    """The rows path recomputes the base logits with the head as it is at each use and gives the
    head no gradient: not for a head whose parameters are trained (or share memory with a trained
    weight, a tied embedding), nor for a model found to change its logits after the head."""
    from dcedit_kernels.head_kl_function import kl_head
    model, _ = tiny_model("llama", seed=int(torch.randint(0, 100, (1,), generator=gen)))
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    assert kl_head(model) is head
    assert kl_head(model, skip=[head]) is None  # an edited head
    assert kl_head(model, trained=[head.weight]) is None
    assert kl_head(model, trained=[head.weight[:3]]) is None  # a view of its memory
    head.weight.requires_grad_(True)
    assert kl_head(model) is None
    head.weight.requires_grad_(False)
    head_kl_function._LOGITS_AFTER_HEAD[model] = True
    assert kl_head(model) is None


def test_ft_kl_whose_logits_change_after_the_head_in_its_steps_only_edits_from_the_logits(gen, monkeypatch):
    """A model whose reference pass gives the head's output as its logits and whose steps do not
    (a forward that scales them under grad only): the fine-tuning starts again from the restored
    weights and takes the KL from the logits, as an apply that knew it from the start does."""
    from dcedit_kernels import EditRequest, ModelEditor
    model, tok = tiny_model("llama", seed=int(torch.randint(0, 100, (1,), generator=gen)))
    forward = model.forward

    def scaled_with_grad(*args, **kwargs):
        out = forward(*args, **kwargs)
        if torch.is_grad_enabled():
            out["logits"] = out["logits"] * 0.5
        return out

    monkeypatch.setattr(model, "forward", scaled_with_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = "model.layers.1.mlp.down_proj"
    me = ModelEditor(model, tok, [layer], method="ft_kl", ft_steps=2, ft_stop_loss=None)
    request = EditRequest("The capital of France is", "Rome", locality="Water is wet")
    handle = me.apply([request])
    assert model in head_kl_function._LOGITS_AFTER_HEAD and handle.stats["ft_steps_run"] == 2
    got = model.get_submodule(layer).weight.detach().clone()
    handle.undo()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    want = me.apply([request])  # the logits path from the start
    assert torch.equal(got, model.get_submodule(layer).weight) and not torch.equal(got, before[layer + ".weight"])
    want.undo()


def test_head_kl_blocks_hold_at_least_the_minimum_rows_and_the_budget(monkeypatch):
    """The head's matmuls run on HEAD_MIN_ROWS rows a block at least (few rows ran them at ~60 % of
    their speed), else on HEAD_ROWS_BUDGET elements' worth."""
    from dcedit_kernels.picked_kl_function import row_blocks
    assert [b.stop - b.start for b in row_blocks(300, 49152, head_kl_function.HEAD_ROWS_BUDGET,
                                                  head_kl_function.HEAD_MIN_ROWS)] == [85, 85, 85, 45]
    assert [b.stop - b.start for b in row_blocks(130, 128256, head_kl_function.HEAD_ROWS_BUDGET,
                                                  head_kl_function.HEAD_MIN_ROWS)] == [64, 64, 2]
