"""SeededCriterion: OneFormer3D's sparse matcher -- a query's target is the instance its seed point lies in.

No assignment solver.  The model starts each query at a sampled point and says which (``outputs["query_seeds"]``
``(B, Q)`` long, indices into the P points; ``PointQueryModel`` with ``query_init="sampled"``).  Then:

- query ``q`` may answer only for the instance holding its seed (the first one, should masks overlap); a seed on
  no instance makes its query "no object";
- instance ``k`` keeps at most ``per_instance`` of the queries seeded in it: those of lowest matching cost
  ``class_weight (1 - p_q(c_k)) + mask_weight BCE(q, k) + dice_weight (1 - dice(q, k))`` on the layer's own
  predictions.  ``per_instance = 1`` (default) is OneFormer3D's ScanNet setting (``SparseMatcher(topk=1)`` with
  ``iter_matcher=True``: every decoder layer picks again, from the same seeds); ``per_instance = None`` keeps every
  seeded query (one-to-many);
- the picks become one-hot weights ``(B, Q, K)`` for the shared weighted terms (``weighted_terms.py``):
  ``loss_ce`` (picked queries learn their instance's class, all others "no object"), ``loss_mask`` and
  ``loss_dice`` on the picked pairs, normalised by the number of instances as every criterion here is (an
  instance without a seeded query counts there and is not supervised, like ``K > Q`` for Hungarian).

Point-cloud masks ``(B, Q, P)`` only: seeds index points.  After each call ``last_weights`` holds the final layer's
weights, ``last_assignment`` per item the picked query of each instance (-1: none) and ``last_indices`` the
``(query_idx, instance_idx)`` pairs, as ``HungarianCriterion``'s.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .pair_kernel import pair_terms
from .sampling import pad_point_masks
from .set_criterion import SetCriterion
from .validation import Layer
from .weighted_terms import class_targets, loss_ce, loss_dice, loss_mask, matching_cost

__all__ = ["SeededCriterion", "seed_owner", "top_seeded"]


def seed_owner(target_masks: Tensor, valid: Tensor, seeds: Tensor) -> Tensor:
    """``(B, Q, K)`` bool: True where instance ``k`` is the first (valid) instance whose mask holds query q's seed.

    Args:
        target_masks: ``(B, K, P)`` 0/1 floats; valid: ``(B, K)`` bool; seeds: ``(B, Q)`` long in ``[0, P)``.
    """
    hit = target_masks.gather(2, seeds.unsqueeze(1).expand(-1, target_masks.shape[1], -1)) > 0.5  # (B, K, Q)
    hit &= valid.unsqueeze(-1)
    first = hit & (hit.cumsum(1) == 1)  # one instance per seed, should masks overlap
    return first.transpose(1, 2)


def top_seeded(owner: Tensor, cost: Tensor, per_instance: int | None) -> Tensor:
    """``(B, Q, K)`` bool: for each instance, its ``per_instance`` seeded queries of lowest cost (None: all).

    Ties go to the lower query index (stable sort), so the pick is deterministic.
    """
    if per_instance is None or owner.shape[-1] == 0:
        return owner
    masked = cost.masked_fill(~owner, float("inf"))
    rank = masked.argsort(dim=1, stable=True).argsort(dim=1, stable=True)  # each query's rank within its column
    return owner & (rank < per_instance)


class SeededCriterion(SetCriterion):
    """Seed-fixed targets (see the module docstring).

    Args:
        num_classes: foreground classes ``C``.
        per_instance: queries kept per instance among those seeded in it, by lowest cost (None: all); OneFormer3D's
            ``topk`` (named apart from ``MaskInfluencerCriterion``'s ``topk``: a comparison shares criterion kwargs).
        class_weight, mask_weight, dice_weight: weights of ``loss_ce``, ``loss_mask``, ``loss_dice`` and of the
            same terms in the cost that picks among an instance's seeded queries (Mask2Former's 2, 5, 5).
        no_object_weight: class weight of "no object" in ``loss_ce``.
        num_points, oversample_ratio, importance_sample_ratio: accepted for interface parity (a config's
            criterion keyword arguments are shared by the criteria it compares); unused: every point is scored.
    """

    def __init__(self, num_classes: int, *, per_instance: int | None = 1, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int | None = None, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75) -> None:
        if per_instance is not None and not (isinstance(per_instance, int) and per_instance >= 1):
            raise ValueError(f"per_instance must be None or an int >= 1, got {per_instance!r}")
        weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        super().__init__(num_classes, weights, no_object_weight=no_object_weight, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)
        self.per_instance = per_instance
        self.cost_weights = (class_weight, mask_weight, dice_weight)
        self.last_weights: Tensor | None = None
        self._seeds: Tensor | None = None
        self._sizes: list[int] = []

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``SetCriterion.forward`` with the seeds of ``outputs["query_seeds"]`` held for this call: the base hands
        ``layer_context`` only the layers and the targets."""
        self._seeds = _checked_seeds(outputs)
        try:
            return super().forward(outputs, targets)
        finally:
            self._seeds = None

    def layer_context(self, layers: list[Layer], targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Targets read once; per layer its one-hot weights ``(B, Q, K)`` and the pair terms (with gradient) ``bce``
        and ``one_minus_dice`` (``1 - dice``, a cost), each ``(B, Q, K)``."""
        masks = layers[0][1]
        device, dtype = masks.device, torch.float64 if masks.dtype == torch.float64 else torch.float32
        self._sizes = [len(t["labels"]) for t in targets]
        labels = pad_sequence([t["labels"].to(device, torch.int64) for t in targets], batch_first=True)
        masks1 = pad_point_masks([t["masks"] for t in targets], masks.shape[-1], dtype, device, ones_row=True)
        valid = torch.arange(labels.shape[1], device=device) < torch.tensor(self._sizes, device=device)[:, None]
        owner = seed_owner(masks1[:, :-1], valid, self._seeds.to(device))
        contexts = []
        for i, (logits, layer_masks) in enumerate(layers):
            layer_masks = layer_masks if layer_masks.dtype == dtype else layer_masks.to(dtype)
            bce, one_minus_dice = pair_terms(layer_masks, None, masks1)
            with torch.no_grad(), self.assign_timer(device):
                prob = logits.detach().to(dtype).softmax(-1).gather(-1, labels[:, None, :].expand(-1, logits.shape[1], -1))
                cost = matching_cost(prob, bce, one_minus_dice, self.cost_weights)
                weights = top_seeded(owner, cost, self.per_instance).to(dtype)
            if i == 0:
                self.last_weights = weights
            contexts.append({"labels": labels, "weights": weights, "bce": bce, "one_minus_dice": one_minus_dice})
        return contexts

    def layer_losses(self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]],
                     num_masks: Tensor, *, labels: Tensor, weights: Tensor, bce: Tensor,
                     one_minus_dice: Tensor) -> dict[str, Tensor]:
        """The three weighted terms of one layer from its one-hot weights."""
        return {"loss_ce": loss_ce(pred_logits, class_targets(weights, labels, self.num_classes), self.empty_weight),
                "loss_mask": loss_mask(weights, bce, num_masks),
                "loss_dice": loss_dice(weights, one_minus_dice, num_masks)}

    @property
    def last_assignment(self) -> list[Tensor] | None:
        """Per item ``(K_i,)`` the final layer's query picked for each instance in the last call (-1: none; with
        ``per_instance > 1`` the lowest query index among the picks), as every criterion's ``last_assignment``."""
        if self.last_weights is None:
            return None
        picked = self.last_weights > 0
        first = torch.where(picked.any(1), picked.to(torch.uint8).argmax(1), -1)  # (B, K), no host sync
        return [first[b, :k] for b, k in enumerate(self._sizes)]

    @property
    def last_indices(self) -> list[tuple[Tensor, Tensor]] | None:
        """Per item ``(query_idx, instance_idx)`` of the final layer's picks in the last call (computed when read:
        ``nonzero`` is a host sync on a GPU)."""
        if self.last_weights is None:
            return None
        pairs = [self.last_weights[b, :, :k].nonzero() for b, k in enumerate(self._sizes)]
        return [(p[:, 0], p[:, 1]) for p in pairs]


def _checked_seeds(outputs: dict[str, Any]) -> Tensor:
    """``outputs["query_seeds"]`` checked against the predictions: integer ``(B, Q)``, point masks, in range (CPU)."""
    seeds = outputs.get("query_seeds") if isinstance(outputs, dict) else None
    if not isinstance(seeds, Tensor):
        raise ValueError("outputs['query_seeds']: the seeded criterion needs each query's seed point, (B, Q) long; "
                         "PointQueryModel gives it with query_init='sampled' (--set model.query_init=sampled)")
    logits, masks = outputs.get("pred_logits"), outputs.get("pred_masks")
    if isinstance(masks, Tensor) and masks.dim() != 3:
        raise ValueError(f"pred_masks: the seeded criterion needs point-cloud masks (B, Q, P), got {tuple(masks.shape)}")
    if seeds.is_floating_point() or seeds.dtype == torch.bool or (
            isinstance(logits, Tensor) and seeds.shape != logits.shape[:2]):
        shape = tuple(logits.shape[:2]) if isinstance(logits, Tensor) else "(B, Q)"
        raise ValueError(f"outputs['query_seeds']: expected integer {shape}, got {seeds.dtype} {tuple(seeds.shape)}")
    if isinstance(masks, Tensor) and seeds.device.type == "cpu" and seeds.numel():
        low, high = int(seeds.min()), int(seeds.max())
        if low < 0 or high >= masks.shape[-1]:
            raise ValueError(f"outputs['query_seeds']: point indices must be in [0, {masks.shape[-1]}), "
                             f"got [{low}, {high}]")
    return seeds.long()
