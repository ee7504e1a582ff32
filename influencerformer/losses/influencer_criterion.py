"""MaskInfluencerCriterion: matching-free set criteria behind the shared ``SetCriterion`` interface.

Every form reads all masks at the same locations, shared by all queries, instances and decoder layers, so the
``(Q, K)`` pair terms of a whole batch are a few batched matmuls:

- image masks: ``num_points`` distinct pixels of the *prediction* grid per image, drawn uniformly without
  replacement (``sample_pixels``); the predictions are read there by index (no interpolation) and the targets
  at those pixels' centres (bilinear, as ``target_masks_at_prediction_grid``: the target pixel itself when the
  resolutions agree, the mean of the 2 x 2 block at twice the resolution).  When ``num_points`` is ``None`` or
  at least the number of prediction pixels, every pixel is used (exact, nothing random).  This is exactly
  ``point_sample`` of both at the sampled pixels' centres (tested).  It replaced ``num_points`` uniform
  continuous points read bilinearly from predictions and targets: ``grid_sample`` on all ``Q`` masks and its
  backward were ~60 % of the CPU time.  Both estimate the all-pixel terms (the BCE's sampled mean is unbiased
  for its all-pixel mean); the losses differ only by which locations are read.
- point clouds: every point, as in ``HungarianCriterion``.

Structure: a form is a *weight producer* -- it decides how much query ``q`` answers for instance ``k``
(``weights (B, Q, K)``, ``weights.py``) -- and one set of weighted terms (``weighted_terms.py``) turns the weights
into ``loss_ce`` / ``loss_mask`` / ``loss_dice``, as DETR's matcher hands indices to its loss terms.  The pair
terms come from one autograd kernel (``pair_kernel.py``); pixels and targets from ``sampling.py``.

Forms:

``"transport"`` (default):
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
    Levers (each an option, measured in docs/results.md): ``aux_multiplicity = m`` gives each instance column
    mass ``min(m, Q / K)`` on auxiliary layers (one-to-many; their mask terms are averaged over the instance's
    mass, their class targets are not); ``quality_targets`` multiplies the class target by the pair's dice;
    ``epsilon_end`` moves epsilon geometrically over training (``set_progress``).
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

Speed (transport): BCE, dice and their gradients come from one autograd node per layer (``pair_kernel``): the
predictions are gathered at the shared pixels, ``x @ [t; 1]^T`` and ``sigmoid(x) @ [t; 1]^T`` give the pair
terms and row sums, and the backward is two ``(Q, K) @ (K, P)`` matmuls plus in-place elementwise work,
scattered back onto the prediction grid; no ``(B, Q, K, P)`` tensor, no float64, no host sync.  These four
matmuls (~4 B Q K P multiply-adds) are the floor of the cost; on the CPU the rest is kept in cache-sized query
chunks with reused buffers.  Targets are read from the boolean masks at the sampled pixels only.  Sinkhorn runs
once for all layers and images (see ``transport.py``).

After each call, ``last_assignment`` holds, per image, the query with the largest weight for each instance
(``(K_i,)`` long; plan, ownership or coverage of the final layer) and ``last_weights`` the final layer's
``(B, Q, K_max)`` weights (detached).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .criterion import Layer, SetCriterion
from .influencer import attractive_per_instance, background_term, log_coverage, repulsive_term, soft_dice_coverage
from .mask_losses import pairwise_sigmoid_bce
from .pair_kernel import pair_terms
from .sampling import pad_point_masks, sample_pixels, targets_at_pixels
from .weighted_terms import class_targets, loss_ce, loss_dice, loss_mask, matching_cost
from .weights import instance_mass, ownership_weights, transport_weights

__all__ = ["MaskInfluencerCriterion"]

FORMS = ("transport", "ownership", "seed")


class PointTargets(NamedTuple):
    """Targets of a batch on the shared points: padded to ``K_max`` (padding: label 0, empty mask)."""

    labels: Tensor  # (B, K) long
    masks: Tensor  # (B, K, P) float in [0, 1], float32 (float64 when the predictions are); a view of:
    masks_and_ones: Tensor  # (B, K + 1, P): masks and a row of ones (row sums from the same matmuls)
    valid: Tensor  # (B, K) bool, False for padding
    sizes: list[int]  # K_i per image (host ints: known without a sync)
    counts: Tensor  # (B,) long, the same K_i on the device


class MaskInfluencerCriterion(SetCriterion):
    """Matching-free criterion; see the module docstring for the forms and their math.

    Args:
        num_classes: foreground classes ``C``.
        form: ``"transport"`` (default), ``"ownership"`` or ``"seed"``.
        attr_weight, rep_weight, bg_weight, rep_margin, temperature, claim_class_weight, claim_threshold: seed form
            (``temperature`` is also the ownership softmax temperature; ``claim_class_weight`` weighs ``loss_cls``,
            the claim loss, and was called ``cls_weight``, still accepted with a DeprecationWarning).
        class_weight, mask_weight, dice_weight: weights of ``loss_ce``, ``loss_mask``, ``loss_dice`` and of the
            same three terms in the transport cost.
        epsilon, sinkhorn_iters: entropic regularisation (cost units) and Sinkhorn iterations.
        epsilon_end: if set, epsilon moves geometrically from ``epsilon`` to ``epsilon_end`` over training
            (``set_progress``, called by the training loop): blurry early, near-Hungarian late.
        sinkhorn_epsilon_start: if set (> epsilon), each Sinkhorn call warm-starts by epsilon scaling from this
            value (``transport.sinkhorn``): with 30 plain iterations the column marginals of a trained model's
            plan are far off (docs/results.md §9); 1.0 with ``sinkhorn_iters=50`` meets them.  None = off.
        aux_multiplicity: transport: mass of each instance column on auxiliary layers (one-to-many, ``m > 1``;
            capped at ``Q / K``); the final layer stays one-to-one, so inference needs no NMS.  Default 4: the
            lever that won on the dense benchmark (docs/results.md §8); 1 = one-to-one on every layer.
        quality_targets: the class target of a query is its weight times the dice of its mask with the instance
            (the rest goes to "no object"): duplicates and poor masks learn low scores.
        detach_plan: stop gradients through the plan (default); False backpropagates through the iterations.
        topk: if set, pair losses use only each instance's ``topk`` queries by plan weight (weights unchanged).
        no_object_weight: as in ``SetCriterion``.
        num_points: image masks: distinct prediction pixels sampled per image (module docstring); ``None`` or
            at least ``H * W``: every pixel.  Point clouds always use every point.
        oversample_ratio, importance_sample_ratio: accepted for interface parity but unused: a dense loss scores
            every (query, instance) pair on the same pixels, and importance sampling is per mask.
    """

    def __init__(
        self, num_classes: int, *, form: str = "transport", attr_weight: float = 1.0, rep_weight: float = 1.0,
        bg_weight: float = 0.1, rep_margin: float = 1.0, temperature: float = 1.0, claim_class_weight: float = 0.5,
        claim_threshold: float = 0.5, no_object_weight: float = 0.1, num_points: int | None = 12544,
        epsilon: float = 0.1, sinkhorn_iters: int = 30, epsilon_end: float | None = None,
        sinkhorn_epsilon_start: float | None = None,
        aux_multiplicity: float = 4.0, quality_targets: bool = False, class_weight: float = 2.0,
        mask_weight: float = 5.0, dice_weight: float = 5.0, detach_plan: bool = True, topk: int | None = None,
        oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75, cls_weight: float | None = None,
    ) -> None:
        if cls_weight is not None:
            warnings.warn("cls_weight is deprecated: use claim_class_weight", DeprecationWarning, stacklevel=2)
            claim_class_weight = cls_weight
        if form not in FORMS:
            raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
        _check_options(temperature=temperature, epsilon=epsilon, sinkhorn_iters=sinkhorn_iters, topk=topk,
                       rep_margin=rep_margin, epsilon_end=epsilon_end, aux_multiplicity=aux_multiplicity,
                       sinkhorn_epsilon_start=sinkhorn_epsilon_start)
        if form == "seed":
            weights = {"loss_attr": attr_weight, "loss_rep": rep_weight, "loss_bg": bg_weight, "loss_cls": claim_class_weight}
        else:
            weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        super().__init__(num_classes, weights, no_object_weight=no_object_weight, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)
        self.form, self.temperature, self.rep_margin = form, temperature, rep_margin
        self.claim_threshold = claim_threshold
        self.cost_weights = (class_weight, mask_weight, dice_weight)
        self.epsilon, self.epsilon_end, self.sinkhorn_iters = epsilon, epsilon_end, sinkhorn_iters
        self.sinkhorn_epsilon_start = sinkhorn_epsilon_start
        self.aux_multiplicity, self.quality_targets = float(aux_multiplicity), bool(quality_targets)
        self.detach_plan, self.topk = detach_plan, topk
        self.progress = 0.0
        self.last_assignment: list[Tensor] | None = None
        self.last_weights: Tensor | None = None

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] (the training loop calls this each step); drives the epsilon schedule."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def current_epsilon(self) -> float:
        """``epsilon``, or the geometric schedule ``epsilon * (epsilon_end / epsilon) ** progress``."""
        if self.epsilon_end is None:
            return self.epsilon
        return self.epsilon * (self.epsilon_end / self.epsilon) ** self.progress

    # ------------------------------------------------------------------ shared work of all layers
    def layer_context(self, layers: list[Layer], targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Read the targets once for all layers; per layer the weights ``(B, Q, K)`` of its form."""
        masks = layers[0][1]
        index, tgt = self._target_points(targets, masks, _compute_dtype(masks))
        contexts = [{"index": index, "point_targets": tgt, "record": i == 0} for i in range(len(layers))]
        if self.form == "transport":
            pairs = [self._pair_terms(logits, m, index, tgt) for logits, m in layers]
            with self.assign_timer(masks.device):  # the pair terms are the loss itself; the plan is the assignment
                plans, mass = self._plans(pairs, tgt)
            for ctx, pair, plan, m in zip(contexts, pairs, plans.unbind(0), mass.unbind(0)):
                ctx.update(pairs=pair, weights=plan[..., :-1], mass=m)
        return contexts

    def layer_losses(self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]],
                     num_masks: Tensor, **context: Any) -> dict[str, Tensor]:
        """Unweighted terms of one layer; ``context`` comes from ``layer_context`` (computed here if absent)."""
        if not context:
            context = self.layer_context([(pred_logits, pred_masks)], targets)[0]
        if self.form == "seed":
            return self._seed_losses(pred_logits, pred_masks, num_masks, **context)
        if self.form == "ownership":
            context = self._ownership_context(pred_masks, **context)
        return self._weighted_losses(pred_logits, pred_masks, num_masks, **context)

    # ------------------------------------------------------------------ points
    def _target_points(self, targets: Sequence[dict[str, Tensor]], pred_masks: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor | None, PointTargets]:
        """Shared pixel indices ``(B, P)`` of the prediction grid (None = every location) and the targets there.

        Image masks: ``num_points`` distinct uniform pixels per image, or every pixel when ``num_points`` is None
        or >= H * W; targets are read at the pixels' centres.  Point-cloud masks always use every point.
        """
        device = pred_masks.device
        sizes = [len(t["labels"]) for t in targets]
        labels = pad_sequence([t["labels"].to(device, torch.int64) for t in targets], batch_first=True)
        index = None
        if pred_masks.dim() == 3:
            masks = pad_point_masks([t["masks"] for t in targets], pred_masks.shape[-1], dtype, device,
                                    ones_row=True)
        else:
            height, width = pred_masks.shape[2:]
            if self.num_points is not None and self.num_points < height * width:
                index = sample_pixels(len(targets), self.num_points, height, width, device)
            masks = targets_at_pixels([t["masks"] for t in targets], index, (height, width), dtype, device,
                                      ones_row=True)
        # built on the device from the targets' shapes (host metadata): no host-to-device copy, no sync
        valid = pad_sequence([torch.ones(k, dtype=torch.bool, device=device) for k in sizes], batch_first=True)
        counts = valid.sum(-1)
        return index, PointTargets(labels, masks[:, :-1], masks, valid, sizes, counts)

    @staticmethod
    def _pred_points(pred_masks: Tensor, index: Tensor | None) -> Tensor:
        """Mask logits ``(B, Q, *spatial)`` at the shared pixels -> ``(B, Q, P)`` (at least float32, with grad)."""
        flat = pred_masks.flatten(2)
        points = flat if index is None else flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
        return _at_least_float32(points)

    # ------------------------------------------------------------------ weight producers
    def _pair_terms(self, pred_logits: Tensor, pred_masks: Tensor, index: Tensor | None,
                    tgt: PointTargets) -> dict[str, Tensor]:
        """Pair terms with gradient, each ``(B, Q, K)``: ``bce``, ``one_minus_dice`` and ``prob`` p_q(c_k)."""
        prob = _at_least_float32(pred_logits).softmax(-1)
        gather = tgt.labels.unsqueeze(1).expand(-1, prob.shape[1], -1)
        bce, dice = pair_terms(pred_masks.flatten(2), index, tgt.masks_and_ones)
        return {"bce": bce, "one_minus_dice": dice, "prob": prob.gather(-1, gather)}

    def _plans(self, pairs: list[dict[str, Tensor]], tgt: PointTargets) -> tuple[Tensor, Tensor]:
        """Plans of all layers in one Sinkhorn call ``(L, B, Q, K + 1)`` and instance masses ``(L, B)``.

        Layer 0 is the final layer (one-to-one); auxiliary layers get ``aux_multiplicity``.
        """
        cost = torch.stack([matching_cost(p["prob"], p["bce"], p["one_minus_dice"], self.cost_weights)
                            for p in pairs])
        if self.detach_plan:
            cost = cost.detach()
        queries = cost.shape[2]
        one = instance_mass(tgt.counts, queries)
        aux = instance_mass(tgt.counts, queries, self.aux_multiplicity)
        mass = torch.stack([one] + [aux] * (len(pairs) - 1)).to(cost.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_plan):
            plan = transport_weights(cost, tgt.valid, mass, self.current_epsilon(), self.sinkhorn_iters,
                                     self.sinkhorn_epsilon_start)
        return plan, mass

    def _ownership_context(self, pred_masks: Tensor, *, index: Tensor | None, point_targets: PointTargets,
                           **context: Any) -> dict[str, Any]:
        """Softmax-over-queries ownership of soft-dice coverage, as weights with gradient and pair terms."""
        points = self._pred_points(pred_masks, index)
        dice = soft_dice_coverage(points, point_targets.masks)  # (B, K, Q)
        weights = ownership_weights(dice, point_targets.valid, self.temperature).transpose(1, 2)  # (B, Q, K)
        pairs = {"bce": pairwise_sigmoid_bce(points, point_targets.masks), "one_minus_dice": 1 - dice.transpose(1, 2)}
        return {**context, "index": index, "point_targets": point_targets, "pairs": pairs, "weights": weights}

    # ------------------------------------------------------------------ the shared weighted terms
    def _weighted_losses(self, pred_logits: Tensor, pred_masks: Tensor, num_masks: Tensor, *, index: Tensor | None,
                         point_targets: PointTargets, record: bool, pairs: dict[str, Tensor], weights: Tensor,
                         mass: Tensor | None = None) -> dict[str, Tensor]:
        """``loss_ce`` (soft or quality-aware targets), ``loss_mask`` and ``loss_dice`` from weights ``(B, Q, K)``.

        Mask terms use the weights divided by the instance mass (one-to-many layers average over an instance's
        queries); class targets use them as they are (each of an instance's queries learns its class).
        """
        if record:
            self._record(weights, point_targets.sizes)
        mask_weights = weights if mass is None else weights / mass.view(-1, 1, 1)
        if self.topk is None:
            terms = {"loss_mask": loss_mask(mask_weights, pairs["bce"], num_masks),
                     "loss_dice": loss_dice(mask_weights, pairs["one_minus_dice"], num_masks)}
        else:
            points = self._pred_points(pred_masks, index)
            bce, dice = _topk_pair_losses(mask_weights, points, point_targets.masks, self.topk, num_masks)
            terms = {"loss_mask": bce, "loss_dice": dice}
        quality = (1 - pairs["one_minus_dice"]).detach().clamp(0, 1) if self.quality_targets else None
        # as before the restructure: ownership weights keep their gradient here; a detached plan has none
        targets = class_targets(weights, point_targets.labels, self.num_classes, quality)
        return {"loss_ce": loss_ce(pred_logits, targets, self.empty_weight), **terms}

    # ------------------------------------------------------------------ seed
    def _seed_losses(self, pred_logits: Tensor, pred_masks: Tensor, num_masks: Tensor, *, index: Tensor | None,
                     point_targets: PointTargets, record: bool) -> dict[str, Tensor]:
        """The seeds' terms, batched over images; items are weighted equally in rep and bg."""
        points = self._pred_points(pred_masks, index)
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


def _compute_dtype(pred_masks: Tensor) -> torch.dtype:
    """dtype of the pair terms and of the targets on the shared points: float64 for float64 masks, else float32."""
    return torch.float64 if pred_masks.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- shared pixels


def _check_options(*, temperature: float, epsilon: float, sinkhorn_iters: int, topk: int | None,
                   rep_margin: float, epsilon_end: float | None, aux_multiplicity: float,
                   sinkhorn_epsilon_start: float | None) -> None:
    if epsilon_end is not None and not epsilon_end > 0:
        raise ValueError(f"epsilon_end must be None or > 0, got {epsilon_end}")
    if sinkhorn_epsilon_start is not None and not (0 < sinkhorn_epsilon_start < float("inf")):
        raise ValueError(f"sinkhorn_epsilon_start must be None or a finite number > 0, got {sinkhorn_epsilon_start}")
    if not aux_multiplicity >= 1:
        raise ValueError(f"aux_multiplicity must be >= 1, got {aux_multiplicity}")
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
