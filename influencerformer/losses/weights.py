"""Weight producers of the matching-free forms: how much query ``q`` answers for instance ``k``.

Each returns weights ``(..., Q, K)`` that ``weighted_terms`` turns into ``loss_ce`` / ``loss_mask`` /
``loss_dice``:

- ``transport_weights``: entropic optimal transport (log-domain Sinkhorn) on the matching cost.  Rows = queries
  with capacity 1; columns = instances with mass ``m`` each (1 = one-to-one; ``m > 1`` = one-to-many, used on
  auxiliary layers as H-DETR / MS-DETR do, no repeated targets needed) and a zero-cost "no object" column with
  the rest, ``Q - m K``.  As ``epsilon -> 0`` with ``m = 1`` the plan is the Hungarian assignment.
- ``ownership_weights`` (in ``influencer.py``): softmax over queries of soft-dice coverage, no query capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .influencer import ownership_weights
from .transport import sinkhorn

__all__ = ["instance_mass", "ownership_weights", "transport_weights"]


def instance_mass(sizes: Tensor, num_queries: int, multiplicity: float = 1.0) -> Tensor:
    """Mass of each instance column: ``min(multiplicity, Q / K)`` per image, so ``m K <= Q`` (``sizes`` ``(B,)``).

    ``K > Q`` at ``multiplicity = 1`` gives ``Q / K``: every query is fully claimed and the marginals balance.
    """
    sizes = sizes.to(torch.float32)
    return (num_queries / sizes.clamp_min(1)).clamp_max(float(multiplicity))


def transport_weights(cost: Tensor, valid: Tensor, mass: Tensor, epsilon: float, iters: int,
                      epsilon_start: float | None = None) -> Tensor:
    """Transport plans of a stack of problems: ``cost (L, B, Q, K)`` -> plan ``(L, B, Q, K + 1)``.

    Args:
        cost: pair costs (padded instances: anything finite); detach it for a detached plan.
        valid: ``(B, K)`` bool, False for padded instances (they get exactly zero weight).
        mass: ``(L, B)`` mass of each instance column per layer and image (``instance_mass``).
        epsilon, iters: Sinkhorn's entropic regularisation (cost units) and iterations.
        epsilon_start: Sinkhorn's epsilon scaling (``transport.sinkhorn``); None = off.
    Returns:
        plan ``(L, B, Q, K + 1)``; rows sum to 1, the last column is "no object" (cost 0: a constant column cost
        never changes the plan, so the no-object column does not move the optimum away from Hungarian's).
    """
    num_layers, batch, queries, _ = cost.shape
    cost = F.pad(cost, (0, 1))
    sizes = valid.sum(-1).to(mass.dtype)  # (B,)
    cols = torch.cat([valid.unsqueeze(0) * mass.unsqueeze(-1),
                      (queries - mass * sizes).clamp_min(0).unsqueeze(-1)], dim=-1)  # (L, B, K + 1)
    rows = cost.new_ones(num_layers * batch, queries)
    plan = sinkhorn(cost.flatten(0, 1), rows, cols.flatten(0, 1).to(cost.dtype), epsilon, iters,
                    epsilon_start=epsilon_start)
    return plan.unflatten(0, (num_layers, batch))
