"""Minibatch optimal-transport pairing of noise and data for flow matching (OT-CFM: Tong et al. 2024;
multisample flow matching: Pooladian et al. 2023): within blocks of a batch, each data point is paired with the
noise draw of the exact optimal assignment under squared Euclidean cost. The noise set is only reordered, so its
marginal stays N(0, I); the learned paths are straighter, and few-step samplers reach the accuracy of many steps."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fastflow._checks import positive_int

__all__ = ["PAIRINGS", "ot_pairing"]

PAIRINGS = ("independent", "ot")


def ot_pairing(x_0: torch.Tensor, x_1: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Noise reordered to data: `x_0[order]` with `order` the optimal assignment of each block of `block_size`
    consecutive rows (the last block may be shorter) minimizing Σ_i ||x_0[order[i]] - x_1[i]||².

    Arguments:
        x_0: `(n, D)` noise draws. x_1: `(n, D)` data.
        block_size: rows per exact assignment (Hungarian-type solver on the CPU: ~0.1 ms for 64 rows, ~2 ms for
            128, ~70 ms for 512); pairing in blocks keeps the cost linear in n.

    Returns:
        `(n, D)` the rows of x_0 in the paired order (the `(n / b, b, b)` block costs go to the host: a sync on CUDA).
    """
    if x_0.dim() != 2 or x_0.shape != x_1.shape:
        raise ValueError(f"x_0 and x_1 must be (n, D) of one shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
    block_size = positive_int(block_size, "block_size")
    n = x_0.shape[0]
    if n == 0:
        return x_0
    with torch.no_grad():  # float64 costs: float32 ones lost the optimum for data far from 0 (and cdist has no bf16)
        costs = [torch.cdist(data, noise).square().cpu().numpy()
                 for data, noise in _blocks(x_1.detach().double(), x_0.detach().double(), block_size)]
    order = np.concatenate([start + linear_sum_assignment(cost)[1]
                            for start, cost in zip(range(0, n, block_size), (c for batch in costs for c in batch))])
    return x_0[torch.from_numpy(order).to(x_0.device)]


def _blocks(data: torch.Tensor, noise: torch.Tensor, block_size: int):
    """`(B, b, D)` stacks of the whole blocks, then `(1, r, D)` for a remainder (batched distances for each)."""
    whole = data.shape[0] // block_size * block_size
    if whole:
        yield data[:whole].reshape(-1, block_size, data.shape[1]), noise[:whole].reshape(-1, block_size, data.shape[1])
    if whole < data.shape[0]:
        yield data[whole:].unsqueeze(0), noise[whole:].unsqueeze(0)
