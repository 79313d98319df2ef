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


# bf16's unit roundoff (8 significant bits): a rounding to bf16 moves x by at most U·|x|.
BF16_U = 2.0 ** -8


def _bf16_gain_error_bound(psi, h, offsets):
    """ψ's gain g = 1 + W₂ relu(W₁ x + b₁) + b₂ (x = h, or each edit's mean of h) in float64 from
    fp32 ψ's weights, and a first-order bound on the error of the same ψ run in bf16: h rounded
    (U|h|; a mean summed in bf16 adds U·Σ|h| over its edit), each layer's output rounded, the bias
    added before or after (U(|W||a| + |z|)), errors carried by |W|, and 1 + y rounded (U|g|)."""
    d = lambda t: t.detach().double()  # noqa: E731
    w1, b1, w2, b2 = d(psi.fc1.weight), d(psi.fc1.bias), d(psi.fc2.weight), d(psi.fc2.bias)
    x = h.double()
    err = BF16_U * x.abs()
    if psi.level == "sentence":
        bounds = list(zip(offsets.tolist()[:-1], offsets.tolist()[1:]))
        x = torch.cat([x[a:b].mean(0, keepdim=True).expand(b - a, -1) for a, b in bounds])
        sums = torch.cat([h.double()[a:b].abs().sum(0, keepdim=True).expand(b - a, -1) for a, b in bounds])
        err = BF16_U * (sums + x.abs())
    z = x @ w1.t() + b1
    err = err @ w1.abs().t() + BF16_U * (x.abs() @ w1.abs().t() + z.abs())
    a = z.clamp(min=0)
    y = a @ w2.t() + b2
    err = err @ w2.abs().t() + BF16_U * (a @ w2.abs().t() + y.abs())
    return 1 + y, err + BF16_U * (1 + y).abs()


@pytest.mark.parametrize("method", list(EDITORS))
def test_bf16_editor_runs_in_fp32_arithmetic(method, gen):
    """A bf16 editor computes in fp32 over its bf16 weights, but for two parts that read bf16 by
    design: MoEditor's gate takes its features in its weights' dtype (noisy_topk_gate computes in
    fp32 after), and ProEditor's ψ runs its layers in bf16.  Against an fp32 copy run in full, those
    made this test flaky at its former 1e-2 on the shift: a gate logit within bf16 rounding of
    another flipped the route (rel err 0.07-0.66 in 7 of 1000 draws, seeds 0-999), and ψ's gain
    error, carried through the editor's layers, passed 1e-2 once in 5000 draws (seed 3747: 0.011;
    median 1.6e-3).  So both editors get features already in bf16 (the fresh gate norm passes them
    on as they are) and the bf16 ψ: the rest, in fp32 arithmetic, gives the fp32 copy's shift (bit
    for bit over 2000 draws per editor; 1e-5 is fp32's tolerance, bf16 arithmetic errs by 1e-4 and
    more).  ψ's bf16 gain is checked on its own against the fp32 ψ's, to its rounding bound."""
    mu, eta, offsets, feats = editor_inputs(gen, torch.float64)
    ed = _editor(method, gen)
    ed16 = copy.deepcopy(ed).to(torch.bfloat16).eval()
    ed16_in_fp32 = copy.deepcopy(ed16).float()  # before either runs: RaEditor's routing draws
    feats = feats.bfloat16().float()
    if ed16.psi is not None:
        h = torch.cat([mu, eta], 1).float()
        with torch.no_grad():
            gain, gain32 = ed16.psi(h, offsets), ed16_in_fp32.psi(h, offsets)
        want_gain, bound = _bf16_gain_error_bound(ed16_in_fp32.psi, h, offsets)
        assert gain.dtype == torch.float32
        assert rel_err(gain32, want_gain) < 1e-5
        # The bound is each entry's worst case; the roundings, of either sign, come to 0.003-0.028 of
        # it in norm over 5000 draws per level (at most 0.14 entrywise).  A bf16 gain whose 1 + y had
        # y 10 % off came to 0.35-0.69 (token) and 0.06-0.29 (sentence) over 1000 draws.
        assert float((gain.double() - want_gain).norm()) <= 0.05 * float(bound.norm())
        ed16_in_fp32.psi = copy.deepcopy(ed16.psi)
    delta = ed16.dense(mu.float(), eta.float(), offsets, 0, feats)
    assert delta.dtype == torch.float32
    want = ed16_in_fp32.dense(mu.float(), eta.float(), offsets, 0, feats)
    assert rel_err(delta, want) < 1e-5


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


@pytest.mark.parametrize("model_dtype,editor_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16_model", "bf16_editor"])
def test_rescaled_edit_of_16bit_tensors_is_scaled_in_fp32(model_dtype, editor_dtype, gen):
    """`rescale_batch_size` scales η by N/B and α by B/N: in 16 bits that product and quotient were
    rounded again (a bf16 model's η × 7/3 in bf16, a bf16 editor's α / (7/3) in bf16), and α·Δ of
    the tiny Llama's down_proj was 1.6e-4 (bf16 model) and 8.3e-4 (bf16 editor) off the same edit
    scaled in float64 (relative 2-norm); scaled in fp32, as the editors compute, 1.9e-7 at most."""
    from dcedit_kernels import ModelEditor, EditRequest
    from dcedit_kernels.models import tiny_model

    model, tok = tiny_model("llama", seed=3, dtype=model_dtype)
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    me = ModelEditor(model, tok, layers, method="mend", rank=7, rescale_batch_size=3)
    for editor in me.editors.values():
        randomize_editor(editor, gen, scale=0.05)
        with torch.no_grad():
            editor.alpha.fill_(-0.0123)  # not edit_lr's 1e-4: in bf16 a multiple of 7, which 7/3 divides exactly
    me.editors.to(editor_dtype)
    targets = "red green blue cat dog sun moon".split()
    requests = [EditRequest(f"fact {i} is", target) for i, target in enumerate(targets)]
    factors, feats, _ = me.capture(me.tokenize([r.prompt for r in requests], [r.target for r in requests]))
    edits = me.edits_as_applied(dict(factors), feats)
    scale = len(requests) / 3
    reference = copy.deepcopy(me.editors).double().eval()
    for name in layers:
        key, mode = me.slots[name]
        f = factors[name]
        want = reference[key](f.mu.double(), f.eta.double() * scale, f.edit_offsets, mode=mode)
        got = edits[name].dense().double() * edits[name].alpha.double()
        assert rel_err(got, want.dense() * (want.alpha.double() / scale)) < 1e-5, name
