import torch
import torch.nn.functional as F


def _cv_squared(x):
    """Squared coefficient of variation (Shazeer et al. 2017); 0 for a single expert.  The sample
    variance (n − 1), as the PyTorch ports of that MoE layer compute it (`x.var()`), not
    tensor2tensor's population one: G/(G − 1) times that (2 for two editors); a constant factor on
    the balance term, which `balance_weight` scales anyway."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float() if x.dtype != torch.float64 else x
    return x.var() / (x.mean().square() + 1e-10)


def _prob_in_top_k(clean, noisy, noise_std, top_values, k):
    """P(expert stays in the top k under fresh noise): the smooth load of Shazeer et al."""
    E, m = top_values.shape
    flat = top_values.reshape(-1)
    pos_in = torch.arange(E, device=clean.device) * m + k
    thr_in = flat[pos_in].unsqueeze(1)
    is_in = noisy > thr_in
    thr_out = flat[pos_in - 1].unsqueeze(1)
    p_in = torch.special.ndtr((clean - thr_in) / noise_std)
    p_out = torch.special.ndtr((clean - thr_out) / noise_std)
    return torch.where(is_in, p_in, p_out)


def noisy_topk_gate(feats, w_gate, w_noise, k=1, noise=None):
    """Noisy top-k gate: logits f W_g + ε ⊙ (softplus(f W_noise) + 0.01), top-k, softmax over kept
    (0.01: Shazeer et al.'s noise_epsilon, see ops.noisy_topk_gate).

    `noise` is ε (E, G), drawn by the caller in training and None in eval.  Returns the (E, G)
    gates, the chosen group per edit (the top-1 expert, int64) and the importance + load
    balancing loss (squared coefficients of variation).
    """
    G = w_gate.shape[1]
    clean = feats @ w_gate
    if noise is not None:
        noise_std = F.softplus(feats @ w_noise) + 1e-2
        logits = clean + noise * noise_std
    else:
        logits = clean
    m = min(k + 1, G)
    top_values, top_idx = logits.topk(m, dim=1)
    kept_values, kept_idx = top_values[:, :k], top_idx[:, :k]
    kept_gates = torch.softmax(kept_values, dim=1)
    gates = torch.zeros_like(logits).scatter(1, kept_idx, kept_gates)
    importance = gates.sum(0)
    if noise is not None and k < G:
        load = _prob_in_top_k(clean, logits, noise_std, top_values, k).sum(0)
    else:
        load = (gates > 0).sum(0).to(gates.dtype)
    loss = _cv_squared(importance) + _cv_squared(load)
    return gates, kept_idx[:, 0].contiguous(), loss


def sort_by_group(group_of_row, G):
    """Stable permutation making groups contiguous, its inverse, and int32 offsets (G+1,)."""
    g = group_of_row.to(torch.int64)
    perm = torch.sort(g, stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(g, minlength=G)
    offsets = torch.zeros(G + 1, dtype=torch.int32, device=g.device)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    return perm, inverse, offsets
