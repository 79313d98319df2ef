"""Editors moved to another dtype (`editor.to(torch.float64)`, `.to(torch.bfloat16)`): they run
(ProEditor's ψ raised on the dtype mismatch), a float64 editor gives float64 results (its factors
rounded to fp32 first, as MEND's GradientTransform does: `compat.mend` matches float64 MEND
checkpoints with it), and a bf16 editor runs in fp32 arithmetic over its bf16 weights."""

import copy

import pytest
import torch

from dcedit_kernels.editors import MEND, MoEditor, ProEditor, RaEditor
from helpers import randn, ragged_offsets, random_counts, rel_err

D_IN, D_OUT = 5, 6
EDITORS = {
    "mend": lambda **kw: MEND(D_IN, D_OUT, rank=3, seed=0, **kw),
    "mend_no_norm": lambda **kw: MEND(D_IN, D_OUT, rank=3, seed=0, norm=False, **kw),
    "raeditor": lambda **kw: RaEditor(D_IN, D_OUT, n_editors=3, rank=3, seed=0, **kw),
    "moeditor": lambda **kw: MoEditor(D_IN, D_OUT, n_editors=3, feat_dim=D_OUT, rank=3, seed=0, **kw),
    "proeditor": lambda **kw: ProEditor(D_IN, D_OUT, rank=3, seed=0, **kw),
    "proeditor_sentence": lambda **kw: ProEditor(D_IN, D_OUT, rank=3, seed=0, generator="sentence", **kw),
}


def _inputs(gen):
    counts = random_counts(4, gen)
    counts[0] = max(counts[0], 3)
    T = sum(counts)
    return (randn((T, D_IN), gen, torch.float64), randn((T, D_OUT), gen, torch.float64), ragged_offsets(counts),
            randn((4, D_OUT), gen, torch.float64))


def _nontrivial(editor, gen):
    """Random u and ψ output weights: the initial editor is an identity map."""
    with torch.no_grad():
        for layer in editor.layers:
            layer.u.copy_(torch.randn(layer.u.shape, generator=gen) * 0.3)
        if editor.psi is not None:
            editor.psi.fc2.weight.copy_(torch.randn(editor.psi.fc2.weight.shape, generator=gen) * 0.3)
        if getattr(editor, "w_gate", None) is not None:
            editor.w_gate.copy_(torch.randn(editor.w_gate.shape, generator=gen))
    return editor


@pytest.mark.parametrize("warm", [False, True], ids=["fresh_norms", "warm_norms"])
@pytest.mark.parametrize("method", list(EDITORS))
def test_float64_editor_gives_float64_results(method, warm, gen):
    mu, eta, offsets, feats = _inputs(gen)
    ed32 = _nontrivial(EDITORS[method](), gen)
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
    mu, eta, offsets, feats = _inputs(gen)
    ed = _nontrivial(EDITORS[method](), gen)
    ed16 = copy.deepcopy(ed).to(torch.bfloat16).eval()
    ed16_in_fp32 = copy.deepcopy(ed16).float()  # before either runs: RaEditor's routing draws
    delta = ed16.dense(mu.float(), eta.float(), offsets, 0, feats.float())
    assert delta.dtype == torch.float32
    want = ed16_in_fp32.dense(mu.float(), eta.float(), offsets, 0, feats.float())
    assert rel_err(delta, want) < 1e-2  # the same bf16 weights, ψ's layers run in bf16
