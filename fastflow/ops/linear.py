"""A hidden layer silu(h wᵀ + b) on CPU without autograd, into a preallocated buffer (the no-grad loops by blocks of
rows). torch's GEMM with its bias, then SiLU in place: 0-10 % faster than the earlier native bias + SiLU pass after a
bias-free GEMM (coupling flows' log_prob at 512-65,536 rows, the velocity field), which was removed. Training runs
`F.silu(F.linear(h, w, b))` under autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLOCK_ROWS", "linear_silu_into"]

BLOCK_ROWS = 2048  # rows per block of the no-grad loops: 128-wide activations (1 MB) stay in L2, where 128x128
# GEMMs run at ~73 GFLOP/s (~57 at 4,096 rows, ~54 at 8,192)


def linear_silu_into(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """silu(h wᵀ + b) without autograd, written into `out`: h `(N, in)`, weight `(out, in)`, bias `(out,)`,
    out `(N, out)`; returns out."""
    return F.silu(torch.addmm(bias, h, weight.t(), out=out), inplace=True)
