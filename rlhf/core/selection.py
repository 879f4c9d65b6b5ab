"""Choosing which tokens train: the highest-entropy fraction (Wang et al. 2025, "Beyond the 80/20 rule")."""

import math

import torch


def top_fraction_mask(values: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``ceil(fraction * n)`` selected elements with the largest ``values`` among the n that ``mask`` selects,
    as a mask shaped like ``mask`` (``mask``'s dtype). Ties are broken by position (row-major: the earlier element
    wins), so exactly that many are kept and the choice is the same wherever it is computed on the same tensor.

    Give it the whole batch (all processes) to make the selection global: a token's fate must not depend on which
    micro-batch or process holds it."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    valid = mask.bool().reshape(-1)
    count = int(valid.sum())
    keep = math.ceil(fraction * count - 1e-9)  # a fraction such as 0.3 of 10 must keep 3, not 4
    flat = torch.where(valid, values.reshape(-1).double(), torch.full_like(values.reshape(-1), -math.inf).double())
    order = torch.sort(flat, descending=True, stable=True).indices
    selected = torch.zeros_like(valid)
    selected[order[:keep]] = True
    return (selected & valid).view(mask.shape).to(mask.dtype)
