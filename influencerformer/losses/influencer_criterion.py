"""MaskInfluencerCriterion: matching-free set criteria behind the shared ``SetCriterion`` interface.

Every form reads all masks at ``num_points`` uniform points per image, shared by all queries, instances and
decoder layers (``num_points=None``: every pixel of the prediction grid; point clouds: every point, as in
``HungarianCriterion``), so the ``(Q, K)`` pair terms of a whole batch are a few einsums.  Forms:

``"transport"`` (default; the form that beats Hungarian on the crowded preset, DESIGN.md):
    cost[q, k] = class_weight (1 - p_q(c_k)) + mask_weight BCE(q, k) + dice_weight (1 - dice(q, k)),
    plus a "no object" column.  Entropic OT (log-domain Sinkhorn, ``epsilon``, ``sinkhorn_iters``), rows =
    queries with capacity 1, columns = instances with mass 1 and the no-object column with mass ``Q - K``.
    The plan ``T (Q, K+1)`` (detached by default) weights the pair losses and gives soft class targets:
        loss_mask = sum_{q,k} T[q,k] BCE(q,k) / num_masks     loss_dice = same with 1 - dice
        loss_ce   = class-weighted soft CE with target_q = sum_k T[q,k] onehot(c_k) + T[q,K] onehot(no object)
    Decisions: the no-object column costs 0 for every query: a constant column cost never changes the plan
    (its total is fixed by the column mass), so as epsilon -> 0 the plan is exactly the Hungarian assignment;
    a per-query cost such as p(no object) would move the optimum away from Hungarian's.  K >= Q: the no-object
    column gets no mass and each instance gets mass Q / K, so the marginals stay balanced (every query is fully
    claimed).  K = 0: all mass goes to the no-object column; mask terms are 0 and every query's class target
    is "no object".  Padded instances have zero mass and exactly zero plan.
``"ownership"`` (softmax form; tied Hungarian on the toy, fails at scale — kept for comparison):
    W = softmax_q(dice(q, k) / temperature) with gradient; the same three terms with W in place of T.
``"seed"`` (the seeds' mask form; its minimum is degenerate — duplicates score below the perfect answer):
    loss_attr, loss_rep, loss_bg from ``influencer.py``; loss_cls: a query's target is the class of the
    instance it covers best (log coverage G) when its geometric-mean coverage exp(G) > ``claim_threshold``,
    else "no object"; weighted CE with ``no_object_weight``.

Documented ranges (``tests/losses/test_properties.py`` checks the perfect prediction scores strictly below
duplicates, merges, all-covering, empty, leaking and wrong-class corruptions there): transport
``epsilon`` in [0.05, 0.5] (at K = 1, an all-covering prediction whose extra queries say "no object" ties with
perfect as epsilon -> 0: like Hungarian, masks sent to the no-object column are unsupervised); ownership
``temperature`` in [0.1, 1] and seed ``temperature`` in [0.5, 2], both with known failures listed there.

After each call, ``last_assignment`` holds, per image, the query with the largest weight for each instance
(``(K_i,)`` long; plan, ownership or coverage of the final layer) and ``last_weights`` the final layer's
``(B, Q, K_max)`` weights (detached).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .criterion import Layer, PaddedTargets, SetCriterion, pad_targets
from .influencer import (
    attractive_per_instance,
    background_term,
    log_coverage,
    ownership_weights,
    repulsive_term,
    soft_class_targets,
    soft_cross_entropy,
    soft_dice_coverage,
)
from .mask_losses import pairwise_dice, pairwise_sigmoid_bce
from .sampling import point_sample, target_masks_at_prediction_grid, uniform_point_coords
from .transport import sinkhorn

__all__ = ["MaskInfluencerCriterion"]

FORMS = ("transport", "ownership", "seed")


class PointTargets(NamedTuple):
    """Targets of a batch on the shared points: padded to ``K_max`` (padding: label 0, empty mask)."""

    labels: Tensor  # (B, K) long
    masks: Tensor  # (B, K, P) float in [0, 1]
    valid: Tensor  # (B, K) bool, False for padding
    sizes: list[int]  # K_i per image


class MaskInfluencerCriterion(SetCriterion):
    """Matching-free criterion; see the module docstring for the forms and their math.

    Args:
        num_classes: foreground classes ``C``.
        form: ``"transport"`` (default), ``"ownership"`` or ``"seed"``.
        attr_weight, rep_weight, bg_weight, rep_margin, temperature, cls_weight, claim_threshold: seed form
            (``temperature`` is also the ownership softmax temperature).
        class_weight, mask_weight, dice_weight: weights of ``loss_ce``, ``loss_mask``, ``loss_dice`` and of the
            same three terms in the transport cost.
        epsilon, sinkhorn_iters: entropic regularisation (cost units) and Sinkhorn iterations.
        detach_plan: stop gradients through the plan (default); False backpropagates through the iterations.
        topk: if set, pair losses use only each instance's ``topk`` queries by plan weight (weights unchanged).
        no_object_weight, num_points: as in ``SetCriterion``.  oversample_ratio, importance_sample_ratio: accepted
            for interface parity but unused: a dense loss scores every (query, instance) pair on the same
            uniform points, and importance sampling is per mask.
    """

    def __init__(
        self, num_classes: int, *, form: str = "transport", attr_weight: float = 1.0, rep_weight: float = 1.0,
        bg_weight: float = 0.1, rep_margin: float = 1.0, temperature: float = 1.0, cls_weight: float = 0.5,
        claim_threshold: float = 0.5, no_object_weight: float = 0.1, num_points: int | None = 12544,
        epsilon: float = 0.1, sinkhorn_iters: int = 30, class_weight: float = 2.0, mask_weight: float = 5.0,
        dice_weight: float = 5.0, detach_plan: bool = True, topk: int | None = None,
        oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
        _check_options(temperature=temperature, epsilon=epsilon, sinkhorn_iters=sinkhorn_iters, topk=topk,
                       rep_margin=rep_margin)
        if form == "seed":
            weights = {"loss_attr": attr_weight, "loss_rep": rep_weight, "loss_bg": bg_weight, "loss_cls": cls_weight}
        else:
            weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        super().__init__(num_classes, weights, no_object_weight=no_object_weight, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)
        self.form, self.temperature, self.rep_margin = form, temperature, rep_margin
        self.claim_threshold = claim_threshold
        self.cost_weights = (class_weight, mask_weight, dice_weight)
        self.epsilon, self.sinkhorn_iters = epsilon, sinkhorn_iters
        self.detach_plan, self.topk = detach_plan, topk
        self.last_assignment: list[Tensor] | None = None
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ shared work of all layers
    def layer_context(self, layers: list[Layer], targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Sample points once for all layers; for ``transport``, one batched Sinkhorn over layers x images."""
        masks = layers[0][1]
        coords, point_targets = self._target_points(pad_targets(targets, masks.device), masks)
        points = [_at_least_float32(self._pred_points(m, coords)) for _, m in layers]
        contexts = [{"points": p, "point_targets": point_targets, "record": i == 0} for i, p in enumerate(points)]
        if self.form == "transport":
            pairs = [self._pair_terms(logits, p, point_targets) for (logits, _), p in zip(layers, points)]
            plans = self._plans(pairs, point_targets)
            for ctx, pair, plan in zip(contexts, pairs, plans.unbind(0)):
                ctx.update(pairs=pair, plan=plan)
        return contexts

    def layer_losses(self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]],
                     num_masks: Tensor, **context: Any) -> dict[str, Tensor]:
        """Unweighted terms of one layer; ``context`` comes from ``layer_context`` (computed here if absent)."""
        if not context:
            context = self.layer_context([(pred_logits, pred_masks)], targets)[0]
        form_losses = {"transport": self._transport_losses, "ownership": self._ownership_losses,
                       "seed": self._seed_losses}[self.form]
        return form_losses(pred_logits, num_masks, **context)

    # ------------------------------------------------------------------ points
    def _target_points(self, padded: PaddedTargets, pred_masks: Tensor) -> tuple[Tensor | None, PointTargets]:
        """Shared point coordinates ``(B, P, 2)`` (None = every location) and the targets read there.

        As in ``HungarianCriterion``: image masks use ``num_points`` uniform points (or every pixel of the
        prediction grid when ``num_points=None``); point-cloud masks always use every point.
        """
        b, k = padded.masks.shape[:2]
        device, coords = pred_masks.device, None
        if pred_masks.dim() == 3:
            masks = padded.masks
        elif self.num_points is not None:
            coords = uniform_point_coords(b, self.num_points, device)
            masks = point_sample(padded.masks, coords) if k else padded.masks.new_zeros(b, 0, self.num_points)
        else:
            spatial = tuple(pred_masks.shape[2:])
            masks = (target_masks_at_prediction_grid(padded.masks.flatten(0, 1), spatial).unflatten(0, (b, k))
                     if k else padded.masks.new_zeros(b, 0, spatial[0] * spatial[1]))
        valid = torch.arange(k, device=device) < torch.tensor(padded.sizes, device=device).unsqueeze(1)
        return coords, PointTargets(padded.labels, masks, valid, padded.sizes)

    @staticmethod
    def _pred_points(pred_masks: Tensor, coords: Tensor | None) -> Tensor:
        """Mask logits ``(B, Q, *spatial)`` at the shared points -> ``(B, Q, P)``."""
        return pred_masks.flatten(2) if coords is None else point_sample(pred_masks, coords)

    # ------------------------------------------------------------------ transport
    def _pair_terms(self, pred_logits: Tensor, points: Tensor, tgt: PointTargets) -> dict[str, Tensor]:
        """Pair terms with gradient, each ``(B, Q, K)``: ``bce``, ``dice`` (1 - dice) and ``prob`` p_q(c_k)."""
        prob = _at_least_float32(pred_logits).softmax(-1)
        index = tgt.labels.unsqueeze(1).expand(-1, prob.shape[1], -1)
        return {"bce": pairwise_sigmoid_bce(points, tgt.masks), "dice": pairwise_dice(points, tgt.masks),
                "prob": prob.gather(-1, index)}

    def _plans(self, pairs: list[dict[str, Tensor]], tgt: PointTargets) -> Tensor:
        """Transport plans of all layers in one Sinkhorn call: ``(L, B, Q, K + 1)``, last column = no object."""
        wc, wm, wd = self.cost_weights
        cost = torch.stack([wc * (1 - p["prob"]) + wm * p["bce"] + wd * p["dice"] for p in pairs])
        cost = F.pad(cost, (0, 1))  # no-object column: constant cost 0 (see module docstring)
        if self.detach_plan:
            cost = cost.detach()
        num_layers, b, q, _ = cost.shape
        sizes = torch.tensor(tgt.sizes, device=cost.device, dtype=cost.dtype).unsqueeze(1)  # (B, 1)
        instance_mass = (q / sizes.clamp_min(1)).clamp_max(1.0)  # 1, or Q/K when K > Q
        col = torch.cat([tgt.valid * instance_mass, (q - sizes).clamp_min(0)], dim=1)
        row = cost.new_ones(b, q)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_plan):
            plan = sinkhorn(cost.flatten(0, 1), row.repeat(num_layers, 1), col.repeat(num_layers, 1),
                            self.epsilon, self.sinkhorn_iters)
        return plan.unflatten(0, (num_layers, b))

    def _transport_losses(self, pred_logits: Tensor, num_masks: Tensor, *, points: Tensor, point_targets: PointTargets,
                          record: bool, pairs: dict[str, Tensor], plan: Tensor) -> dict[str, Tensor]:
        """Plan-weighted pair losses and soft-target classification of one layer."""
        weights = plan[..., :-1]  # (B, Q, K); rows of the full plan sum to 1
        if record:
            self._record(weights, point_targets.sizes)
        if self.topk is None:
            loss_mask = (weights * pairs["bce"]).sum() / num_masks
            loss_dice = (weights * pairs["dice"]).sum() / num_masks
        else:
            loss_mask, loss_dice = _topk_pair_losses(weights, points, point_targets.masks, self.topk, num_masks)
        cls_targets = soft_class_targets(weights, point_targets.labels, self.num_classes)
        loss_ce = soft_cross_entropy(pred_logits, cls_targets, self.empty_weight)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    # ------------------------------------------------------------------ ownership
    def _ownership_losses(self, pred_logits: Tensor, num_masks: Tensor, *, points: Tensor, point_targets: PointTargets,
                          record: bool) -> dict[str, Tensor]:
        """Softmax-over-queries ownership of soft-dice coverage weighting the same three terms."""
        dice = soft_dice_coverage(points, point_targets.masks)  # (B, K, Q)
        weights = ownership_weights(dice, point_targets.valid, self.temperature).transpose(1, 2)  # (B, Q, K)
        if record:
            self._record(weights, point_targets.sizes)
        loss_mask = (weights * pairwise_sigmoid_bce(points, point_targets.masks)).sum() / num_masks
        loss_dice = (weights * (1 - dice.transpose(1, 2))).sum() / num_masks
        cls_targets = soft_class_targets(weights, point_targets.labels, self.num_classes)
        loss_ce = soft_cross_entropy(pred_logits, cls_targets, self.empty_weight)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    # ------------------------------------------------------------------ seed
    def _seed_losses(self, pred_logits: Tensor, num_masks: Tensor, *, points: Tensor, point_targets: PointTargets,
                     record: bool) -> dict[str, Tensor]:
        """The seeds' terms, batched over images; items are weighted equally in rep and bg."""
        g, covered = log_coverage(points, point_targets.masks)  # (B, K, Q)
        valid = covered & point_targets.valid
        if record:
            self._record(g.exp().transpose(1, 2) * valid.unsqueeze(1), point_targets.sizes)
        attr = (attractive_per_instance(g, self.temperature) * valid).sum() / num_masks
        return {
            "loss_attr": attr,
            "loss_rep": repulsive_term(g, valid, self.rep_margin).mean(),
            "loss_bg": background_term(points, point_targets.masks).mean(),
            "loss_cls": self._claim_classification(pred_logits, g, valid, point_targets.labels),
        }

    def _claim_classification(self, pred_logits: Tensor, g: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        """CE where query q's target is the class of its best-covered instance if exp(G) > threshold."""
        b, q = pred_logits.shape[:2]
        target = torch.full((b, q), self.num_classes, dtype=torch.long, device=pred_logits.device)
        if g.shape[1]:
            best, k = g.detach().masked_fill(~valid.unsqueeze(-1), float("-inf")).max(dim=1)  # (B, Q)
            claimed = best.exp() > self.claim_threshold
            target = torch.where(claimed, labels.gather(1, k), target)
        logits = _at_least_float32(pred_logits)
        return F.cross_entropy(logits.transpose(1, 2), target, weight=self.empty_weight.to(logits.dtype))

    # ------------------------------------------------------------------ diagnostics
    def _record(self, weights: Tensor, sizes: list[int]) -> None:
        """Keep the final layer's ``(B, Q, K)`` weights and, per image, the top query of each instance."""
        self.last_weights = weights.detach()
        if weights.shape[-1]:
            top = self.last_weights.argmax(dim=1)  # (B, K); no host sync, slices below are views
        else:
            top = torch.zeros(weights.shape[0], 0, dtype=torch.long, device=weights.device)
        self.last_assignment = [top[i, :k] for i, k in enumerate(sizes)]


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision (autocast) inputs are upcast: pair losses and softmax lose too much in fp16/bf16."""
    return x if x.dtype == torch.float64 else x.float()


def _check_options(*, temperature: float, epsilon: float, sinkhorn_iters: int, topk: int | None,
                   rep_margin: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not (isinstance(sinkhorn_iters, int) and sinkhorn_iters >= 1):
        raise ValueError(f"sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
    if topk is not None and not (isinstance(topk, int) and topk >= 1):
        raise ValueError(f"topk must be None or an int >= 1, got {topk!r}")
    if not rep_margin >= 0:
        raise ValueError(f"rep_margin must be >= 0, got {rep_margin}")


def _topk_pair_losses(weights: Tensor, points: Tensor, target_masks: Tensor, topk: int,
                      num_masks: Tensor) -> tuple[Tensor, Tensor]:
    """BCE and dice losses on each instance's ``topk`` queries by weight only.

    Args:
        weights: ``(B, Q, K)`` plan; points: ``(B, Q, P)`` logits; target_masks: ``(B, K, P)``.
    Returns:
        ``(loss_mask, loss_dice)`` scalars: sums of weight x pair loss over the selected pairs / num_masks.
    """
    b, q, k = weights.shape
    top_w, top_q = weights.topk(min(topk, q), dim=1)  # (B, k', K)
    index = top_q.flatten(1).unsqueeze(-1).expand(-1, -1, points.shape[-1])
    logits = points.gather(1, index).unflatten(1, top_q.shape[1:])  # (B, k', K, P)
    tgt = target_masks.unsqueeze(1).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").mean(-1)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * tgt).sum(-1) + 1) / (probs.sum(-1) + tgt.sum(-1) + 1)
    return (top_w * bce).sum() / num_masks, (top_w * dice).sum() / num_masks
