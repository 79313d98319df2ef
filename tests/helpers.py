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
