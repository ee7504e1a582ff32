"""Minimum-cost bipartite assignment (Hungarian) for a batch of rectangular cost matrices.

The reference is ``scipy.optimize.linear_sum_assignment`` per item (what Mask2Former and HF use). When the
costs live on a CUDA device and ``torch_linear_assignment`` is installed (``pip install
influencerformer[gpu]``), the whole padded batch is solved on the GPU instead, avoiding the host transfer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

try:  # optional GPU solver; absent on CPU-only installs
    from torch_linear_assignment import batch_linear_assignment as _gpu_batch_assignment
except ImportError:  # pragma: no cover - depends on the environment
    _gpu_batch_assignment = None

Indices = tuple[Tensor, Tensor]  # (row_idx (M,), col_idx (M,)) int64 on CPU, M = min(Q_i, K_i), rows ascending


def gpu_solver_available() -> bool:
    """True when ``torch_linear_assignment`` can be imported (it is used for CUDA costs only)."""
    return _gpu_batch_assignment is not None


def _as_items(costs: Tensor | Sequence[Tensor | np.ndarray], sizes: Sequence[tuple[int, int]] | None):
    """Normalise the input to (padded tensor or None, list of per-item 2-D tensors, sizes)."""
    if isinstance(costs, Tensor):
        if costs.dim() != 3:
            raise ValueError(f"costs: expected a padded tensor (N, Q, K) or a list of (Q_i, K_i), "
                             f"got a tensor of shape {tuple(costs.shape)}")
        if sizes is None:
            sizes = [tuple(costs.shape[1:])] * costs.shape[0]
        if len(sizes) != costs.shape[0]:
            raise ValueError(f"sizes: expected {costs.shape[0]} (Q_i, K_i) pairs, got {len(sizes)}")
        for i, (q, k) in enumerate(sizes):
            if q > costs.shape[1] or k > costs.shape[2]:
                raise ValueError(f"sizes[{i}] = {(q, k)} exceeds the padded shape {tuple(costs.shape[1:])}")
        return costs, [(int(q), int(k)) for q, k in sizes]
    items = [torch.as_tensor(c) for c in costs]
    for i, c in enumerate(items):
        if c.dim() != 2:
            raise ValueError(f"costs[{i}]: expected a 2-D (Q_i, K_i) matrix, got shape {tuple(c.shape)}")
    if sizes is not None:
        raise ValueError("sizes is only used with a padded tensor of costs")
    return items, [tuple(c.shape) for c in items]


def _check_finite(costs: Tensor | list[Tensor], sizes: list[tuple[int, int]]) -> None:
    """ValueError naming the first item whose (unpadded) cost matrix holds NaN or Inf."""
    items = [costs[i, :q, :k] for i, (q, k) in enumerate(sizes)] if isinstance(costs, Tensor) else costs
    if not items:
        return
    finite = torch.stack([torch.isfinite(c).all() for c in items]).tolist()  # one host sync
    for i, ok in enumerate(finite):
        if not ok:
            raise ValueError(f"costs[{i}]: cost matrix of shape {tuple(items[i].shape)} contains NaN or Inf")


def _solve_scipy(costs: Tensor | list[Tensor], sizes: list[tuple[int, int]]) -> list[Indices]:
    """scipy per item on host copies (one transfer for a padded tensor)."""
    host = costs.detach().cpu().numpy() if isinstance(costs, Tensor) else [c.detach().cpu().numpy() for c in costs]
    out = []
    for i, (q, k) in enumerate(sizes):
        rows, cols = linear_sum_assignment(host[i][:q, :k])
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def _solve_gpu(costs: Tensor, sizes: list[tuple[int, int]]) -> list[Indices]:
    """torch_linear_assignment on the padded batch; padded columns cost 0.

    Zero-cost padding is exact when every query count is >= the padded K: all K columns are then assigned,
    the padding adds a constant, and the real columns are free to take their optimal rows. Padded rows
    (Q_i < Q) are not supported here; the caller falls back to scipy.
    """
    k_max = costs.shape[2]
    padded = costs.detach().float().clone()
    col = torch.arange(k_max, device=costs.device)
    k_sizes = torch.tensor([k for _, k in sizes], device=costs.device)
    padded.masked_fill_(col[None, None, :] >= k_sizes[:, None, None], 0.0)
    assigned = _gpu_batch_assignment(padded).cpu()  # (N, Q): column per row, -1 = none; one transfer
    out = []
    for i, (_, k) in enumerate(sizes):
        rows = torch.nonzero((assigned[i] >= 0) & (assigned[i] < k)).flatten()
        out.append((rows, assigned[i, rows].long()))
    return out


def linear_sum_assignment_batched(
    costs: Tensor | Sequence[Tensor | np.ndarray],
    sizes: Sequence[tuple[int, int]] | None = None,
    *,
    backend: str = "auto",
) -> list[Indices]:
    """Minimum-cost assignment per item.

    Args:
        costs: list of ``(Q_i, K_i)`` matrices, or a padded tensor ``(N, Q, K)`` whose item ``i`` is
            ``costs[i, :Q_i, :K_i]`` with ``sizes[i] = (Q_i, K_i)`` (default: the full padded shape).
        backend: ``"scipy"`` (reference), ``"gpu"`` (``torch_linear_assignment``; needs CUDA costs) or
            ``"auto"`` (gpu when the costs are a CUDA tensor, the solver is installed and every
            ``Q_i == Q >= K``; scipy otherwise).

    Returns:
        list of ``(row_idx, col_idx)`` int64 CPU tensors of length ``min(Q_i, K_i)``, rows ascending.

    Raises:
        ValueError: on malformed input or a cost matrix containing NaN/Inf.
    """
    if backend not in ("auto", "scipy", "gpu"):
        raise ValueError(f"backend: expected 'auto', 'scipy' or 'gpu', got {backend!r}")
    costs, sizes = _as_items(costs, sizes)
    _check_finite(costs, sizes)
    gpu_ok = (
        isinstance(costs, Tensor) and costs.is_cuda and gpu_solver_available()
        and all(q == costs.shape[1] >= costs.shape[2] for q, _ in sizes)
    )
    if backend == "gpu" and not gpu_ok:
        raise ValueError("backend='gpu' needs torch_linear_assignment, a padded CUDA cost tensor and Q_i == Q >= K")
    if backend != "scipy" and gpu_ok and sizes:
        return _solve_gpu(costs, sizes)
    return _solve_scipy(costs, sizes)


def assignment_of(rows: Tensor, cols: Tensor, num_instances: int) -> Tensor:
    """Matched pairs ``(query_idx, instance_idx)`` -> ``(K,)`` long on the CPU: each instance's query, -1 if none."""
    owner = torch.full((num_instances,), -1, dtype=torch.long)
    owner[torch.as_tensor(cols, dtype=torch.long).cpu()] = torch.as_tensor(rows, dtype=torch.long).cpu()
    return owner
