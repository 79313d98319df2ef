"""Empirical Fisher over edits: ``F = (1/E) Σ_e (Σ_{t∈e} η_t μ_tᵀ)²`` (o × i).

It is grouped_outer's loop with a different fold (Σ S_e² instead of a fusion), so it launches
grouped_outer's kernel with MODE_FISHER: each program keeps one per-edit tile in registers at a
time and never holds E per-edit gradient matrices.
"""

from __future__ import annotations

from .grouped_outer import MODE_FISHER, launch_grouped_outer


def segmented_fisher(eta, mu, edit_offsets):
    """eta (T, o), mu (T, i), edit_offsets int (E+1,).  Returns (o, i) fp32 (fp64 for fp64)."""
    return launch_grouped_outer(eta, mu, edit_offsets, MODE_FISHER)
