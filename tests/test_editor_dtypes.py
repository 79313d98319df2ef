"""Editors moved to another dtype (`editor.to(torch.float64)`, `.to(torch.bfloat16)`): they run
(ProEditor's ψ raised on the dtype mismatch), a float64 editor gives float64 results (its factors
rounded to fp32 first, as MEND's GradientTransform does: `compat.mend` matches float64 MEND
checkpoints with it), and a bf16 editor runs in fp32 arithmetic over its bf16 weights."""

import copy

import pytest
import torch

from helpers import OP_CASE_DIMS, editor_inputs, randn, randomize_editor, rel_err, small_editor

D_IN, D_OUT = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]
EDITORS = {  # name -> small_editor's arguments
    "mend": ("mend", {}),
    "mend_no_norm": ("mend", dict(norm=False)),
    "raeditor": ("raeditor", {}),
    "moeditor": ("moeditor", {}),
    "proeditor": ("proeditor", {}),
    "proeditor_sentence": ("proeditor", dict(generator="sentence")),
}


def _editor(name, gen):
    """A non-trivial editor (`randomize_editor`: the initial one is an identity map)."""
    method, kwargs = EDITORS[name]
    return randomize_editor(small_editor(method, **kwargs), gen, scale=0.3)


@pytest.mark.parametrize("warm", [False, True], ids=["fresh_norms", "warm_norms"])
@pytest.mark.parametrize("method", list(EDITORS))
def test_float64_editor_gives_float64_results(method, warm, gen):
    mu, eta, offsets, feats = editor_inputs(gen, torch.float64)
    ed32 = _editor(method, gen)
    if warm and ed32.norm is not None:
        ed32.norm.update(randn((9, D_IN), gen), randn((9, D_OUT), gen))
    ed64 = copy.deepcopy(ed32).to(torch.float64).eval()
    edit = ed64(mu, eta, offsets, mode=0, edit_feats=feats)
    assert edit.mu_t.dtype == edit.eta_t.dtype == torch.float64
    delta = edit.dense()
    assert delta.dtype == torch.float64
    want = ed32.eval().dense(mu.float(), eta.float(), offsets, 0, feats.float())
    assert rel_err(delta, want) < 1e-5  # fp32 against float64 arithmetic, same weights


@pytest.mark.parametrize("method", list(EDITORS))
def test_bf16_editor_runs_in_fp32_arithmetic(method, gen):
    mu, eta, offsets, feats = editor_inputs(gen, torch.float64)
    ed = _editor(method, gen)
    ed16 = copy.deepcopy(ed).to(torch.bfloat16).eval()
    ed16_in_fp32 = copy.deepcopy(ed16).float()  # before either runs: RaEditor's routing draws
    delta = ed16.dense(mu.float(), eta.float(), offsets, 0, feats.float())
    assert delta.dtype == torch.float32
    want = ed16_in_fp32.dense(mu.float(), eta.float(), offsets, 0, feats.float())
    assert rel_err(delta, want) < 1e-2  # the same bf16 weights, ψ's layers run in bf16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_editor_keeps_its_running_norms_in_fp32(dtype, gen):
    """The running norms are sums over every token seen: in 16 bits the count stopped growing (bf16's
    at 4096, so the std drifted) and fp16's sums overflowed to inf, then NaN, past 65504 tokens.  A
    16-bit editor's statistics stay fp32 and match the float64 mean and std of all its tokens."""
    ed = small_editor("mend").to(dtype).train()
    norm = ed.norm
    assert {b.dtype for b in norm.buffers()} == {torch.float32}
    assert ed.layers[0].u.dtype == dtype  # the parameters do take the dtype
    mus, etas = [], []
    for T in (1, 5000, 3, 70000):  # past bf16's 4096 and fp16's 65504
        mu, eta = randn((T, D_IN), gen, dtype) * 3 + 1, randn((T, D_OUT), gen, dtype) - 2
        offsets = torch.tensor([0, T], dtype=torch.int32)
        ed(mu, eta, offsets)
        mus.append(mu.double()), etas.append(eta.double())
    mu, eta = torch.cat(mus), torch.cat(etas)
    assert int(norm.k) == mu.shape[0]
    for got, want in ((norm.u_mean, mu.mean(0)), (norm.u_std, mu.std(0)),
                      (norm.v_mean, eta.mean(0)), (norm.v_std, eta.std(0))):
        assert rel_err(got, want) < 1e-4
