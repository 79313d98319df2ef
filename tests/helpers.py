"""Input builders and measurements shared by the tests."""

import contextlib

import torch

from dcedit_kernels import ops


@contextlib.contextmanager
def default_device(device):
    """torch.set_default_device(device) inside the block, then `reset_default_device()`, also when
    the block raises."""
    torch.set_default_device(device)
    try:
        yield
    finally:
        reset_default_device()


def reset_default_device():
    """torch.set_default_device(None), leaving torch as it was before any set_default_device.  On
    torch 2.5.1 to 2.9.1 that reset leaves a None context behind, on which torch.get_default_device()
    raises "AttributeError: 'NoneType' object has no attribute 'device'" (2.10 does not): the
    package reads it through `devices.default_device`, but transformers 5 reads it itself when it
    builds any model (`init_weights`), so every test after such a reset that built a tiny model
    failed there (seen on 2.7.1 and 2.8.0 with transformers 5.25).  The None context is removed."""
    torch.set_default_device(None)
    context = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)
    if context is not None and getattr(context, "device_context", False) is None:
        del context.device_context


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value into Python (int(t), bool(t), t.item(): a device sync on
    CUDA) made while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def count_finiteness_checks(monkeypatch, *modules) -> tuple[list, list]:
    """From here on, in each of `modules` that has them and in `_checks` (whose first_non_finite
    checks every layer's factors, shift or weight): the shape of each tensor `all_finite` checks
    alone, and the host reads (`HostReads`) of each `all_finite_many` call; returns those two lists,
    (per_tensor, reads), which fill as the code under test runs."""
    from dcedit_kernels import _checks
    from dcedit_kernels._checks import all_finite, all_finite_many

    per_tensor, reads = [], []

    def counted(t):
        per_tensor.append(t.shape)
        return all_finite(t)

    def read_once(tensors):
        with HostReads() as host:
            answer = all_finite_many(tensors)
        reads.append(host.count)
        return answer

    for module in (_checks, *modules):
        for name, counter in (("all_finite", counted), ("all_finite_many", read_once)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counter)
    return per_tensor, reads


def ragged_offsets(counts, device="cpu"):
    c = torch.tensor([0] + list(counts), dtype=torch.int64)
    return c.cumsum(0).to(torch.int32).to(device)


def random_counts(G, gen, max_count=7, empty_share=0.3):
    """Random group sizes with some empty groups (first/last included at random)."""
    counts = torch.randint(0, max_count + 1, (G,), generator=gen)
    empty = torch.rand(G, generator=gen) < empty_share
    counts[empty] = 0
    return counts.tolist()


def randn(shape, gen, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def fp32_logits(arch):
    """True where transformers hands a float64 `arch` model's logits back in fp32: before 4.46
    Llama's forward (and Qwen2's, Gemma 2's, Phi's...) ends in `logits.float()` whatever the
    model's dtype ("Starting from v4.46, the `logits` model output will have the same type as the
    model"), so its losses are fp32 roundings there and float64 comparisons of them cannot hold."""
    from dcedit_kernels.compat.transformers_versions import VERSION

    return arch == "llama" and VERSION < (4, 46)


def skip_fp32_logits(arch):
    import pytest

    if fp32_logits(arch):
        pytest.skip("transformers < 4.46 returns Llama's logits in fp32: no float64 comparison")


def skip_left_padded_grads(arch, side):
    """Skip a per-edit gradient check of a left-padded batch on transformers before 4.53 (Llama) /
    4.54 (GPT-2): its additive mask let a padding position, which sees no real key, attend to every
    position alike, so the scored last padding position passes gradient to every padding position,
    which the capture leaves out (compat.transformers_versions; test_capture's
    test_left_padded_batch_with_labels_on_every_token)."""
    import pytest

    from dcedit_kernels.compat.transformers_versions import VERSION

    if side == "left" and VERSION < {"llama": (4, 53), "gpt2": (4, 54)}.get(arch, (0,)):
        pytest.skip("transformers before 4.53 (Llama) / 4.54 (GPT-2): padding queries attend to every position")


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()  # no float() of a grad tensor warning
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn runs (the recorded graph's size)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def nan_outer_case(gen, dtype=torch.float32, device="cpu"):
    """grouped_outer inputs whose shifts hold NaN, and the output's expected NaN mask.

    Groups of 3, 0, 4 and 2 tokens, o=6, i=5.  A NaN in η of a group-2 and a group-3 token makes
    row 1 of S_2 and S_3 NaN; a NaN in μ of a group-0 token makes column 4 of S_0 NaN.  Every
    fusion's output is NaN exactly on row 1 and column 4; max takes the first NaN group there
    (group 0 on column 4, else group 2), so group 3 gets no gradient on row 1.
    """
    counts = [3, 0, 4, 2]
    eta = randn((9, 6), gen, dtype, device)
    mu = randn((9, 5), gen, dtype, device)
    eta[4, 1] = eta[7, 1] = float("nan")
    mu[1, 4] = float("nan")
    nan_mask = torch.zeros(6, 5, dtype=torch.bool, device=device)
    nan_mask[1, :] = True
    nan_mask[:, 4] = True
    return eta, mu, ragged_offsets(counts, device), nan_mask


# How many unit roundoffs of Σ|terms| a selection must clear (`outer_selections_clear`): the
# worst-case rounding of a sum of n terms is about n·u·Σ|terms|, and the random cases below sum at
# most 37 groups of at most 11 tokens.
CUT_SLACK = 64


def outer_selections_clear(eta, mu, offsets, fusion, signs=True, step=0.0):
    """True unless a choice that grouped_outer's `fusion` makes on these inputs lies within
    rounding of its cut: |S_g| against the runner-up for "max", P against −N for "sss"/"ssm"
    and, with `signs` (the backward's selection, or the kinks of the forward's P and N), each S_g
    entry against 0.  `step`: also within 4·step·max|input| of it, where a finite difference of
    that step in one input (gradcheck's eps) may cross the cut.

    The kernels add in fp32 (fp64 with a float64 input) where the oracle adds the same rounded
    values in float64, so on a near-tie they may take the other side, and both are right to
    rounding; but a forward then flips the entry's sign (max between S_a ≈ −S_b, or P ≈ −N), and
    a backward gives the entry's gradient to another group, far past any tolerance.  On random
    inputs that is rare (the callers give their measured rates), so tests draw such inputs again
    (`draw_clear_of_cuts`): exact ties have tests of their own (test_triton_kernels'
    test_grouped_outer_backward_ties, test_ops' tie tests).  A choice counts as clear when its
    deciding value exceeds CUT_SLACK unit roundoffs of the sum of the absolute products that form
    it, a bound on the rounding whatever the summation order."""
    if fusion not in ("max", "sss", "ssm"):
        return True
    acc = torch.float64 if torch.float64 in (eta.dtype, mu.dtype) else torch.float32
    slack = CUT_SLACK * torch.finfo(acc).eps / 2
    e, m = eta.detach().double().cpu(), mu.detach().double().cpu()
    # One input entry moved by `step` moves an S_g entry by at most step·max|input|.
    atol = 4 * step * max(float(e.abs().max()), float(m.abs().max())) if e.numel() and m.numel() else 0.0
    bounds = offsets.tolist()
    groups = list(zip(bounds[:-1], bounds[1:]))
    if e.shape[0] == 0:
        return True
    # Empty groups too (S_g = 0): they take part in max, whose first group wins a tie, and an S
    # entry of the only other group that fp32 rounds to 0 gave its gradient to an empty group 0.
    S = torch.stack([e[a:b].T @ m[a:b] for a, b in groups])
    A = torch.stack([e[a:b].abs().T @ m[a:b].abs() for a, b in groups])  # Σ|η_t μ_t| per entry
    if fusion == "max":
        if len(groups) < 2:
            return True
        top2 = S.abs().topk(2, dim=0)
        return bool((top2.values[0] - top2.values[1] > slack * A.gather(0, top2.indices).sum(0) + atol).all())
    P, N = S.clamp(min=0).sum(0), S.clamp(max=0).sum(0)
    total = A.sum(0)
    clear = ((P + N).abs() > slack * total + atol) | ((total == 0) & (atol == 0))  # all terms 0: no rounding
    if signs:  # an empty group has no gradient to misplace
        held = torch.tensor([b > a for a, b in groups])
        clear &= ((S[held].abs() > slack * A[held] + atol) | ((A[held] == 0) & (atol == 0))).all(0)
    return bool(clear.all())


def redraw_until(draw, clear, what: str, tries=100):
    """The first `draw()` that `clear(case)` accepts, of at most `tries` (the tests' near-kink and
    near-tie redraws); AssertionError when none is, which means `clear` rejects far more than the
    rare draws it is for."""
    for _ in range(tries):
        case = draw()
        if clear(case):
            return case
    raise AssertionError(f"no draw of {tries} was clear of {what}")


def draw_clear_of_cuts(draw, fusion, signs=True, step=0.0, tries=100):
    """draw() -> (eta, mu, offsets, ...): the first draw whose selections are clear of their cuts
    (`outer_selections_clear`) for `fusion`, or for each fusion of a tuple."""
    fusions = (fusion,) if isinstance(fusion, str) else fusion
    return redraw_until(draw, lambda case: all(outer_selections_clear(*case[:3], f, signs, step) for f in fusions),
                        f"{fusion}'s cuts: outer_selections_clear is wrong", tries)


def gate_logits_clear(feats, w_gate, w_noise, noise, step):
    """True unless two of a row's noisy logits (noisy_topk_gate's f W_g + ε ⊙ (softplus(f W_noise)
    + 0.01)) lie within 4·step·max|f|·max(1, |ε|) of each other: a finite difference of `step` in
    one entry of W_g moves one logit by at most step·max|f|, one of W_noise by step·max|f|·|ε|
    (softplus' slope is below 1), so gradcheck's central differences (eps `step`) may swap the
    pair.  Every adjacent pair of the sorted row counts: the kept set (k-th against (k+1)-th), and
    the smooth load's thresholds (the k-th and (k+1)-th values) have kinks wherever their rank
    changes hands.  Of 100,000 draws of test_noisy_topk_gate_opcheck_and_gradcheck's inputs, 3
    failed its gradcheck (seeds 1673, 4043, 5314: ratios 0.44, 0.09, 0.80 of the move above), all
    among the 9 this rejects, and 1,500 draws it passes all passed.  Exact ties are no case here:
    float64 normal draws, and a tie has no gradient to check."""
    f, e = feats.detach().double(), noise.detach().double()
    logits = f @ w_gate.detach().double() + e * (torch.nn.functional.softplus(f @ w_noise.detach().double()) + 1e-2)
    if logits.shape[1] < 2 or logits.shape[0] == 0:
        return True
    s = logits.sort(dim=1).values
    move = 4 * step * f.abs().amax(1) * e.abs().amax(1).clamp(min=1)
    return bool(((s[:, 1:] - s[:, :-1]).amin(1) > move).all())


def train_mode_llama(seed: int, checkpointing: bool):
    """(model, tokenizer): the tiny float64 Llama in train mode (dropout 0), with Hugging Face
    activation checkpointing on or off (transformers 5.2x renamed gradient_checkpointing_enable
    to activation_checkpointing_enable)."""
    from dcedit_kernels.models import tiny_model

    model, tok = tiny_model("llama", seed=seed, dtype=torch.float64)
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model.train(), tok


def assert_checkpointing(model, on: bool) -> None:
    """Every checkpointable block of `model` has its flag `on` (an edit pass left it as it was)."""
    blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert blocks and all(m.gradient_checkpointing is on for m in blocks)


# The public op cases' sizes: G groups, d_out × d_in weights, rank.
OP_CASE_DIMS = {"G": 4, "d_out": 6, "d_in": 5, "rank": 3}


def ragged_leaves(gen, avoid=(), device="cpu", G=OP_CASE_DIMS["G"]):
    """(T, offsets, leaf): G random ragged groups (group 1 always empty) of T rows, T not in
    `avoid`; leaf(*shape) draws a fresh random tensor that requires grad."""
    counts = random_counts(G, gen)
    counts[1] = 0
    while sum(counts) in avoid:
        counts[0] += 1
    T = sum(counts)
    offsets = ragged_offsets(counts, device)

    def leaf(*shape):
        return randn(shape, gen, device=device).requires_grad_()

    return T, offsets, leaf


def public_op_cases(gen, device="cpu"):
    """name -> (fn, its tensor inputs): every public op but apply_shift_ (in place) on small random
    inputs with ragged groups, one empty."""
    G, D_OUT, D_IN, R = (OP_CASE_DIMS[k] for k in ("G", "d_out", "d_in", "rank"))
    T, offsets, leaf = ragged_leaves(gen, device=device)
    eta, mu = leaf(T, D_OUT), leaf(T, D_IN)
    d = D_OUT + D_IN
    fisher = torch.rand(D_OUT, D_IN, generator=gen).to(device)
    row_group = torch.randint(-1, G, (9,), generator=gen).to(device)
    return {
        "grouped_outer": (lambda e, m: ops.grouped_outer(e, m, offsets, "sss", 0.5), (eta, mu)),
        "segmented_fisher": (lambda e, m: ops.segmented_fisher(e, m, offsets), (eta.detach(), mu.detach())),
        "grouped_lowrank": (lambda h, u, v, b: ops.grouped_lowrank(h, offsets, u, v, b),
                            (leaf(T, d), leaf(G, d, R), leaf(G, R, d), leaf(G, d))),
        "fisher_mask": (lambda delta: ops.fisher_mask(delta, fisher, keep=0.4)[0], (leaf(D_OUT, D_IN),)),
        "lowrank_delta_linear": (
            lambda x, m, e: ops.lowrank_delta_linear(x, fisher, None, row_group, m, e, offsets, 0.3),
            (leaf(9, D_IN), mu, eta)),
        "noisy_topk_gate": (lambda f, wg, wn: ops.noisy_topk_gate(f, wg, wn, k=2, training=False)[0],
                            (leaf(5, 7), leaf(7, G), leaf(7, G))),
        "sort_by_group": (lambda: ops.sort_by_group(row_group.clamp(min=0), G)[0], ()),
    }


@contextlib.contextmanager
def deterministic_on(device):
    """On CUDA, torch's deterministic algorithms for the block (warn_only: an op without one warns).
    The Triton backwards' per-group sums (grouped_lowrank's bias/scale/shift gradients,
    lowrank_delta_linear's alpha gradient) are `index_add_`, which adds with float atomics on CUDA
    once it has more than 16 rows, so two runs can differ in the last bits; under this mode
    `index_add_` adds in a fixed order.  Tests that compare two runs bit for bit (compiled against
    eager, autocast against none) run both inside it.  CPU: nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def output_and_grads(fn, args):
    """fn's output and the gradients of a loss on it (None where an input does not reach it)."""
    out = fn(*args)
    wrt = [a for a in args if a.requires_grad]
    if not out.requires_grad:
        return out, []
    return out, torch.autograd.grad(out.double().pow(2).sum(), wrt, allow_unused=True)


# ---------------------------------------------------------------- small editors
EDITOR_KINDS = ("mend", "raeditor", "moeditor", "proeditor")


def small_editor(method, seed=0, **kwargs):
    """An editor of `method` on the op cases' widths (in d_in, out d_out, rank 3; RaEditor and
    MoEditor with 3 editors, MoEditor's gate on d_out-wide edit features)."""
    from dcedit_kernels.editors import MEND, MoEditor, ProEditor, RaEditor

    d_in, d_out = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]
    preset = {"mend": MEND, "raeditor": RaEditor, "moeditor": MoEditor, "proeditor": ProEditor}[method]
    own = {"raeditor": dict(n_editors=3), "moeditor": dict(n_editors=3, feat_dim=d_out)}.get(method, {})
    return preset(d_in, d_out, rank=OP_CASE_DIMS["rank"], seed=seed, **own, **kwargs)


def editor_inputs(gen, dtype=torch.float32, device="cpu"):
    """(mu, eta, edit_offsets, edit features) for `small_editor`: 4 ragged edits, edit 2 empty,
    edit 0 of at least 4 tokens, the first of them all-zero (a token the editors skip)."""
    d_in, d_out = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]
    counts = random_counts(4, gen)
    counts[2] = 0
    counts[0] = max(counts[0], 4)
    T = sum(counts)
    mu, eta = randn((T, d_in), gen, dtype, device), randn((T, d_out), gen, dtype, device)
    mu[0] = 0
    return mu, eta, ragged_offsets(counts, device), randn((4, d_out), gen, dtype, device)


def randomize_editor(editor, gen, scale=0.05):
    """A non-trivial editor (the identity init has u = 0): random u, biases, mode scales, gate and
    ψ output weights."""
    with torch.no_grad():
        for layer in editor.layers:
            layer.u.copy_(torch.randn(layer.u.shape, generator=gen) * scale)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * scale)
            layer.mode_scale.add_(torch.randn(layer.mode_scale.shape, generator=gen) * scale)
        if getattr(editor, "w_gate", None) is not None:
            editor.w_gate.copy_(torch.randn(editor.w_gate.shape, generator=gen))
        if editor.psi is not None:
            editor.psi.fc2.weight.copy_(torch.randn(editor.psi.fc2.weight.shape, generator=gen) * scale)
    return editor


def readme_join(prompt: str, target: str) -> str:
    """The README's join of a prompt and its target, written out independently of the package's
    tokenize: a space between them unless the prompt ends in whitespace or the target starts with it."""
    return prompt + target if prompt[-1:].isspace() or target[:1].isspace() else prompt + " " + target


def seed_from(gen) -> int:
    """A model seed drawn from the test's generator."""
    return int(torch.randint(0, 1000, (1,), generator=gen))


def scripted_scores(monkeypatch, scores, states=None):
    """Replace the training loop's evaluate_edits by one that gives the ES values of `scores` in
    turn (es_all 0, nll 1; an (es, nll) pair sets both): each validation's outcome chosen by the
    test.  `states`: a list each validation appends the editors' state tensors to."""
    import dcedit_kernels.train as train_module

    scores = iter(scores)

    def scripted_evaluate(editor, val_requests, batch_size=4):
        if states is not None:
            states.append({k: v.clone() for k, v in editor.state_tensors().items()})
        es, nll = (lambda s: s if isinstance(s, tuple) else (s, 1.0))(next(scores))
        return dict(es=es, es_all=0.0, nll=nll)

    monkeypatch.setattr(train_module, "evaluate_edits", scripted_evaluate)


def tiny_mend(arch, gen, **kwargs):
    """A MEND ModelEditor (rank 4, seed 1) on the tiny model of `arch`, a seed drawn from `gen`."""
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.models import tiny_model
    from test_model_editor import LAYERS

    model, tok = tiny_model(arch, seed=seed_from(gen))
    return ModelEditor(model, tok, LAYERS[arch], method="mend", rank=4, seed=1, **kwargs)


@contextlib.contextmanager
def input_shapes(module):
    """Inside the block, the list of the shapes of the first input of each call of `module` (an
    embedding's ids, the LM head's hidden states).  Recorded by wrapping the module's forward, not by
    a forward hook: `logits_at` gathers nothing for a head with forward hooks (they get its output)."""
    seen = []
    forward, own = module.forward, module.__dict__.get("forward")  # own: an instance's forward (accelerate's)

    def recording(*args, **kwargs):
        seen.append(tuple(args[0].shape))
        return forward(*args, **kwargs)

    module.forward = recording
    try:
        yield seen
    finally:
        if own is None:
            del module.forward  # the class's forward again
        else:
            module.forward = own


# ---------------------------------------------------------------- per-edit gradients, by plain autograd
def hand_edit_batch(model, seq2seq, gen, prompt_lens, target_lens, side="right"):
    """An edit batch built without the package's tokenizer: row e holds random token ids, a prompt of
    `prompt_lens[e]` tokens and a target of `target_lens[e]`, padded on `side`.  A causal row is
    prompt + target (labels: the target's ids, -100 elsewhere); a seq2seq row has the prompt as its
    encoder input and the target as its labels (right-padded with -100, `decoder_attention_mask` 1
    on them), the encoder input padded on `side`."""
    V, pad, B = model.config.vocab_size, model.config.pad_token_id, len(prompt_lens)
    pad = 0 if pad is None else pad
    lo = 3  # clear of the tiny vocabularies' special ids
    lengths = list(prompt_lens) if seq2seq else [p + t for p, t in zip(prompt_lens, target_lens)]
    width = max(lengths)
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    labels = torch.full((B, max(target_lens) if seq2seq else width), -100, dtype=torch.long)
    for b, (p, t, n) in enumerate(zip(prompt_lens, target_lens, lengths)):
        start = 0 if side == "right" else width - n
        ids[b, start:start + n] = torch.randint(lo, V, (n,), generator=gen)
        mask[b, start:start + n] = 1
        if seq2seq:
            labels[b, :t] = torch.randint(lo, V, (t,), generator=gen)
        else:
            labels[b, start + p:start + n] = ids[b, start + p:start + n]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if seq2seq:
        batch["decoder_attention_mask"] = (labels != -100).long()
    return batch


def per_edit_nll(logits, labels, causal, reduction):
    """(E,) each edit's share of the edit loss, in float64: "edit" = the mean NLL of the edit's target
    tokens, "token" = their summed NLL over the whole batch's number of target tokens (summed over
    edits: the batch-mean NLL).  A causal LM predicts label t from position t-1."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    scored = labels != -100
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = torch.where(scored, nll, torch.zeros_like(nll)).sum(1)
    return sums / (scored.sum() if reduction == "token" else scored.sum(1))


def per_edit_weight_grads(model, batch, layers, seq2seq, reduction, untie_head=False):
    """{layer: (E, out, in)}: the gradient of each edit's own loss (`per_edit_nll`) with respect to each
    layer's weight, by `torch.autograd.grad` on a deep copy of the model (GPT-2's Conv1D gradient
    transposed to out x in).  `untie_head`: the copy's LM head gets a weight of its own (same values),
    so its gradient is the head's share only, not the tied input embedding's.  A seq2seq decoder reads
    the labels shifted right (decoder start token first, padding for -100), as the model would."""
    import copy

    m = copy.deepcopy(model).eval()
    if untie_head:
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    m.requires_grad_(False)
    modules = dict(m.named_modules())
    weights = [modules[n].weight.requires_grad_(True) for n in layers]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if seq2seq:
        labels = batch["labels"]
        dec = torch.cat([torch.full_like(labels[:, :1], m.config.decoder_start_token_id), labels[:, :-1]], dim=1)
        inputs.update(decoder_input_ids=dec.masked_fill(dec == -100, m.config.pad_token_id),
                      decoder_attention_mask=batch["decoder_attention_mask"])
    losses = per_edit_nll(m(**inputs).logits, batch["labels"], not seq2seq, reduction)
    grads = {n: [] for n in layers}
    for e in range(losses.shape[0]):
        for n, w, g in zip(layers, weights, torch.autograd.grad(losses[e], weights, retain_graph=True, allow_unused=True)):
            g = torch.zeros_like(w) if g is None else g
            grads[n].append(g.t() if type(modules[n]).__name__ == "Conv1D" else g)
    return {n: torch.stack(g).double() for n, g in grads.items()}


def factors_per_edit(f):
    """(E, out, in): Σ_{t in edit e} η_t μ_tᵀ of captured factors, one rank-one term at a time."""
    bounds = f.edit_offsets.tolist()
    out = torch.zeros(len(bounds) - 1, f.eta.shape[1], f.mu.shape[1], dtype=torch.float64)
    for e in range(len(bounds) - 1):
        for t in range(bounds[e], bounds[e + 1]):
            out[e] += torch.outer(f.eta[t].double(), f.mu[t].double())
    return out


def assert_per_edit_grads(factors, expected, tol):
    """Every edit's Σ η μᵀ within `tol` of its autograd gradient, relative, plus 1e-12 of the edit's
    largest gradient over the layers: a gradient that is exactly zero in exact arithmetic (a
    decoder key projection under a one-key softmax) is ~1e-16 rounding noise on both sides."""
    floor = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).amax(0) * 1e-12
    for name, want in expected.items():
        got = factors_per_edit(factors[name])
        assert got.shape == want.shape, (name, got.shape, want.shape)
        for e in range(want.shape[0]):
            err, size = float((got[e] - want[e]).norm()), float(want[e].norm())
            assert err <= tol * size + float(floor[e]), f"{name} edit {e}: |diff| {err:.3e}, |grad| {size:.3e}"


def model_state(model) -> dict:
    """Everything of `model` an edit or a capture could leave behind, written out independently of the
    package: each parameter's and buffer's bytes (non-persistent buffers, as Llama's rotary inv_freq, and tied
    names included), dtype, shape, strides, storage address and object, requires_grad and the
    bytes of its .grad; each module's train flag and hooks; the config."""
    def tensor(t):
        t = t.detach()
        return (t.dtype, tuple(t.shape), t.stride(), t.data_ptr(), t.contiguous().view(-1).view(torch.uint8).clone())

    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        state["param " + name] = (id(p), p.requires_grad, *tensor(p), *(tensor(p.grad) if p.grad is not None else [None] * 5))
    for name, b in model.named_buffers(remove_duplicate=False):
        state["buffer " + name] = (id(b), *tensor(b))
    for name, m in model.named_modules(remove_duplicate=False):
        state["module " + name] = (m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                                   len(m._backward_hooks), "forward" in vars(m))
    state["config"] = (model.config.to_dict(),)
    return state


def assert_same_state(before: dict, model, where: str = "") -> None:
    after = model_state(model)
    assert before.keys() == after.keys(), where
    for key, want in before.items():
        for a, b in zip(want, after[key], strict=True):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
            assert same, f"{where}: {key} differs: {'bytes' if isinstance(a, torch.Tensor) else a} -> " \
                         f"{'bytes' if isinstance(b, torch.Tensor) else b}"


def messy_caller_state(model, gen):
    """Some parameters requiring grad and some not, some holding a .grad, the model in training mode
    with one submodule in eval mode (the tiny models have no dropout, so the values do not change)."""
    for i, (n, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i % 3 != 1)
        if i % 4 == 0:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    model.train()
    next(m for m in model.modules() if m is not model and list(m.children())).eval()


@contextlib.contextmanager
def one_intra_op_thread():
    """torch at one intra-op thread inside the block, its own count back after it: two OpenMP threads
    on 2 shared cores spin-wait under load (test_model_editor's `one_thread` has the measurements), and
    one thread is what the CLI's --threads default gives on such a machine (bit-equal GEMMs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# How a caller compiles a model (backend "eager"): torch.compile(model), under fullgraph too, or
# model.compile(); `compile_as` also takes "compiled forward" and "compiled head" (the `head` attribute).
COMPILE_KINDS = ["torch.compile", "fullgraph", "model.compile()"]


def compile_as(model, kind):
    """What a caller runs: `model` compiled the way `kind` names (the model itself where it is
    compiled in place)."""
    if kind == "model.compile()":
        model.compile(backend="eager")
        return model
    if kind == "compiled forward":
        model.forward = torch.compile(model.forward, backend="eager")
        return model
    if kind == "compiled head":
        model.head = torch.compile(model.head, backend="eager")
        return model
    return torch.compile(model, backend="eager", fullgraph=kind == "fullgraph")


def options_without_their_defaults(parser) -> list[str]:
    """The options of an argparse parser (and its subcommands') whose --help says nothing, or does not
    say the default a run takes (a default other than None/False that its help neither names nor
    calls "default")."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += options_without_their_defaults(sub)
        elif action.dest not in ("help", "version"):
            text, default = action.help or "", action.default
            unsaid = default is not None and default is not False and str(default) not in text and "default" not in text
            if not text or unsaid:  # (0 == False: `in (None, False)` passed a default of 0)
                found.append(f"{parser.prog} {'/'.join(action.option_strings)}")
    return found
