"""ProEditor's ψ: a feed-forward net generating per-token or per-edit parameters (`gain`)."""

import math

import torch
from torch import nn

from ..reference.segments import group_ids


def seeded_draw_(t: torch.Tensor, draw, generator: torch.Generator | None) -> torch.Tensor:
    """`draw(t, generator)`, an in-place random initialisation of t, drawn on the generator's
    device (the editors' seeded generator is a CPU one) and copied into t where t is elsewhere:
    t's device is torch's default one, and torch draws into a CUDA tensor from a CUDA generator
    only ("Expected a 'cuda' device type for generator but found 'cpu'"), so a seeded editor built
    under torch.set_default_device("cuda") or `with torch.device("cuda"):` raised that.  Drawn on
    the CPU, a seeded editor holds the same values wherever it is built.  On "meta" the copy is a
    no-op, but the draw advances the generator as on the CPU: a meta draw draws nothing, so a
    seeded editor built on "meta" (then `to_empty` and `load_state_dict`, as one builds a model
    skeleton) routed its edits from another state of its generator than the same editor built on
    the CPU or loaded: other random groups."""
    if generator is None or t.device == generator.device:
        return draw(t, generator)
    with torch.no_grad():  # t may be a Parameter already
        return t.copy_(draw(torch.empty_like(t, device=generator.device), generator))


class ParameterGenerator(nn.Module):
    """gain = 1 + W₂ relu(W₁ [μ; η]): W₂ starts at zero, so an untrained ProEditor transforms the
    factors as MEND does (its shift is MEND's times the Fisher mask, with the preset's fisher_keep)."""

    def __init__(self, dim: int, hidden: int, level: str, generator: torch.Generator | None = None):
        super().__init__()
        if level not in ("token", "sentence"):
            raise ValueError(f"generator must be 'token' or 'sentence', got {level!r}")
        self.level = level
        if generator is None:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)
        else:
            # With the editor's seed, built without nn.Linear's default initialisation (skip_init: on
            # "meta", then left empty on the default device), and fc1 gets that initialisation drawn
            # from the seed instead.  Built plainly inside fork_rng(devices=[]), the default draws were
            # made on the default device's global generator, which that restores only for the CPU: a
            # seeded ProEditor built under set_default_device("cuda") advanced the CUDA generator.
            # The device is an empty tensor's, not torch.get_default_device()'s: before torch 2.8 that
            # ignores `with torch.device(...)` (pytorch#131328), which put ψ on the CPU beside the rest.
            device = torch.empty(0).device
            self.fc1 = nn.utils.skip_init(nn.Linear, dim, hidden, device=device)
            self.fc2 = nn.utils.skip_init(nn.Linear, hidden, dim, device=device)
            seeded_draw_(self.fc1.weight, lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
                         generator)
            bound = 1 / math.sqrt(dim)
            seeded_draw_(self.fc1.bias, lambda t, g: nn.init.uniform_(t, -bound, bound, generator=g), generator)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, edit_offsets: torch.Tensor) -> torch.Tensor:
        """gain (T, dim) computed in ψ's dtype, returned in the wider of h's and ψ's: an editor
        moved to bf16 or float64 gets h in fp32 from its running norms (and before they have seen
        two tokens); a float64 editor keeps its gain in float64, a bf16 one gets it in fp32."""
        out_dtype = torch.promote_types(h.dtype, self.fc1.weight.dtype)
        h = h.to(self.fc1.weight.dtype)
        if self.level == "sentence":
            # One parameter vector per edit: the mean of its tokens, broadcast back.
            E = edit_offsets.numel() - 1
            ids = group_ids(edit_offsets, h.shape[0])
            counts = (edit_offsets[1:] - edit_offsets[:-1]).clamp(min=1).to(h.dtype).unsqueeze(1)
            means = torch.zeros(E, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, ids, h) / counts
            h = means[ids]
        return (1 + self.fc2(torch.relu(self.fc1(h)))).to(out_dtype)
