import torch

from .._checks import compute_dtype
from .segments import segment_bounds


def lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha):
    """y_n = x_n Wᵀ + b + alpha_g (x_n mu_tᵍᵀ) eta_tᵍ, with rows of group −1 left unedited.

    Output in x's dtype (a drop-in for the layer it replaces); arithmetic in fp32 (float64 when any
    float input is, bias included).  alpha: a number or a tensor of 1 or G entries, as the op takes it.
    No group's o×i shift is formed; a 16-bit weight is read as an fp32 copy (o×i, here and in the
    backward: torch's CPU matmul gives 16-bit operands a 16-bit product only), the op's CPU kernel's
    one o×i tensor (tests/test_cpu_kernels.py).
    """
    if not isinstance(alpha, torch.Tensor):  # the op's own conversion of a number (ops.lowrank_delta_linear)
        alpha = torch.full((1,), float(alpha), dtype=compute_dtype(x, weight, bias, mu_t, eta_t), device=x.device)
    acc = compute_dtype(x, weight, bias, mu_t, eta_t, alpha)
    xa = x.to(acc)
    y = xa @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    alpha = alpha.to(acc).reshape(-1)
    G = offsets.numel() - 1
    if alpha.numel() == 1 and G != 1:
        alpha = alpha.expand(G)
    # In place: `extra` and the backward's `dx` are this call's own; an out-of-place index_add
    # copied them once a group (CPU, SmolLM2 down_proj, 400 rows, 3 groups, T=250: 13 -> 9 ms forward,
    # 22 -> 15 ms backward).  Autograd (reference_mode, a double backward) allows both.
    extra = torch.zeros_like(y)
    for g, (s, e) in enumerate(segment_bounds(offsets)):
        rows = (row_group == g).nonzero().squeeze(1)
        if s == e or rows.numel() == 0:
            continue
        coeff = xa[rows] @ mu_t[s:e].to(acc).T  # (n_g, T_g): never an o×i matrix
        extra.index_add_(0, rows, alpha[g] * (coeff @ eta_t[s:e].to(acc)))
    return (y + extra).to(x.dtype if x.dtype != torch.float64 else acc)


def lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha):
    """(dx, dmu_t, deta_t, dalpha) of lowrank_delta_linear; weight and bias are frozen."""
    acc = compute_dtype(x, weight, mu_t, eta_t, alpha, grad)
    xa, ga = x.to(acc), grad.to(acc)
    dx = ga @ weight.to(acc)
    dmu = torch.zeros(mu_t.shape, dtype=acc, device=mu_t.device)
    deta = torch.zeros(eta_t.shape, dtype=acc, device=eta_t.device)
    a = alpha.to(acc).reshape(-1)
    G = offsets.numel() - 1
    broadcast = a.numel() == 1 and G != 1
    dalpha = torch.zeros(G if not broadcast else 1, dtype=acc, device=alpha.device)
    for g, (s, e) in enumerate(segment_bounds(offsets)):
        rows = (row_group == g).nonzero().squeeze(1)
        if s == e or rows.numel() == 0:
            continue
        ag = a[0] if broadcast else a[g]
        mg, eg, xr, gr = mu_t[s:e].to(acc), eta_t[s:e].to(acc), xa[rows], ga[rows]
        c = xr @ mg.T  # (n_g, T_g)
        ge = gr @ eg.T  # (n_g, T_g)
        dx.index_add_(0, rows, ag * (ge @ mg))
        deta[s:e] = ag * (c.T @ gr)
        dmu[s:e] = ag * (ge.T @ xr)
        dalpha[0 if broadcast else g] += (ge * c).sum()
    return dx.to(x.dtype), dmu.to(mu_t.dtype), deta.to(eta_t.dtype), dalpha.reshape(alpha.shape).to(alpha.dtype)
