"""MEND's running mean/std of the gradient factors, updated a batch at a time.

MEND updates its statistics token by token in a Python loop (Welford); this merges a whole batch
in one step with Chan et al.'s parallel formula, which gives the same mean and sum of squares.
Buffer names follow MEND (u = layer input μ, v = output gradient η) so checkpoints map 1:1.
"""

import torch
from torch import nn


class RunningNorm(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        for side, dim in (("u", in_features), ("v", out_features)):
            self.register_buffer(f"{side}_mean", torch.zeros(dim))
            self.register_buffer(f"{side}_s", torch.zeros(dim))
            self.register_buffer(f"{side}_std", torch.ones(dim))
        self.register_buffer("k", torch.zeros(()))

    def _apply(self, fn, recurse=True):
        """Moves and casts as any module, except that the statistics stay at least fp32: they are
        running sums over every token seen, and in 16 bits the count stops growing (bf16's at 4096:
        4096 + 10 rounds back to 4096) while the sums go on, so the std drifts (bf16) or overflows to
        inf/NaN past 65504 tokens (fp16).  An editor moved to bf16 or fp16 keeps fp32 statistics
        (forward computes the normalisation in fp32 anyway)."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.u_mean.numel()}, out_features={self.v_mean.numel()}, tokens_seen={int(self.k)}"

    @torch.no_grad()
    def update(self, mu: torch.Tensor, eta: torch.Tensor) -> None:
        n_b = mu.shape[0]
        if n_b == 0:
            return
        k = float(self.k)
        total = k + n_b
        for side, x in (("u", mu), ("v", eta)):
            mean, s = getattr(self, f"{side}_mean"), getattr(self, f"{side}_s")
            # Rounded to fp32 as forward does, then summed in the buffers' dtype if wider (float64).
            x = x.to(torch.float32).to(torch.promote_types(torch.float32, mean.dtype))
            mean_b = x.mean(0)
            m2_b = (x - mean_b).square().sum(0)
            delta = mean_b - mean
            mean += delta * (n_b / total)
            s += m2_b + delta.square() * (k * n_b / total)
            if total >= 2:
                getattr(self, f"{side}_std").copy_((s / (total - 1)).sqrt())
        self.k.fill_(total)

    def forward(self, mu: torch.Tensor, eta: torch.Tensor):
        """Normalised (μ, η); identity until at least two tokens have been seen.  μ, η are rounded
        to fp32 first, as MEND does (then computed in the buffers' dtype if wider)."""
        mu, eta = mu.to(torch.float32), eta.to(torch.float32)
        if float(self.k) < 2:
            return mu, eta
        return (mu - self.u_mean) / (self.u_std + 1e-7), (eta - self.v_mean) / (self.v_std + 1e-7)
