"""Point sampling of mask logits (PointRend / Mask2Former conventions).

Coordinates are ``(x, y)`` in ``[0, 1]^2`` (x along W), read with ``grid_sample(align_corners=False)``:
``x = (j + 0.5) / W`` is the centre of pixel column ``j``, so a mask at any resolution is sampled at the
same physical place. Losses never upsample masks; they work on ``(N, P)`` point tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``input (N, C, H, W)`` at ``coords (N, P, 2)`` in [0, 1] -> ``(N, C, P)``.

    Zero padding outside the image, ``align_corners=False`` (detectron2's ``point_sample``).
    """
    if input.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != input.shape[0]:
        raise ValueError(f"point_sample: expected input (N, C, H, W) and coords (N, P, 2), "
                         f"got {tuple(input.shape)} and {tuple(coords.shape)}")
    grid = (2.0 * coords.to(input.dtype) - 1.0).unsqueeze(2)  # (N, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def uniform_point_coords(n: int, num_points: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` sets of ``num_points`` uniform coordinates: ``(n, num_points, 2)`` float32 in [0, 1)."""
    return torch.rand(n, num_points, 2, device=device)


def draw_uncertainty_random(
    n: int,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The random draws of ``uncertainty_point_coords``, separated so a caller can fix their order.

    Returns ``candidates (n, int(num_points * oversample_ratio), 2)`` and ``extra (n, num_random, 2)`` with
    ``num_random = num_points - int(importance_sample_ratio * num_points)``; drawn in Mask2Former's order
    (candidates first), so under one seed they equal its draws.
    """
    num_candidates = int(num_points * oversample_ratio)
    num_random = num_points - int(importance_sample_ratio * num_points)
    candidates = torch.rand(n, num_candidates, 2, device=device)
    extra = torch.rand(n, num_random, 2, device=device) if num_random > 0 else candidates.new_empty(n, 0, 2)
    return candidates, extra


def uncertainty_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    *,
    random_draws: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Mask2Former's ``get_uncertain_point_coords_with_randomness``: ``(N, 1, H, W) -> (N, num_points, 2)``.

    Draws ``num_points * oversample_ratio`` uniform candidates per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain ones (uncertainty = ``-|logit|``, i.e.
    closest to the decision boundary) and fills the rest uniformly. ``random_draws`` (from
    ``draw_uncertainty_random``) replaces the internal draws. Not differentiable (coordinates only).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"uncertainty_point_coords: expected logits (N, 1, H, W), got {tuple(logits.shape)}")
    if random_draws is None:
        random_draws = draw_uncertainty_random(
            logits.shape[0], num_points, oversample_ratio, importance_sample_ratio, logits.device
        )
    candidates, extra = random_draws
    num_uncertain = int(importance_sample_ratio * num_points)
    uncertainty = -point_sample(logits.detach(), candidates)[:, 0].abs()  # (N, num_candidates)
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    chosen = candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([chosen, extra.to(chosen)], dim=1)


def grid_point_coords(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Centres of every pixel of an ``H x W`` grid, row-major like ``flatten``: ``(H * W, 2)`` as (x, y)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def target_masks_at_prediction_grid(target_masks: Tensor, pred_spatial: tuple[int, ...]) -> Tensor:
    """Targets as ``(K, P)`` floats on the prediction's locations (the ``num_points=None`` path).

    - Point clouds: ``pred_spatial = (P,)`` and ``target_masks (K, P)`` pass through (P must agree).
    - Images: ``pred_spatial = (H, W)``; ``target_masks (K, H', W')`` at any resolution are read at the
      centres of the prediction's pixels with ``point_sample`` (identity when ``(H', W') == (H, W)``),
      so ``pred_masks.flatten(-2)`` and the result align location by location. ``P = H * W``.
    """
    if len(pred_spatial) == 1:
        if target_masks.dim() != 2 or target_masks.shape[1] != pred_spatial[0]:
            raise ValueError(f"target masks {tuple(target_masks.shape)} do not match point-cloud predictions "
                             f"with P = {pred_spatial[0]}; expected (K, {pred_spatial[0]})")
        return target_masks.float()
    if len(pred_spatial) != 2 or target_masks.dim() != 3:
        raise ValueError(f"target masks {tuple(target_masks.shape)} do not match image predictions of spatial "
                         f"shape {tuple(pred_spatial)}; expected (K, H', W')")
    height, width = pred_spatial
    if tuple(target_masks.shape[1:]) == (height, width):
        return target_masks.float().flatten(1)
    coords = grid_point_coords(height, width, target_masks.device)
    return point_sample(target_masks.float().unsqueeze(0), coords.unsqueeze(0))[0]


def flatten_to_points(pred_masks: Tensor, target_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Every-location view: ``pred (..., H, W) | (..., P)`` and targets -> ``(..., P)`` and ``(K, P)``.

    Image predictions must pass their spatial dims as the last two; point clouds their last one. The
    number of spatial dims is taken from ``target_masks`` (``(K, H', W')`` -> 2, ``(K, P)`` -> 1).
    """
    spatial_dims = target_masks.dim() - 1
    if spatial_dims not in (1, 2) or pred_masks.dim() < spatial_dims:
        raise ValueError(f"flatten_to_points: expected target masks (K, H', W') or (K, P) and predictions with "
                         f"matching trailing dims, got {tuple(target_masks.shape)} and {tuple(pred_masks.shape)}")
    pred_spatial = tuple(pred_masks.shape[-spatial_dims:])
    targets = target_masks_at_prediction_grid(target_masks, pred_spatial)
    return pred_masks.flatten(-spatial_dims) if spatial_dims == 2 else pred_masks, targets
