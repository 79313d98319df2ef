"""The training KL's per-position terms with a hand-written backward that saves no (n, V) tensor
of its own.

KL_i = Σ_v p_v (log p_v − log softmax(z_i)_v), 0 where p_v = 0, with p = exp(base_logp_i).  Autograd
through that formula saved log_softmax(z), p, log p − log softmax(z) and the p > 0 mask for the
backward: 3.25 (n, V) fp32 tensors made for it (the mask is bool), held from the KL's forward to
its backward, besides the inputs, and their product and the `where` alive in the forward.  Measured
on SmolLM2 (fp32, MoEditor on layers 27-29's down_proj, 32 CounterFact edits: n = 319 KL positions,
V = 49152, 59.8 MiB each): 8 (n, V)-sized tensors alive at the forward's peak, 387 MiB of them.
Here the backward saves the inputs only (z, base_logp: no copy unless `base_logp` moved device)
and computes dKL_i/dz_i = softmax(z_i) Σ_v p_v − p itself; forward and backward run `ROWS_BUDGET`
elements at a time, so their temporaries are a few (rows, V) blocks, not (n, V) tensors.  The
forward's values are those of the formula (the same ops on each row: equal bit for bit on the CPU,
tests/test_train.py); the backward is double-differentiable no more (nothing here needs it); torch.func.grad
takes it (setup_context apart from forward).
"""

from __future__ import annotations

import torch

# Elements of one block of rows (8 MiB in fp32): the temporaries of a block are a few of these.
# Blocks were faster too: forward + backward of 319 x 49152 fp32 logits, CPU, 1 thread, 5 of 7 runs
# beside other jobs: 185-290 ms in blocks of 2^21, 399-409 ms in one block, 439-449 ms by autograd.
ROWS_BUDGET = 1 << 21


def row_blocks(n: int, V: int, budget: int | None = None, min_rows: int = 1):
    """Slices of n rows of V elements, `budget` elements a block (ROWS_BUDGET when None), at least
    `min_rows` rows a block."""
    if torch.compiler.is_compiling():
        # One block while torch.compile traces: the loop below reads n, the number of KL positions,
        # which made the trace specialise on it (a compile per n, a new n nearly every training step,
        # and eager again past dynamo's recompile limit): picked_kl under aot_eager compiled 6 times
        # for 6 sizes, now twice (static, then dynamic).  Each row's ops are the same, so the values are
        # the blocks' (aot_eager: bit for bit, tests/test_compile.py).  The cost is the one block's
        # (n, V) temporaries under a backend that runs the ops as they are (aot_eager); inductor fuses
        # the forward into one kernel (its output code for n = 31, V = 977: one (n, V) temporary
        # besides the (n, V) gradient it computes ahead and saves for the backward).
        return [slice(0, n)]
    step = max(1, min_rows, (ROWS_BUDGET if budget is None else budget) // max(V, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half/bf16/fp32 logits, float64 kept (the float64 tests compare exactly).  Here, not in
    `losses` (which imports this module and re-exports it), so that the KL and the losses share it."""
    return t if t.dtype == torch.float64 else t.float()


def kl_rows(base_logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(n,) KL_i of rows `base_logp` (n, V) and `z` (n, V) (same device), in the dtype the formula
    gives (z's upcast one promoted with base_logp's), no autograd graph: the formula, a block of
    rows at a time."""
    # upcast of no rows for its dtype: upcast(z) converted all of a 16-bit z, (n, V), to read it.
    out = torch.empty(z.shape[0], dtype=torch.promote_types(upcast(z[:0]).dtype, base_logp.dtype), device=z.device)
    for b in row_blocks(z.shape[0], z.shape[1]):
        out[b] = kl_of_block(base_logp[b], torch.log_softmax(upcast(z[b]), -1))
    return out


def kl_of_block(base: torch.Tensor, post: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL_i of a block of rows: `base` the base log-probabilities, `post` the edited ones; `p`:
    base.exp() when the caller has it."""
    p = base.exp() if p is None else p
    # 0 · log 0 = 0: a token the base model gives no probability (a −inf logit) adds nothing, not NaN.
    zero = torch.zeros((), dtype=torch.promote_types(p.dtype, post.dtype), device=p.device)
    return torch.where(p > 0, p * (base - post), zero).sum(-1)


def grad_of_logits(p: torch.Tensor, post: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """dKL_i/dz_i = softmax(z_i) Σ_v p_v − p for a block of rows: `p` the base probabilities, `post`
    log_softmax(z).  The derivative of −Σ_v p_v log softmax(z)_v; a p_v = 0 entry contributes nothing
    (its term is masked out of the KL), which the p_v factor gives as well.  in_place: computed in
    `post`'s memory (which then holds it), for a caller done with post; the same values."""
    if in_place and post.dtype == torch.promote_types(post.dtype, p.dtype):
        return post.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p)
    return post.exp() * p.sum(-1, keepdim=True) - p


class PickedKLRows(torch.autograd.Function):
    """kl_rows, differentiable in both arguments, saving only them for the backward."""

    @staticmethod
    def forward(base_logp, z):
        return kl_rows(base_logp, z)

    @staticmethod
    def setup_context(ctx, inputs, output):  # apart from forward: torch.func.grad and vjp take it then
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        base_logp, z = ctx.saved_tensors
        grad_base = torch.empty_like(base_logp) if ctx.needs_input_grad[0] else None
        grad_z = torch.empty_like(z) if ctx.needs_input_grad[1] else None
        for b in row_blocks(z.shape[0], z.shape[1]):
            g = grad[b].unsqueeze(-1)
            post = torch.log_softmax(upcast(z[b]), -1)
            base = base_logp[b]
            # p in base_logp's dtype, as the formula has it, then promoted as its product promotes it
            # (an fp32 base against fp64 logits: Σ_v p_v summed in fp32 was 5e-9 off in the gradient).
            p = base.exp().to(torch.promote_types(base.dtype, post.dtype))
            if grad_z is not None:
                grad_z[b] = grad_of_logits(p, post) * g
            if grad_base is not None:
                # d/d base of Σ_v exp(base_v)(base_v − post_v) = p_v (base_v − post_v + 1), 0 where p_v = 0.
                grad_base[b] = torch.where(p > 0, p * (base - post + 1), torch.zeros((), dtype=p.dtype,
                                                                                     device=p.device)) * g
        return grad_base, grad_z
