"""Input builders and measurements shared by the tests."""

import torch


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


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
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
