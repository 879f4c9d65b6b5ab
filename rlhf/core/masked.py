"""Reductions over the tokens a mask selects.

Masked positions are excluded with ``torch.where``, not multiplied by zero, so a NaN or inf sitting
in a padded position (e.g. the log-prob of a pad token) cannot leak into the result.
"""

import torch


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all elements when ``dim`` is None)."""
    selected = _zero_masked(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over ``dim``; 0 where the mask selects nothing."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the selected elements: mean((x - mean)^2), times n / (n - 1) when ``unbiased``."""
    x = _zero_masked(x, mask)  # a NaN in a masked position must not reach the gradient either
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the selected elements (unbiased variance).

    With ``shift_mean=False`` only the scale changes: the result keeps the original mean
    ((x - mean) / std + mean), as in TRL and verl. Masked positions are 0 in the output.
    """
    x = _zero_masked(x, mask)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)
