"""The ops under torch.autocast: they ignore it (`_library._ignore_autocast`) and compute at the
precision their input dtypes set, so every result and gradient is bit for bit the one without
autocast, on every device.  Before, the C++ grouped_lowrank raised under CPU autocast, and the
references of lowrank_delta_linear and noisy_topk_gate ran their matmuls in bf16."""

import pytest
import torch

from dcedit_kernels import ops
from helpers import (
    OP_CASE_DIMS, deterministic_on, editor_inputs, output_and_grads, public_op_cases, ragged_offsets, randn, random_counts,
    small_editor,
)

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _autocast(device):
    return torch.autocast(device, dtype=AUTOCAST_DTYPE[device])


@pytest.mark.parametrize("name", ["grouped_outer", "segmented_fisher", "grouped_lowrank", "fisher_mask",
                                  "lowrank_delta_linear", "noisy_topk_gate", "sort_by_group"])
def test_op_ignores_autocast(name, gen, device):
    fn, args = public_op_cases(gen, device)[name]
    with deterministic_on(device):  # the two runs' atomics in one order on CUDA
        want, want_grads = output_and_grads(fn, args)
        with _autocast(device):
            got = fn(*args)
        got_grads = output_and_grads(lambda *_: got, args)[1]  # backward outside autocast, as torch advises
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert (g is None and w is None) or torch.equal(g, w)


@pytest.mark.parametrize("name", ["grouped_outer", "grouped_lowrank", "fisher_mask", "lowrank_delta_linear"])
def test_op_gradients_ignore_autocast_with_the_backward_inside_it(name, gen, device):
    """The backward run inside the autocast block too (torch advises against it; it is allowed):
    lowrank_delta_linear's weight and bias gradients are torch ops of its formula, which computed
    the weight's in bf16 (off by up to 3.7e-3).  The layer's own weight and bias require grad here,
    as an nn.Linear's do."""
    fn, args = public_op_cases(gen, device)[name]
    if name == "lowrank_delta_linear":
        counts = random_counts(3, gen)
        T, o, i = sum(counts), OP_CASE_DIMS["d_out"], OP_CASE_DIMS["d_in"]
        row_group, offsets = torch.randint(-1, 3, (9,), generator=gen).to(device), ragged_offsets(counts, device)
        args = tuple(randn(shape, gen, device=device).requires_grad_()
                     for shape in ((9, i), (o, i), (o,), (T, i), (T, o), (3,)))

        def fn(x, weight, bias, mu, eta, alpha):
            return ops.lowrank_delta_linear(x, weight, bias, row_group, mu, eta, offsets, alpha)
    with deterministic_on(device):
        want, want_grads = output_and_grads(fn, args)
        with _autocast(device):
            got, got_grads = output_and_grads(fn, args)
    assert torch.equal(got, want)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        assert (g is None and w is None) or torch.equal(g, w)


def test_apply_shift_ignores_autocast(gen, device):
    d_out, d_in = OP_CASE_DIMS["d_out"], OP_CASE_DIMS["d_in"]
    weight = randn((d_out, d_in), gen, torch.bfloat16, device)
    delta, fisher = randn((d_out, d_in), gen, device=device), torch.rand(d_out, d_in, generator=gen).to(device)
    want = weight.clone()
    ops.apply_shift_(want, delta, 0.5, fisher, keep=0.5)
    with _autocast(device):
        ops.apply_shift_(weight, delta, 0.5, fisher, keep=0.5)
    assert torch.equal(weight, want)


@pytest.mark.parametrize("editor", ["moeditor", "proeditor"])
def test_editor_trains_under_autocast(editor, gen, device):
    """An editor's forward and backward run under autocast (the raw failure was in the first
    grouped_lowrank); its shift is fp32, as without autocast."""
    ed = small_editor(editor).to(device)
    mu, eta, offsets, feats = editor_inputs(gen, device=device)
    with _autocast(device):
        edit = ed(mu, eta, offsets, mode=0, edit_feats=feats)
        delta = edit.dense()
        loss = delta.pow(2).sum() + edit.aux_loss
    loss.backward()
    assert delta.dtype == torch.float32
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in ed.parameters())
    assert any(p.grad is not None and bool(p.grad.any()) for p in ed.parameters())


@pytest.mark.parametrize("name", ["grouped_lowrank", "lowrank_delta_linear"])
def test_op_ignores_autocast_under_torch_compile(name, gen):
    """The Python dispatcher (torch.compile's tracing) takes the same autocast rule."""
    torch._dynamo.reset()
    fn, args = public_op_cases(gen)[name]
    want = fn(*args)
    with _autocast("cpu"):
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    torch._dynamo.reset()
    assert torch.equal(got, want)


def test_deterministic_on_turns_the_mode_on_for_cuda_only_and_puts_it_back():
    """`helpers.deterministic_on`, which the bit-for-bit tests of two runs use: on CUDA, torch's
    deterministic mode (warn_only) inside the block and the previous setting after it, also when
    the block raises; on the CPU it changes nothing."""
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on("cpu"):
        assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyError):
        with deterministic_on(torch.device("cuda", 0)):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            raise KeyError
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
