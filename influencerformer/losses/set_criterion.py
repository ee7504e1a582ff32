"""The base every criterion shares: ``SetCriterion`` (validation, deep supervision, normaliser, weighted total).

The contract it enforces (what ``outputs`` and ``targets`` hold) is in ``criterion.py``'s module docstring.
``SetCriterion.forward`` validates, computes the normaliser, calls ``layer_losses`` for the final layer
(unsuffixed) and every aux layer (suffix ``_i``), and sums ``loss = sum weight_dict[base] * term`` in one place.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .timing import SectionTimer
from .validation import Layer, decoder_layers, validate_inputs


def suffixed(losses: dict[str, Tensor], layer: int | None) -> dict[str, Tensor]:
    """Name the terms of one decoder layer: the final layer keeps its names, aux layer ``i`` gets ``_i``."""
    if layer is None:
        return dict(losses)
    return {f"{name}_{layer}": value for name, value in losses.items()}


def base_name(key: str) -> str:
    """Strip an aux-layer suffix: ``loss_dice_3 -> loss_dice``; ``loss_dice -> loss_dice``."""
    stem, _, tail = key.rpartition("_")
    return stem if stem and tail.isdigit() else key


def reduced_num_masks(targets: Sequence[dict[str, Tensor]], device: torch.device) -> Tensor:
    """Normaliser: instances per rank, averaged over DDP ranks as Mask2Former does, clamped to >= 1.

    Returns a float scalar tensor on ``device``. Averaging (sum / world size) keeps the loss scale
    independent of the number of ranks while every rank divides by the same number.
    """
    num_masks = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        world_size = dist.get_world_size()
    return torch.clamp(num_masks / world_size, min=1.0)


class SetCriterion(nn.Module):
    """Base of every criterion: validation, deep supervision, normaliser and the weighted total.

    Subclasses implement ``layer_losses(pred_logits, pred_masks, targets, num_masks) -> dict`` returning
    *unweighted*, *unsuffixed* terms; every term name must appear in ``weight_dict`` (weight 0 is allowed,
    a missing name is an error so a typo never silently drops a term from the total). Subclasses that need
    work shared across layers (e.g. one batched matching pass) override ``layer_context`` to return one dict
    of extra keyword arguments per layer.

    Args:
        num_classes: number of foreground classes ``C``; logits have ``C + 1`` columns.
        weight_dict: weight of each base term name, e.g. ``{"loss_ce": 2.0, "loss_mask": 5.0}``.
        no_object_weight: class weight of the "no object" column in the classification loss.
        num_points: points sampled per mask for image masks; ``None`` = every location of the prediction grid.
        oversample_ratio, importance_sample_ratio: Mask2Former's uncertainty sampling parameters.
    """

    def __init__(
        self,
        num_classes: int,
        weight_dict: dict[str, float],
        *,
        no_object_weight: float = 0.1,
        num_points: int | None = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_points is not None and (not isinstance(num_points, int) or num_points < 1):
            raise ValueError(f"num_points must be a positive int or None, got {num_points!r}")
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        self.num_classes = num_classes
        self.weight_dict = dict(weight_dict)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        # times the assignment (Hungarian: costs + matching; transport: the Sinkhorn plan) when enabled
        self.assign_timer = SectionTimer()

    def layer_losses(
        self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]], num_masks: Tensor
    ) -> dict[str, Tensor]:
        """Unweighted, unsuffixed loss terms of one decoder layer (shapes as in the module docstring)."""
        raise NotImplementedError

    def layer_context(self, layers: list[Layer], targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Extra keyword arguments for ``layer_losses``, one dict per layer (final first); default none."""
        return [{} for _ in layers]

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """All terms of the final layer (unsuffixed) and aux layers (``_i``), plus ``"loss"``, the weighted sum."""
        layers = decoder_layers(outputs)
        validate_inputs(layers, targets, self.num_classes)
        num_masks = reduced_num_masks(targets, layers[0][0].device)
        contexts = self.layer_context(layers, targets)
        losses: dict[str, Tensor] = {}
        for i, ((logits, masks), context) in enumerate(zip(layers, contexts)):
            terms = self.layer_losses(logits, masks, targets, num_masks, **context)
            losses.update(suffixed(terms, None if i == 0 else i - 1))
        losses["loss"] = self.weighted_total(losses)
        return losses

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """``sum_key weight_dict[base_name(key)] * losses[key]`` — the only place weights are applied."""
        missing = sorted({base_name(k) for k in losses} - set(self.weight_dict))
        if missing:
            raise ValueError(f"loss terms {missing} have no weight in weight_dict (keys: {sorted(self.weight_dict)})")
        return sum(self.weight_dict[base_name(k)] * v for k, v in losses.items())
