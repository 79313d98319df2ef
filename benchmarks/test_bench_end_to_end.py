"""End to end: one MoEditor edit (editors → fused, masked apply) on three layers with 125 edits,
fused ops against the same code on the eager references (`ops.reference_mode()`), and the
memory of one MoEditor (N_g = 8) training step against MEND's.

Captured factors are synthetic (random μ, η with CounterFact-like token counts) so the case
measures the editing path, not the language model's forward pass.  The last two cases measure
that forward and backward itself on a random Llama-shaped model: the gradient capture of many
edits, and the FT+KL baseline over many edits.
"""

import pytest
import torch

from conftest import ON_GPU
from dcedit_kernels import MEND, MoEditor, ops
from measure import peak_extra_bytes, peak_in_subprocess
from report import compare

IN, OUT, RANK = (1600, 6400, 1920) if ON_GPU else (256, 1024, 64)
E, PER, N_LAYERS, FEAT = 125, 24, 3, (1600 if ON_GPU else 256)
DT = torch.bfloat16 if ON_GPU else torch.float32


def _factors(gen, device):
    counts = torch.randint(PER // 2, PER * 3 // 2 + 1, (E,), generator=gen)
    T = int(counts.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(device)
    mu = torch.randn(T, IN, generator=gen).to(DT).to(device)
    eta = torch.randn(T, OUT, generator=gen).to(DT).to(device) * 1e-3
    return mu, eta, offsets


def _moeditor(device, **kw):
    torch.manual_seed(0)
    ed = MoEditor(IN, OUT, n_editors=8, rank=RANK, n_modes=N_LAYERS, feat_dim=FEAT, fisher_keep=0.7, **kw).to(device)
    with torch.no_grad():
        for layer in ed.layers:
            layer.u.normal_(0, 0.01)  # a trained editor is not the identity
    return ed


@pytest.fixture(params=["highest", "high"] if ON_GPU else ["highest"])
def precision(request):
    """torch's float32 matmul precision for the whole case, fused and eager alike.  The editor is
    fp32 (its default), so its MLP (most of the FLOPs) runs exact fp32 under "highest" (Triton's
    IEEE dot against cuBLAS's SGEMM) and one TF32 pass under "high" on both sides."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(previous)


def test_moeditor_edit_three_layers(benchmark, device, ceilings, precision):
    gen = torch.Generator().manual_seed(0)
    editor = _moeditor(device).eval()
    weights = [torch.randn(OUT, IN, generator=gen).to(DT).to(device) for _ in range(N_LAYERS)]
    facts = [_factors(gen, device) for _ in range(N_LAYERS)]
    feats = torch.randn(E, FEAT, generator=gen).to(device)

    @torch.no_grad()
    def edit():
        saved = []
        for mode, (w, (mu, eta, off)) in enumerate(zip(weights, facts)):
            saved.append(editor(mu, eta, off, mode=mode, edit_feats=feats).apply_(w))
        for w, prev in zip(weights, saved):  # undo, so every round edits the same weights
            ops.undo_shift_(w, prev)
        return saved

    def eager():
        with ops.reference_mode():
            return edit()

    @torch.no_grad()
    def shifts():  # what each edit adds (alpha aside): the sides' return values are the undo copies
        return [editor(mu, eta, off, mode=mode, edit_feats=feats).dense() for mode, (mu, eta, off) in enumerate(facts)]

    def eager_shifts():
        with ops.reference_mode():
            return shifts()

    T = sum(f[0].shape[0] for f in facts)
    # Every edited weight reads the whole editor MLP (all 8 editors get edits: 1.97 GB in fp32 at
    # the GPU shape), besides four o×i fp32 passes.
    mlp_bytes = sum(p.numel() * p.element_size() for p in editor.layers.parameters())
    compare(benchmark, device, ceilings, edit, eager,
            flops=N_LAYERS * (2.0 * (T // N_LAYERS) * (IN + OUT) * RANK * 4 + 2.0 * (T // N_LAYERS) * IN * OUT * 2),
            bytes_moved=N_LAYERS * (4.0 * IN * OUT * 4 + mlp_bytes), target_speedup=5.0, rounds=5 if ON_GPU else 2,
            check=(shifts, eager_shifts), agree_tol=5e-2 if precision == "high" else 1e-2)


def _train_step_peak(editor, device, gen, grads_held=False):
    """Peak extra bytes of one loss + backward.  grads_held: the parameter gradients stay
    allocated (zeroed) between steps, so the peak leaves them out; else they are freed
    (set_to_none, PyTorch's default) and each step allocates them again."""
    mu, eta, offsets = _factors(gen, device)
    feats = torch.randn(E, FEAT, generator=gen).to(device)
    x = torch.randn(4 * E, IN, generator=gen).to(DT).to(device)
    weight = torch.randn(OUT, IN, generator=gen).to(DT).to(device)
    rows = torch.arange(4 * E, device=device) % E

    def step():
        edit = editor(mu, eta, offsets, mode=0, edit_feats=feats if editor.routing == "gate" else None)
        row_group = edit.edit_group[rows]
        y = ops.lowrank_delta_linear(x, weight, None, row_group, edit.mu_t, edit.eta_t, edit.offsets, edit.group_alpha())
        (y.float().square().mean() + edit.aux_loss).backward()
        editor.zero_grad(set_to_none=not grads_held)

    step()  # warm-up allocations (norm statistics, autograd buffers; the held gradients)
    return peak_extra_bytes(step, device)


def train_step_peak(kind: str, device: str, grads_held: bool = False) -> float:
    """Peak extra bytes of one training step of `kind` ("mend" or "moeditor8")."""
    gen = torch.Generator().manual_seed(1)
    if kind == "mend":
        editor = MEND(IN, OUT, rank=RANK).to(device).train()
    else:
        editor = MoEditor(IN, OUT, n_editors=8, rank=RANK, feat_dim=FEAT).to(device).train()
    return _train_step_peak(editor, device, gen, grads_held)


def _peaks(device, grads_held):
    if ON_GPU:
        return tuple(train_step_peak(kind, device, grads_held) for kind in ("mend", "moeditor8"))
    # RSS high-water marks are only honest in a fresh process
    return tuple(peak_in_subprocess("test_bench_end_to_end", "train_step_peak", kind, device, grads_held)
                 for kind in ("mend", "moeditor8"))


def test_training_memory_moeditor_vs_mend(benchmark, device, ceilings):
    """One training step's peak, MoEditor (N_g = 8) over MEND, twice: with the parameter
    gradients allocated by the step (PyTorch's default; MoEditor has 8× MEND's parameters, so
    8× its gradients) and with the .grad buffers held between steps (the step then allocates
    each new gradient only until autograd adds it in, beside the activations and the ops'
    workspace)."""
    mend_peak, moe_peak = _peaks(device, grads_held=False)
    mend_held, moe_held = _peaks(device, grads_held=True)
    param_bytes = {k: sum(p.numel() * 4 for p in m.parameters()) for k, m in (
        ("mend", MEND(IN, OUT, rank=RANK)), ("moeditor8", MoEditor(IN, OUT, n_editors=8, rank=RANK, feat_dim=FEAT)))}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({
        "device": ceilings["device"],
        "mend_step_peak_MiB": mend_peak / 2**20,
        "moeditor8_step_peak_MiB": moe_peak / 2**20,
        "ratio": moe_peak / mend_peak,
        "mend_step_peak_grads_held_MiB": mend_held / 2**20,
        "moeditor8_step_peak_grads_held_MiB": moe_held / 2**20,
        "ratio_grads_held": moe_held / mend_held,
        "mend_params_MiB": param_bytes["mend"] / 2**20,
        "moeditor8_params_MiB": param_bytes["moeditor8"] / 2**20,
        "target_ratio": 1.2,
        "target_met": bool(ON_GPU and moe_peak / mend_peak <= 1.2),
    })


# The capture of many edits: a Llama-shaped model with a real vocabulary, random weights.  The
# fused side is ModelEditor.capture as shipped (capture_batch_size rows per pass, the LM head on
# the target-predicting positions only); the eager side is one pass over the whole batch with
# every position's logits, as MEND's and EasyEdit's code run it.
CAP_E, CAP_LEN, CAP_TARGET = (1000, 24, 3) if ON_GPU else (192, 20, 3)
CAP_HIDDEN, CAP_LAYERS, CAP_VOCAB = (1600, 4, 50257) if ON_GPU else (256, 4, 32000)
# How far the model cases' fused and eager results may differ (‖fused − eager‖ / ‖eager‖): the
# sides run passes of different widths, which round differently, the more so on the bf16 model.
MODEL_TOL = 5e-2 if ON_GPU else 1e-2


def _random_llama(device):
    """(model, tokenizer, its last three down_proj layers): the random Llama both model cases use."""
    import transformers

    from dcedit_kernels.models import tiny_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=CAP_VOCAB, hidden_size=CAP_HIDDEN, intermediate_size=4 * CAP_HIDDEN,
        num_hidden_layers=CAP_LAYERS, num_attention_heads=CAP_HIDDEN // 64, num_key_value_heads=CAP_HIDDEN // 64,
        max_position_embeddings=128, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(DT).to(device).eval()
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(CAP_LAYERS - 3, CAP_LAYERS)]
    return model, tiny_tokenizer("llama"), layers


def _capture_case(device):
    from dcedit_kernels import ModelEditor

    me = ModelEditor(*_random_llama(device), method="mend", rank=8)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(CAP_LEN - 6, CAP_LEN + 1, (CAP_E,), generator=gen)
    ids = torch.randint(3, CAP_VOCAB, (CAP_E, CAP_LEN), generator=gen)
    keep = torch.arange(CAP_LEN).unsqueeze(0) < lengths.unsqueeze(1)
    target = keep & (torch.arange(CAP_LEN).unsqueeze(0) >= (lengths - CAP_TARGET).unsqueeze(1))
    batch = {"input_ids": ids.masked_fill(~keep, 0).to(device), "attention_mask": keep.long().to(device),
             "labels": ids.masked_fill(~target, -100).to(device)}
    return me, batch


def capture_peak(side: str, device: str) -> float:
    """Peak extra bytes of one capture, "fused" or "eager" (run in a fresh process on the CPU)."""
    from dcedit_kernels.scored_logits import full_logits

    me, batch = _capture_case(device)
    if side == "fused":
        return peak_extra_bytes(lambda: me.capture(batch), device)
    me.capture_batch_size = None
    with full_logits():
        return peak_extra_bytes(lambda: me.capture(batch), device)


def test_capture_many_edits(benchmark, device, ceilings):
    from dcedit_kernels.scored_logits import full_logits

    me, batch = _capture_case(device)

    def fused():
        return me.capture(batch)

    def eager():
        size, me.capture_batch_size = me.capture_batch_size, None
        try:
            with full_logits():
                return me.capture(batch)
        finally:
            me.capture_batch_size = size

    compare(benchmark, device, ceilings, fused, eager, rounds=3 if ON_GPU else 1, agree_tol=MODEL_TOL)
    if not ON_GPU:  # RSS high-water marks are only honest in a fresh process
        fused_peak, eager_peak = (peak_in_subprocess("test_bench_end_to_end", "capture_peak", side, device)
                                  for side in ("fused", "eager"))
        benchmark.extra_info.update(fused_peak_MiB=fused_peak / 2**20, eager_peak_MiB=eager_peak / 2**20)
    benchmark.extra_info.update(edits=CAP_E, vocab=CAP_VOCAB, hidden=CAP_HIDDEN,
                                eager_full_logits_MiB=CAP_E * CAP_LEN * CAP_VOCAB * DT.itemsize / 2**20)


# FT+KL over many edits on the same model.  The fused side is the shipped path: capture_batch_size
# rows per pass, logits at the scored positions only, and every locality chunk's KL reference kept
# as the LM head's input rows (n×H, `head_kl_function`: the KL a block of rows at a time, since
# 0.5.34; before, each chunk's reference was recomputed from the saved weights at every step); the
# eager side is one pass over all rows with every position's logits and the n×V fp32 reference
# kept, as the baselines of MEND's and EasyEdit's code run.
FT_E, FT_CHUNK = (256, 32) if ON_GPU else (32, 8)


def _ft_kl_case(device):
    from dcedit_kernels import EditRequest, ModelEditor

    ft = ModelEditor(*_random_llama(device), method="ft_kl", ft_steps=2, ft_stop_loss=None,
                     capture_batch_size=FT_CHUNK)
    requests = [EditRequest(f"the item number {i} sits in room", f"{(7 * i) % 97} west",
                            locality=f"a note on shelf {i} says the door is open") for i in range(FT_E)]
    return ft, requests


def _ft_kl_sides(ft, requests):
    from dcedit_kernels.scored_logits import full_logits

    def fused():
        ft.apply(requests).undo()

    def eager():
        size, ft.capture_batch_size = ft.capture_batch_size, None
        try:
            with full_logits():
                ft.apply(requests).undo()
        finally:
            ft.capture_batch_size = size

    return fused, eager


def ft_kl_peak(side: str, device: str) -> float:
    """Peak extra bytes of one FT+KL edit and its undo, "fused" or "eager" (fresh process, CPU)."""
    fused, eager = _ft_kl_sides(*_ft_kl_case(device))
    return peak_extra_bytes(fused if side == "fused" else eager, device)


def test_ft_kl_many_edits(benchmark, device, ceilings):
    ft, requests = _ft_kl_case(device)
    fused, eager = _ft_kl_sides(ft, requests)
    # Nothing compared: both sides undo their edit and return nothing.
    compare(benchmark, device, ceilings, fused, eager, rounds=2 if ON_GPU else 1, check=False)
    if not ON_GPU:  # RSS high-water marks are only honest in a fresh process
        fused_peak, eager_peak = (peak_in_subprocess("test_bench_end_to_end", "ft_kl_peak", side, device)
                                  for side in ("fused", "eager"))
        benchmark.extra_info.update(fused_peak_MiB=fused_peak / 2**20, eager_peak_MiB=eager_peak / 2**20)
    loc = ft._locality_batch(ft._locality_texts(requests))
    kl_tokens = int(loc["attention_mask"].sum())
    benchmark.extra_info.update(edits=FT_E, kl_tokens=kl_tokens, chunk=FT_CHUNK,
                                eager_reference_MiB=kl_tokens * CAP_VOCAB * 4 / 2**20)


# One editor-training pass (the edited forward and the KL reference, and the backward into the
# editor outputs) of 25 edits (the README's batch) on a random model of SmolLM2's shape, rows as
# about as long as CounterFact's in SmolLM2's tokens (most short, a few near 30; measured on
# 3 batches of 25 edits: 539-582 tokens in 1,150-1,600 padded slots; here 779 in 1,500):
# `length_buckets` (passes of rows of similar length; the default on CPU) against one pass padded
# to the longest row (the default on GPU, where no session has measured buckets yet:
# benchmarks/NOTES.md).  SmolLM2's shape, not the capture cases' model: on 4 layers and a 32k
# vocabulary the LM head and the KL over the vocabulary outweigh the padded blocks (measured on
# CPU: no gain there, 3.24 s against 3.16 s).
TR_E = 25


def _training_pass_case(device):
    import dataclasses

    import transformers

    from dcedit_kernels import EditRequest, ModelEditor
    from dcedit_kernels.models import tiny_tokenizer
    from dcedit_kernels.train import batch_edits

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(DT).to(device).eval()
    model.requires_grad_(False)  # frozen, as the trainer has it (capture.frozen_parameters)
    layers = [f"model.layers.{i}.mlp.down_proj" for i in (27, 28, 29)]
    me = ModelEditor(model, tiny_tokenizer("llama"), layers, method="moeditor", n_editors=4, rank=32)
    gen = torch.Generator().manual_seed(0)

    def text(lo, hi):  # the tokenizer is character-level: n letters are n tokens; most rows short
        n = lo + int((hi - lo + 1) * float(torch.rand((), generator=gen)) ** 2)
        return "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n,), generator=gen))

    requests = [EditRequest(text(4, 14), text(1, 3), rephrase=text(5, 24), locality=text(3, 24),
                            locality_target=text(1, 3)) for _ in range(TR_E)]
    edits = {name: dataclasses.replace(e, mu_t=e.mu_t.detach().requires_grad_(),
                                       eta_t=e.eta_t.detach().requires_grad_(), alpha=e.alpha.detach().requires_grad_())
             for name, e in batch_edits(me, requests).items()}
    return me, requests, edits


def _training_pass(benchmark, device, ceilings, fused: dict, eager: dict):
    from dcedit_kernels.train import TrainConfig, eval_rows, loss_from_edits

    me, requests, edits = _training_pass_case(device)
    leaves = [t for e in edits.values() for t in (e.mu_t, e.eta_t, e.alpha)]

    def side(settings):
        config = TrainConfig(**settings)
        return lambda: torch.autograd.grad(loss_from_edits(me, requests, edits, config)[0], leaves)

    compare(benchmark, device, ceilings, side(fused), side(eager), rounds=3 if ON_GPU else 1,
            agree_tol=MODEL_TOL)
    mask = eval_rows(me, requests, TrainConfig())["attention_mask"]
    benchmark.extra_info.update(edits=TR_E, rows=mask.shape[0], tokens=int(mask.sum()), padded_slots=mask.numel())


def test_training_pass_length_buckets(benchmark, device, ceilings):
    # Both sides run every block for every row (reuse_prefix=False), as this case did before 0.5.0.
    # No return value: pytest warns of a test that returns one (PytestReturnNotNoneWarning); the figures
    # are in benchmark.extra_info.
    _training_pass(benchmark, device, ceilings, dict(length_buckets=True, reuse_prefix=False),
                   dict(length_buckets=False, reuse_prefix=False))


# `reuse_prefix` (the edited pass runs the locality rows from block 27, on the KL reference pass's
# hidden states: block_prefix) against the edited pass through all 30 blocks, both with the
# device's default passes (buckets on CPU; on a GPU one pass, which reuse splits into the rephrase
# rows' and the locality rows').
def test_training_pass_prefix_reuse(benchmark, device, ceilings):
    _training_pass(benchmark, device, ceilings, dict(reuse_prefix=True), dict(reuse_prefix=False))
