"""The Hungarian baseline: Mask2Former's criterion and matcher (``HungarianCriterion``), batched over layers.

It consumes the criterion contract of ``criterion.py`` through ``SetCriterion`` (``set_criterion.py``); the
assignment solver is in ``assignment.py``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .assignment import Indices, assignment_of, linear_sum_assignment_batched
from .mask_losses import (
    brier_loss,
    dice_loss,
    pairwise_brier,
    pairwise_dice,
    pairwise_sigmoid_bce,
    sigmoid_bce_loss,
)
from .pair_kernel import instance_ids, pair_terms
from .sampling import (
    draw_uncertainty_random,
    point_sample,
    target_masks_at_prediction_grid,
    uncertainty_point_coords,
    uniform_point_coords,
)
from .set_criterion import SetCriterion
from .validation import Layer
from .weighted_terms import loss_ce


class PaddedTargets(NamedTuple):
    """Targets of a batch stacked with K padded to ``K_max`` (padding: label 0, empty mask)."""

    labels: Tensor  # (B, K_max) int64
    masks: Tensor  # (B, K_max, H', W') or (B, K_max, P) float32
    sizes: list[int]  # K_i per image


def pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> PaddedTargets:
    """Stack per-image targets into padded tensors; spatial sizes that differ are zero-padded bottom/right.

    Targets are aligned top-left with the predictions, as Mask2Former's ``prepare_targets`` pads every target
    to the batch's padded image. (HF pads in its loss but not in its matcher, so with targets of different
    sizes HF's matching reads each target in its own frame; ours and Mask2Former's use the padded frame.)
    """
    sizes = [len(t["labels"]) for t in targets]
    labels = pad_sequence([t["labels"].to(device, torch.int64) for t in targets], batch_first=True)
    spatial = [max(s) for s in zip(*(tuple(t["masks"].shape[1:]) for t in targets))]
    masks = torch.zeros(len(targets), max(sizes), *spatial, device=device)
    for b, t in enumerate(targets):  # one copy per image: the only way to stack variable K and sizes
        m = t["masks"]
        masks[(b, slice(0, m.shape[0])) + tuple(slice(0, n) for n in m.shape[1:])] = m.to(device, torch.float32)
    return PaddedTargets(labels, masks, sizes)


def flat_indices(per_layer: list[list[Indices]], device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer, per image ``(row, col)`` pairs -> per layer ``(batch_idx, query_idx, instance_idx)`` ``(N_l,)``.

    All layers are concatenated on the host and moved to ``device`` in one transfer.
    """
    stacked = [
        torch.stack([torch.cat([torch.full_like(rows, b) for b, (rows, _) in enumerate(layer)]),
                     torch.cat([rows for rows, _ in layer]), torch.cat([cols for _, cols in layer])])
        for layer in per_layer
    ]  # each (3, N_l)
    moved = torch.cat(stacked, dim=1).to(device, non_blocking=True)
    return [tuple(part.unbind(0)) for part in moved.split([s.shape[1] for s in stacked], dim=1)]


class HungarianCriterion(SetCriterion):
    """Mask2Former's criterion and matcher (the baseline), framework-free and batched over layers and images.

    Matching (no grad, fp32, autocast off): ``cost = class_weight * (-p[class]) + mask_weight * BCE +
    dice_weight * (1 - dice)`` on ``num_points`` uniform points shared by all queries and instances of an image,
    solved per (layer, image) by scipy after one host transfer. Losses on the matched pairs: ``loss_ce``
    (cross-entropy, "no object" weighted by ``no_object_weight``), ``loss_mask`` (BCE or Brier) and ``loss_dice``
    on uncertainty-sampled points, normalised by the number of target masks. ``num_points=None`` uses every
    location of the prediction grid for both (exact, deterministic); point-cloud masks ``(B, Q, P)`` always use
    every point. Under one seed the random draws equal HF ``Mask2FormerLoss``'s, in the same order.

    Levers (off by default; with them this is no longer the faithful port): ``aux_multiplicity = m > 1`` matches
    auxiliary layers against every target repeated ``min(m, Q // K)`` times (H-DETR's one-to-many, on the same
    queries; the final layer stays one-to-one), mask terms normalised by the number of repeated targets;
    ``quality_targets`` makes a matched query's class target its mask's dice with the instance (the rest on
    "no object"), as ``MaskInfluencerCriterion(quality_targets=True)`` does.

    After each call ``last_assignment`` holds, per image, the query matched to each instance ``(K_i,)`` (-1: none,
    K > Q) — the diagnostic every criterion exposes under that name; ``last_indices`` the same matching as DETR's
    ``(query_idx, instance_idx)`` pairs per image, and ``last_layer_indices`` every layer's (final first).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int | None = 12544,
        mask_loss: str = "bce",
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        assignment_backend: str = "auto",
        aux_multiplicity: int = 1,
        quality_targets: bool = False,
    ) -> None:
        if not (isinstance(aux_multiplicity, int) and aux_multiplicity >= 1):
            raise ValueError(f"aux_multiplicity must be an int >= 1, got {aux_multiplicity!r}")
        weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        super().__init__(num_classes, weights, no_object_weight=no_object_weight, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)
        if mask_loss not in _MASK_LOSSES:
            raise ValueError(f"mask_loss: expected one of {sorted(_MASK_LOSSES)}, got {mask_loss!r}")
        self.mask_loss = mask_loss
        self.assignment_backend = assignment_backend
        self.aux_multiplicity, self.quality_targets = aux_multiplicity, bool(quality_targets)
        self.last_indices: list[Indices] | None = None
        self.last_layer_indices: list[list[Indices]] | None = None
        self._last_sizes: list[int] = []

    @property
    def last_assignment(self) -> list[Tensor] | None:
        """Per image ``(K_i,)`` long: the query matched to each instance by the final layer in the last call."""
        if self.last_indices is None:
            return None
        return [assignment_of(rows, cols, k) for (rows, cols), k in zip(self.last_indices, self._last_sizes)]

    def _sampled(self, pred_masks: Tensor) -> bool:
        """Point sampling applies to image masks with a finite ``num_points``; otherwise every location."""
        return pred_masks.dim() == 4 and self.num_points is not None

    def layer_context(self, layers: list[Layer], targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Match every layer in one batched pass; returns per layer its flat indices and random draws."""
        logits, masks = layers[0]
        padded = pad_targets(targets, logits.device)
        grid_targets = self._targets_on_grid(padded, masks)
        repeats = self._repeats(len(layers), padded.sizes, logits.shape[1])
        matcher_coords, loss_draws = self._draw_random(repeats, padded.sizes, masks)
        with self.assign_timer(masks.device):
            with torch.no_grad(), torch.autocast(masks.device.type, enabled=False):
                costs = self.matching_costs(layers, padded, matcher_coords, grid_targets)
                costs, shapes = _repeat_columns(costs, padded.sizes, repeats)
            flat = linear_sum_assignment_batched(costs.flatten(0, 1), shapes, backend=self.assignment_backend)
        batch = len(targets)  # aux layers' columns are repeated targets: column j is instance j mod K
        per_layer = [[(rows, cols % max(k, 1)) for (rows, cols), k in zip(flat[i * batch:(i + 1) * batch], padded.sizes)]
                     for i in range(len(layers))]
        self.last_layer_indices, self.last_indices, self._last_sizes = per_layer, per_layer[0], padded.sizes
        total = max(sum(padded.sizes), 1)
        return [
            {"indices": idx, "padded": padded, "grid_targets": grid_targets, "loss_draws": draws,
             "mask_norm": sum(r * k for r, k in zip(reps, padded.sizes)) / total}
            for idx, draws, reps in zip(flat_indices(per_layer, logits.device), loss_draws, repeats)
        ]

    def _repeats(self, num_layers: int, sizes: list[int], num_queries: int) -> list[list[int]]:
        """Copies of each image's targets per layer: 1 on the final layer, ``min(m, Q // K)`` (>= 1) on aux layers."""
        aux = [max(1, min(self.aux_multiplicity, num_queries // max(k, 1))) for k in sizes]
        return [[1] * len(sizes)] + [aux] * (num_layers - 1)

    def _targets_on_grid(self, padded: PaddedTargets, pred_masks: Tensor) -> Tensor | None:
        """Every-location targets ``(B, K_max, P)`` aligned with ``pred_masks.flatten(2)``; None when sampling."""
        if self._sampled(pred_masks):
            return None
        if pred_masks.dim() == 3:  # point clouds: already one value per point
            return padded.masks
        flat = target_masks_at_prediction_grid(padded.masks.flatten(0, 1), tuple(pred_masks.shape[2:]))
        return flat.unflatten(0, tuple(padded.masks.shape[:2]))

    def _draw_random(self, repeats: list[list[int]], sizes: list[int], pred_masks: Tensor):
        """All random coordinates of a call, drawn in HF/Mask2Former's order: per layer, B matcher draws
        ``(1, P, 2)`` then the importance-sampling draws of its ``N = sum min(Q, r_i K_i)`` matched masks
        (``r_i`` = copies of image i's targets on that layer, 1 unless ``aux_multiplicity`` > 1)."""
        num_layers = len(repeats)
        if not self._sampled(pred_masks):
            return None, [None] * num_layers
        device, num_queries = pred_masks.device, pred_masks.shape[1]
        matcher, loss = [], []
        for reps in repeats:
            num_matched = sum(min(num_queries, r * k) for r, k in zip(reps, sizes))
            matcher += [uniform_point_coords(1, self.num_points, device) for _ in sizes]
            loss.append(draw_uncertainty_random(num_matched, self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio, device))
        return torch.cat(matcher).unflatten(0, (num_layers, len(sizes))), loss

    def matching_costs(
        self, layers: list[Layer], padded: PaddedTargets, coords: Tensor | None, grid_targets: Tensor | None
    ) -> Tensor:
        """Matching costs of every layer and image in one pass: ``(L, B, Q, K_max)`` float32.

        ``coords (L, B, P, 2)``: the uniform points of each (layer, image), shared by its queries and instances.
        """
        logits = torch.stack([lg for lg, _ in layers]).float()  # (L, B, Q, C+1)
        num_layers, batch, num_queries = logits.shape[:3]
        labels = padded.labels[None, :, None, :].expand(num_layers, batch, num_queries, -1)
        # -p[class] instead of the NLL, as DETR: the constant 1 of "1 - p" does not change the assignment
        cost_class = -logits.softmax(-1).gather(-1, labels)
        if padded.masks.shape[1] == 0:
            return cost_class
        if coords is not None:
            # sample each layer's masks (queries as channels) and stack only the points: (L, B, Q, P), never
            # an (L, B, Q, H, W) copy of the masks
            pred = torch.stack([point_sample(m.float(), c) for (_, m), c in zip(layers, coords)])
            # fold layers into the point axis so the padded targets are read in one call, without L copies
            tgt = point_sample(padded.masks, coords.transpose(0, 1).flatten(1, 2))  # (B, K, L * P)
            tgt = tgt.unflatten(-1, (num_layers, -1)).permute(2, 0, 1, 3)  # (L, B, K, P)
        else:  # every location: images flattened, point clouds as they are
            pred = [m.float().flatten(2) for _, m in layers]
            ids = instance_ids(grid_targets) if self.mask_loss == "bce" else None
            if ids is not None:  # disjoint binary targets: segment sums by instance id, no K factor
                targets1 = torch.cat([grid_targets, grid_targets.new_ones(batch, 1, grid_targets.shape[-1])], 1)
                bce, dice = (torch.stack(terms) for terms in zip(*(pair_terms(m, None, targets1, ids) for m in pred)))
                return (self.weight_dict["loss_mask"] * bce + self.weight_dict["loss_ce"] * cost_class
                        + self.weight_dict["loss_dice"] * dice)
            pred, tgt = torch.stack(pred), grid_targets[None]
        pairwise_mask = _MASK_LOSSES[self.mask_loss][0]
        return (self.weight_dict["loss_mask"] * pairwise_mask(pred, tgt)
                + self.weight_dict["loss_ce"] * cost_class
                + self.weight_dict["loss_dice"] * pairwise_dice(pred, tgt))

    def layer_losses(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        num_masks: Tensor,
        *,
        indices: tuple[Tensor, Tensor, Tensor] | None = None,
        padded: PaddedTargets | None = None,
        grid_targets: Tensor | None = None,
        loss_draws: tuple[Tensor, Tensor] | None = None,
        mask_norm: float = 1.0,
    ) -> dict[str, Tensor]:
        """``loss_ce``, ``loss_mask``, ``loss_dice`` of one layer; matches it first when called on its own.

        ``mask_norm``: matched pairs per target on this layer (> 1 on one-to-many aux layers).
        """
        if indices is None:
            context = self.layer_context([(pred_logits, pred_masks)], targets)[0]
            return self.layer_losses(pred_logits, pred_masks, targets, num_masks, **context)
        masks = self.loss_masks(pred_masks, padded, grid_targets, indices, num_masks * mask_norm, loss_draws)
        quality = masks.pop("quality")
        return {"loss_ce": self.loss_labels(pred_logits, padded, indices, quality), **masks}

    def loss_labels(self, pred_logits: Tensor, padded: PaddedTargets, indices: tuple[Tensor, ...],
                    quality: Tensor | None = None) -> Tensor:
        """Weighted cross-entropy over all ``B * Q`` queries; unmatched queries target "no object".

        ``quality (N,)`` (with ``quality_targets``): a matched query's target is ``quality`` on its instance's
        class and the rest on "no object" (soft cross-entropy, the same normalisation).
        """
        batch_idx, query_idx, inst_idx = indices
        target = torch.full(pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=pred_logits.device)
        target[batch_idx, query_idx] = padded.labels[batch_idx, inst_idx]
        weight = self.empty_weight.to(pred_logits.dtype)
        if not self.quality_targets:
            return F.cross_entropy(pred_logits.transpose(1, 2), target, weight=weight)
        soft = F.one_hot(target, self.num_classes + 1).to(pred_logits.dtype if pred_logits.dtype == torch.float64
                                                          else torch.float32)
        if quality is not None and quality.numel():
            q = quality.to(soft.dtype)
            soft[batch_idx, query_idx] *= q.unsqueeze(-1)
            soft[batch_idx, query_idx, -1] += 1 - q
        return loss_ce(pred_logits, soft, self.empty_weight)

    def loss_masks(
        self,
        pred_masks: Tensor,
        padded: PaddedTargets,
        grid_targets: Tensor | None,
        indices: tuple[Tensor, ...],
        num_masks: Tensor,
        draws: tuple[Tensor, Tensor] | None,
    ) -> dict[str, Tensor]:
        """Mask terms of the ``N`` matched pairs on uncertainty-sampled points (or every location)."""
        batch_idx, query_idx, inst_idx = indices
        if batch_idx.numel() == 0:  # no instance anywhere: zero, but still attached to the graph
            zero = pred_masks.sum() * 0.0 + 0.0  # "+ 0.0" turns a -0.0 into 0.0 for logs
            return {"loss_mask": zero, "loss_dice": zero.clone(), "quality": None}
        src = pred_masks[batch_idx, query_idx]  # (N, H, W) or (N, P)
        if self._sampled(pred_masks):
            with torch.no_grad():  # the coordinates are data, not a function of the parameters
                coords = uncertainty_point_coords(src[:, None], self.num_points, self.oversample_ratio,
                                                  self.importance_sample_ratio, random_draws=draws)
                labels = point_sample(padded.masks[batch_idx, inst_idx][:, None], coords)[:, 0]
            logits = point_sample(src[:, None], coords)[:, 0]
        else:
            logits, labels = src.flatten(1), grid_targets[batch_idx, inst_idx]
        mask_fn = _MASK_LOSSES[self.mask_loss][1]
        quality = None
        if self.quality_targets:  # dice coefficient of each matched pair (Mask2Former's +1 smoothing), no grad
            with torch.no_grad():
                probs = logits.detach().float().sigmoid()
                quality = (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)
        return {"loss_mask": mask_fn(logits, labels, num_masks), "loss_dice": dice_loss(logits, labels, num_masks),
                "quality": quality}


def _repeat_columns(costs: Tensor, sizes: list[int], repeats: list[list[int]]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Costs ``(L, B, Q, K_max)`` with each layer's targets repeated ``repeats[l][b]`` times along the columns.

    Returns the costs ``(L, B, Q, M)`` (column ``j`` of image ``b`` is instance ``j mod K_b``; the rest padding)
    and the assignment shapes ``[(Q, r K_b)]`` in (layer, image) order.  Without repeats: the costs unchanged.
    """
    num_layers, batch, queries, k_max = costs.shape
    shapes = [(queries, r * k) for reps in repeats for r, k in zip(reps, sizes)]
    width = max([r * k for reps in repeats for r, k in zip(reps, sizes)] + [k_max])
    if width == k_max:
        return costs, shapes
    cols = [torch.arange(width) % max(k, 1) for k in sizes]  # host: the sizes are host ints, no sync
    index = torch.stack(cols).to(costs.device)[None, :, None, :].expand(num_layers, batch, queries, width)
    return costs.gather(-1, index), shapes


# mask_loss name -> (pairwise form for the matching cost, matched form for the loss)
_MASK_LOSSES = {"bce": (pairwise_sigmoid_bce, sigmoid_bce_loss), "brier": (pairwise_brier, brier_loss)}
