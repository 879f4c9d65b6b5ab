"""Reductions over the tokens a mask selects.

Masked positions are excluded with ``torch.where``, not multiplied by zero, so a NaN or inf sitting
in a padded position (e.g. the log-prob of a pad token) cannot leak into the result.

The whole-tensor statistics (``masked_mean`` with ``dim=None``, ``masked_var``, ``masked_whiten``) take
an optional ``all_reduce``: a function that sums a tensor over processes (e.g.
``lambda t: accelerator.reduce(t, "sum")``). With it, the statistics are those of the union of every
process's selected elements, so a batch split over processes is whitened exactly as on one process.
Core stays torch-only: the caller supplies the collective.
"""

from collections.abc import Callable

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _summed(values: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    return all_reduce(values) if all_reduce is not None else values


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all elements when ``dim`` is None)."""
    selected = _zero_masked(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                all_reduce: AllReduce | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over ``dim``; 0 where the mask selects nothing. ``all_reduce`` (only with
    ``dim=None``) makes it the mean over every process's selected elements."""
    if all_reduce is not None:
        if dim is not None:
            raise ValueError("masked_mean: all_reduce needs dim=None (a mean over the whole batch).")
        sums = all_reduce(torch.stack([mask.bool().sum().double(), _zero_masked(x, mask).double().sum()]))
        return (sums[1] / sums[0].clamp(min=1)).to(x.dtype)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _moments(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None):
    """(count, mean, unbiased variance) of the selected elements, in float64, over all processes."""
    valid = mask.bool()
    x64 = _zero_masked(x, mask).double()
    count_and_sum = _summed(torch.stack([valid.sum().double(), x64.sum()]), all_reduce)
    count, total = count_and_sum[0], count_and_sum[1]
    mean = total / count.clamp(min=1)
    squares = _summed(_zero_masked((x64 - mean).square(), mask).sum(), all_reduce)
    return count, mean, squares / (count - 1).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Variance of the selected elements: mean((x - mean)^2), times n / (n - 1) when ``unbiased``.
    Accumulated in float64, returned in ``x``'s dtype."""
    count, _, var = _moments(x, mask, all_reduce)
    if not unbiased:
        var = var * (count - 1).clamp(min=1) / count.clamp(min=1)
    return var.to(x.dtype)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the selected elements (unbiased variance).

    With ``shift_mean=False`` only the scale changes: the result keeps the original mean
    ((x - mean) / std + mean), as in TRL and verl. Masked positions are 0 in the output.
    """
    _, mean, var = _moments(x, mask, all_reduce)
    whitened = (_zero_masked(x, mask).double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened.to(x.dtype), mask)
