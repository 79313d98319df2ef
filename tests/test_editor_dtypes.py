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
