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

Forms:

``"transport"`` (default: the only form that kept up with Hungarian on the crowded preset in DESIGN.md's runs —
    one seed, 1500 steps; the 3-seed crowded evidence with this code is still to be run, see docs/results.md):
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

Speed (transport): BCE, dice and their gradients come from one autograd node per layer (``_PairTerms``): the
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

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pad_sequence

from .criterion import Layer, SetCriterion
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
from .mask_losses import pairwise_sigmoid_bce
from .transport import sinkhorn

__all__ = ["MaskInfluencerCriterion"]

FORMS = ("transport", "ownership", "seed")


class PointTargets(NamedTuple):
    """Targets of a batch on the shared points: padded to ``K_max`` (padding: label 0, empty mask)."""

    labels: Tensor  # (B, K) long
    masks: Tensor  # (B, K, P) float in [0, 1], float32 (float64 when the predictions are); a view of:
    masks_and_ones: Tensor  # (B, K + 1, P): masks and a row of ones (row sums from the same matmuls)
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
        no_object_weight: as in ``SetCriterion``.
        num_points: image masks: distinct prediction pixels sampled per image (module docstring); ``None`` or
            at least ``H * W``: every pixel.  Point clouds always use every point.
        oversample_ratio, importance_sample_ratio: accepted for interface parity but unused: a dense loss scores
            every (query, instance) pair on the same pixels, and importance sampling is per mask.
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
        """Sample pixels once for all layers; for ``transport``, one batched Sinkhorn over layers x images."""
        masks = layers[0][1]
        index, point_targets = self._target_points(targets, masks, _compute_dtype(masks))
        contexts = [{"index": index, "point_targets": point_targets, "record": i == 0} for i in range(len(layers))]
        if self.form == "transport":
            pairs = [self._pair_terms(logits, m, index, point_targets) for logits, m in layers]
            with self.assign_timer(masks.device):  # the pair terms are the loss itself; the plan is the assignment
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
        return form_losses(pred_logits, pred_masks, num_masks, **context)

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
            masks = _pad_point_masks([t["masks"] for t in targets], pred_masks.shape[-1], dtype, device,
                                     ones_row=True)
        else:
            height, width = pred_masks.shape[2:]
            if self.num_points is not None and self.num_points < height * width:
                index = sample_pixels(len(targets), self.num_points, height, width, device)
            masks = targets_at_pixels([t["masks"] for t in targets], index, (height, width), dtype, device,
                                      ones_row=True)
        valid = torch.arange(labels.shape[1], device=device) < torch.tensor(sizes, device=device).unsqueeze(1)
        return index, PointTargets(labels, masks[:, :-1], masks, valid, sizes)

    @staticmethod
    def _pred_points(pred_masks: Tensor, index: Tensor | None) -> Tensor:
        """Mask logits ``(B, Q, *spatial)`` at the shared pixels -> ``(B, Q, P)`` (at least float32, with grad)."""
        flat = pred_masks.flatten(2)
        points = flat if index is None else flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
        return _at_least_float32(points)

    # ------------------------------------------------------------------ transport
    def _pair_terms(self, pred_logits: Tensor, pred_masks: Tensor, index: Tensor | None,
                    tgt: PointTargets) -> dict[str, Tensor]:
        """Pair terms with gradient, each ``(B, Q, K)``: ``bce``, ``dice`` (1 - dice) and ``prob`` p_q(c_k)."""
        prob = _at_least_float32(pred_logits).softmax(-1)
        gather = tgt.labels.unsqueeze(1).expand(-1, prob.shape[1], -1)
        bce, dice = _PairTerms.apply(pred_masks.flatten(2), index, tgt.masks_and_ones)
        return {"bce": bce, "dice": dice, "prob": prob.gather(-1, gather)}

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

    def _transport_losses(self, pred_logits: Tensor, pred_masks: Tensor, num_masks: Tensor, *, index: Tensor | None,
                          point_targets: PointTargets, record: bool, pairs: dict[str, Tensor],
                          plan: Tensor) -> dict[str, Tensor]:
        """Plan-weighted pair losses and soft-target classification of one layer."""
        weights = plan[..., :-1]  # (B, Q, K); rows of the full plan sum to 1
        if record:
            self._record(weights, point_targets.sizes)
        if self.topk is None:
            loss_mask = (weights * pairs["bce"]).sum() / num_masks
            loss_dice = (weights * pairs["dice"]).sum() / num_masks
        else:
            points = self._pred_points(pred_masks, index)
            loss_mask, loss_dice = _topk_pair_losses(weights, points, point_targets.masks, self.topk, num_masks)
        cls_targets = soft_class_targets(weights, point_targets.labels, self.num_classes)
        loss_ce = soft_cross_entropy(pred_logits, cls_targets, self.empty_weight)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    # ------------------------------------------------------------------ ownership
    def _ownership_losses(self, pred_logits: Tensor, pred_masks: Tensor, num_masks: Tensor, *, index: Tensor | None,
                          point_targets: PointTargets, record: bool) -> dict[str, Tensor]:
        """Softmax-over-queries ownership of soft-dice coverage weighting the same three terms."""
        points = self._pred_points(pred_masks, index)
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


def _pad_point_masks(target_masks: Sequence[Tensor], num_points: int, dtype: torch.dtype,
                     device: torch.device, *, ones_row: bool = False) -> Tensor:
    """Point-cloud target masks ``(K_i, P)`` -> ``(B, K_max, P)`` floats, padding rows 0 (``ones_row``: as above)."""
    out = _padded_rows(target_masks, num_points, dtype, device, ones_row)
    for b, masks in enumerate(target_masks):
        out[b, :masks.shape[0]] = masks.to(device)
    return out


# Locations x queries handled at once by ``_PairTerms`` on the CPU (8 MiB of float32 per chunk): the chunk's
# temporaries stay in cache and are reused, instead of fresh (B, Q, P) buffers (page faults: measured ~20 %
# faster at Q 400).  Other devices take all queries at once (fewer kernel launches).
_CPU_CHUNK_ELEMENTS = 2**21


class _PairTerms(torch.autograd.Function):
    """``bce (B, Q, K)`` and ``1 - dice (B, Q, K)`` of every pair on the shared pixels, in one autograd node.

    Same values as ``pairwise_sigmoid_bce`` / ``pairwise_dice`` on the gathered logits (up to float rounding).
    With ``x`` the logits at the pixels, ``s = sigmoid(x)``, ``t`` the targets and ``t1 = [t; 1]`` (a row of
    ones appended, so the matmuls also give the row sums)::

        bce  = (sum_p softplus(x) - x @ t^T) / P
        dice = 1 - (2 s @ t^T + 1) / (sum_p s + sum_p t + 1)
        dL/dx = s (1 - s) ([A_d, c] @ t1) + s r - A_b @ t

    with ``A_b = g_bce / P``, ``r = sum_k A_b``, ``A_d = -2 g_dice / den``, ``c = sum_k g_dice (2 I + 1) / den^2``.
    ``softplus(x) = relu(x) - log(0.5 + |s - 0.5|)`` (one ``log``; PyTorch's CPU softplus runs ``log1p``
    unvectorised; absolute error < 1e-7 per location, no overflow for any ``x``).  Only ``s`` is kept for the
    backward, and it is kept inside the buffer that becomes the gradient of ``masks`` (allocated once, in the
    forward: on the CPU each fresh (B, Q, P) buffer costs page faults); the gradient is scattered back onto the
    grid (``index`` holds distinct pixels: a plain scatter).  A second backward through the same graph
    (``retain_graph=True``) recomputes ``s`` from the saved logits.  On the CPU queries are processed in chunks
    (``_CPU_CHUNK_ELEMENTS``).  Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, masks: Tensor, index: Tensor | None, targets1: Tensor) -> tuple[Tensor, Tensor]:
        # masks (B, Q, N) logits; index (B, P) distinct pixels or None (P = N); targets1 (B, K + 1, P) = [t; 1]
        dtype = torch.promote_types(masks.dtype, torch.float32)
        (b, q, n), k, device = masks.shape, targets1.shape[1] - 1, masks.device
        p = n if index is None else index.shape[1]
        targets1 = targets1.to(dtype)
        targets1_t = targets1.transpose(1, 2)
        step = _query_chunk(b, q, p, device)
        grad_buffer = torch.empty(masks.shape, dtype=masks.dtype, device=device)  # the backward's result
        if masks.dtype == dtype:
            probs = grad_buffer[..., :p]  # s of query row q lives in the first P slots of its gradient row
        else:  # half-precision masks: s stays float32
            probs = torch.empty(b, q, p, dtype=dtype, device=device)
        cross = torch.empty(b, q, k + 1, dtype=dtype, device=device)  # x @ t1^T
        inter = torch.empty_like(cross)  # s @ t1^T
        softplus = torch.empty(b, q, 1, dtype=dtype, device=device)
        work = None
        for start in range(0, q, step):
            rows = slice(start, min(q, start + step))
            chunk = masks[:, rows]
            if index is None:
                x = chunk.to(dtype)
                fresh = x.data_ptr() != chunk.data_ptr()  # a converted copy may be overwritten
            else:
                if work is None:
                    work = torch.empty(b, step, p, dtype=masks.dtype, device=device)
                x = _gather_pixels(chunk, index, out=work[:, :chunk.shape[1]]).to(dtype)
                fresh = True
            s = torch.sigmoid(x, out=probs[:, rows])
            cross[:, rows] = torch.bmm(x, targets1_t)
            inter[:, rows] = torch.bmm(s, targets1_t)
            if fresh:  # x is no longer needed: its buffer holds the softplus temporaries
                relu = x.clamp_min_(0).sum(-1, keepdim=True)
                temp = torch.sub(s, 0.5, out=x)
            else:
                relu = x.clamp_min(0).sum(-1, keepdim=True)
                temp = s - 0.5
            softplus[:, rows] = relu - temp.abs_().add_(0.5).log_().sum(-1, keepdim=True)
        bce = (softplus - cross[..., :k]) / p
        den = inter[..., k:] + targets1[:, :k].sum(-1).unsqueeze(1) + 1  # sum_p s + sum_p t + 1
        inter = inter[..., :k]
        dice = 1 - (2 * inter + 1) / den
        ctx.save_for_backward(masks, targets1, index, den, inter)
        ctx.probs, ctx.grad_buffer, ctx.step = probs, grad_buffer, step  # not inputs/outputs: plain attributes
        return bce, dice

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bce: Tensor, grad_dice: Tensor) -> tuple[Tensor, None, None]:
        masks, targets1, index, den, inter = ctx.saved_tensors
        probs, full = ctx.probs, ctx.grad_buffer
        ctx.probs = ctx.grad_buffer = None  # the first backward turns the buffer holding s into the gradient
        recompute = full is None  # a second backward (retain_graph=True): s is recomputed from the logits
        if recompute:
            full = torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)
        (b, q), (k, p), dtype = masks.shape[:2], targets1.shape[1:], targets1.dtype
        k -= 1
        coef_bce = grad_bce.to(dtype) / p  # (B, Q, K)
        row_bce = coef_bce.sum(-1, keepdim=True)
        grad_dice = grad_dice.to(dtype)
        const = (grad_dice * (2 * inter + 1) / den.square()).sum(-1, keepdim=True)  # (B, Q, 1)
        coef_dice = torch.cat([-2 * grad_dice / den, const], dim=-1)  # (B, Q, K + 1): the ones row adds const
        targets = targets1[:, :k]
        work = torch.empty(b * min(q, ctx.step) * p, dtype=dtype, device=masks.device)  # reused by every chunk
        for start in range(0, q, ctx.step):  # rows of a chunk hold their own s until it is read here
            rows = slice(start, min(q, start + ctx.step))
            s = _sigmoid_at(masks[:, rows], index, dtype) if recompute else probs[:, rows]
            grad = work[:s.numel()].view(s.shape)
            torch.bmm(coef_dice[:, rows], targets1, out=grad)  # dL/ds through dice
            torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=grad)  # * s (1 - s)
            grad.addcmul_(s, row_bce[:, rows])
            grad.baddbmm_(coef_bce[:, rows], targets, alpha=-1)  # BCE cross term, accumulated by the matmul
            if index is None:
                full[:, rows] = grad
            else:
                full[:, rows].zero_().scatter_(2, index.unsqueeze(1).expand(-1, grad.shape[1], -1),
                                               grad.to(full.dtype))
        return full, None, None


def _gather_pixels(masks: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """``masks (B, Q, N)`` at the pixels ``index (B, P)`` -> ``(B, Q, P)`` (into ``out`` when given).

    On the CPU one ``index_select`` per image (~40 % faster than ``gather`` with an expanded index there).
    """
    if out is None:
        out = masks.new_empty(*masks.shape[:2], index.shape[1])
    if masks.device.type == "cpu":
        for b in range(masks.shape[0]):
            torch.index_select(masks[b], 1, index[b], out=out[b])
        return out
    return torch.gather(masks, 2, index.unsqueeze(1).expand(-1, masks.shape[1], -1), out=out)


def _sigmoid_at(masks: Tensor, index: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``sigmoid`` of logits ``(B, Q', N)`` at the pixels ``index`` (``(B, P)`` or None: all) in ``dtype``."""
    x = masks if index is None else _gather_pixels(masks, index)
    return torch.sigmoid(x.to(dtype))


def _query_chunk(batch: int, queries: int, points: int, device: torch.device) -> int:
    """Queries per chunk in ``_PairTerms``: all of them off the CPU, else about ``_CPU_CHUNK_ELEMENTS`` values."""
    if device.type != "cpu":
        return max(queries, 1)
    return max(1, min(queries, _CPU_CHUNK_ELEMENTS // max(1, batch * points)))


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
