"""Point sampling of mask logits (PointRend / Mask2Former conventions).

Coordinates are ``(x, y)`` in ``[0, 1]^2`` (x along W), read with ``grid_sample(align_corners=False)``:
``x = (j + 0.5) / W`` is the centre of pixel column ``j``, so a mask at any resolution is sampled at the
same physical place. Losses never upsample masks; they work on ``(N, P)`` point tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

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
    return targets_at_pixels([target_masks], None, tuple(pred_spatial), torch.float32, target_masks.device)[0]


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


# --------------------------------------------------------------------- shared pixels of the prediction grid


def sample_pixels(batch: int, num_points: int, height: int, width: int,
                  device: torch.device | str | None = None) -> Tensor:
    """``num_points`` distinct pixels per image, uniform without replacement: ``(B, P)`` long, sorted row-major.

    Sorted so that gathering them from (and scattering gradients back onto) the prediction grid walks memory
    forwards; the order of the points does not matter to any loss.  No host sync.
    """
    if not 0 < num_points <= height * width:
        raise ValueError(f"num_points must be in [1, {height * width}] for a {height}x{width} grid, got {num_points}")
    keys = torch.rand(batch, height * width, device=device)
    return keys.topk(num_points, dim=1, sorted=False).indices.sort(dim=1).values


def pixel_centres(index: Tensor, height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(x, y)`` in [0, 1] of the centres of flat pixel indices ``(..., P)`` of an ``H x W`` grid -> ``(..., P, 2)``.

    The coordinates at which ``point_sample`` reads a pixel's own value (up to rounding of ``dtype``), as listed by
    ``grid_point_coords``.
    """
    rows, cols = index.div(width, rounding_mode="floor"), index.remainder(width)
    return torch.stack([(cols.to(dtype) + 0.5) / width, (rows.to(dtype) + 0.5) / height], dim=-1)


def _bilinear_taps(rows: Tensor, cols: Tensor, pred_hw: tuple[int, int], target_hw: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, float | Tensor]]:
    """Target pixels and weights of bilinear reads at the centres of prediction pixels ``(rows, cols)`` ``(P,)``.

    The arithmetic of ``grid_sample(align_corners=False, padding_mode="zeros")`` at ``pixel_centres``: the centre
    of prediction row ``i`` is at target row ``(i + 0.5) * H' / H - 0.5``.  Returns ``[(flat target index (P,),
    weight)]``: when ``H'`` and ``W'`` are integer multiples of ``H`` and ``W`` the weights are the same for every
    pixel (python floats; 1 tap for odd ratios, the 2 x 2 block with 0.25 each for even ones, e.g. 256 -> 128);
    otherwise that axis has 2 taps with ``(P,)`` weights in ``dtype``, 0 outside the target (index clamped).
    """
    axes = []
    for pos, size, t_size in ((rows, pred_hw[0], target_hw[0]), (cols, pred_hw[1], target_hw[1])):
        ratio, rest = divmod(t_size, size)
        if rest == 0:  # centre at ratio * i + (ratio - 1) / 2: one target pixel, or halfway between two
            half = (ratio - 1) // 2
            first = pos * ratio + half
            taps = [(first, 1.0)] if ratio % 2 else [(first, 0.5), (first + 1, 0.5)]
        else:
            coord = (pos.to(dtype) + 0.5) * (t_size / size) - 0.5
            low = coord.floor()
            frac, low = coord - low, low.long()
            taps = [((low + d).clamp(0, t_size - 1), weight * ((low + d >= 0) & (low + d < t_size)))
                    for d, weight in ((0, 1 - frac), (1, frac))]
        axes.append(taps)
    return [(y * target_hw[1] + x, wy * wx) for y, wy in axes[0] for x, wx in axes[1]]


def targets_at_pixels(target_masks: Sequence[Tensor], index: Tensor | None, pred_hw: tuple[int, int],
                      dtype: torch.dtype, device: torch.device, *, ones_row: bool = False) -> Tensor:
    """Per-image target masks ``(K_i, H', W')`` read at the centres of prediction pixels -> ``(B, K_max, P)``.

    ``index``: ``(B, P)`` flat prediction pixels, or None for every pixel (``P = H * W``).  Same values as
    ``point_sample(masks, pixel_centres(index))`` / ``target_masks_at_prediction_grid`` (the target pixel itself
    when ``(H', W') == (H, W)``), but gathered from the masks at the few pixels read: no padded float copy of
    the full targets and no ``grid_sample``.  Padding rows are 0; ``ones_row`` appends a row of ones
    (``(B, K_max + 1, P)``).
    """
    height, width = pred_hw
    num = height * width if index is None else index.shape[1]
    out = _padded_rows(target_masks, num, dtype, device, ones_row)
    for b, masks in enumerate(target_masks):  # one pass per image: K_i and the target size vary
        k = masks.shape[0]
        if k == 0:
            continue
        masks = masks.to(device)
        flat, target_hw = masks.reshape(k, -1), tuple(masks.shape[1:])
        if index is None and target_hw == pred_hw:
            out[b, :k] = flat
            continue
        pixels = torch.arange(num, device=device) if index is None else index[b]
        taps = _bilinear_taps(pixels.div(width, rounding_mode="floor"), pixels.remainder(width), pred_hw, target_hw,
                              dtype)
        weights = [w for _, w in taps]
        if masks.dtype == torch.bool and all(isinstance(w, float) and w == weights[0] for w in weights):
            # integer resolution ratio: <= 4 taps of 0/1 read in one gather, summed exactly in uint8
            reads = flat.view(torch.uint8).gather(1, torch.cat([tap for tap, _ in taps]).expand(k, -1))
            out[b, :k] = reads.view(k, len(taps), num).sum(1, dtype=torch.uint8)
            if weights[0] != 1.0:
                out[b, :k] *= weights[0]
        else:
            for tap, weight in taps:
                read = flat.gather(1, tap.expand(k, -1)).to(dtype)
                out[b, :k] += read * weight
    return out


def _padded_rows(target_masks: Sequence[Tensor], num: int, dtype: torch.dtype, device: torch.device,
                 ones_row: bool) -> Tensor:
    """Zeros ``(B, K_max (+ 1), num)``; the extra last row (``ones_row``) is filled with ones."""
    k_max = max((m.shape[0] for m in target_masks), default=0)
    out = torch.zeros(len(target_masks), k_max + int(ones_row), num, dtype=dtype, device=device)
    if ones_row:
        out[:, -1] = 1
    return out


def pad_point_masks(target_masks: Sequence[Tensor], num_points: int, dtype: torch.dtype,
                     device: torch.device, *, ones_row: bool = False) -> Tensor:
    """Point-cloud target masks ``(K_i, P)`` -> ``(B, K_max, P)`` floats, padding rows 0 (``ones_row``: as above)."""
    out = _padded_rows(target_masks, num_points, dtype, device, ones_row)
    for b, masks in enumerate(target_masks):
        out[b, :masks.shape[0]] = masks.to(device)
    return out
