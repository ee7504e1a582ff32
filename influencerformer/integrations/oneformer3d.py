"""OneFormer3D drop-in: ``InfluencerCriterion`` in mmdet3d's ``MODELS`` registry, in place of ``InstanceCriterion``.

In a OneFormer3D config (see ``configs/s3dis``, ``configs/scannet`` and ``docs/integration_guide.md``)::

    custom_imports = dict(imports=["oneformer3d", "influencerformer.integrations.oneformer3d"],
                          allow_failed_imports=False)
    model = dict(criterion=dict(inst_criterion=dict(
        _delete_=True, type="InfluencerCriterion", num_classes=13, loss_weight=[0.5, 1.0], non_object_weight=0.05)))

OneFormer3D's contract (its ``InstanceCriterion``): ``criterion(pred, insts) -> {"inst_loss": Tensor}`` with, per
scene ``i`` of the batch, ``pred["cls_preds"][i]`` ``(Q_i, C+1)``, ``pred["masks"][i]`` ``(Q_i, P_i)`` mask logits
over voxels (S3DIS) or superpoints (ScanNet), ``pred["scores"]`` a list of ``(Q_i, 1)`` objectness logits (entries
may be None) or None, optional ``pred["aux_outputs"]`` (list of dicts with the same keys, one per earlier decoder
layer, summed), and ``insts[i]`` an ``InstanceData`` (or a plain dict) with ``sp_masks`` ``(K_i, P_i)``,
``labels_3d`` ``(K_i,)`` and optional ``query_masks`` ``(K_i, Q_i)``. ``K_i`` may be 0. Other keys are ignored.

How the library's loss is reused (no second implementation): ``Q_i`` and ``P_i`` differ between scenes, and
padding would change the loss (padded queries would take transport mass, padded points would dilute the BCE and
background means), so ``MaskInfluencerCriterion`` runs once per scene on a batch of one, over every point, all
decoder layers in that one call. The scene total is re-weighted in two groups on top of the library's own
``weight_dict`` -- ``loss_weight[0]`` x its classification terms (``loss_ce`` / ``loss_cls``) and
``loss_weight[1]`` x all its mask terms -- and averaged over scenes, as OneFormer3D averages its losses over scenes.

Keys, and the forms they act on (``form`` defaults to the library's default, ``"transport"``)::

    every form   num_classes, loss_weight=[cls, influencer], non_object_weight, form, score_weight
    transport    epsilon, sinkhorn_iters, sinkhorn_epsilon_start, aux_multiplicity, quality_targets,
                 class_weight, mask_weight, dice_weight, detach_plan, topk
                 (not ``epsilon_end``: mmengine's loop does not call ``set_progress``)
    ownership    temperature, class_weight, mask_weight, dice_weight
    seed         attr_weight, rep_weight, bg_weight, rep_margin, temperature, claim_threshold

Keys of another form are accepted and unused, so one config can switch ``form`` from the command line; the
guide's per-dataset ``bg_weight`` therefore only acts with ``form="seed"``. Unknown keys raise a TypeError that
lists the valid keys.

Objectness (``scores``): OneFormer3D multiplies class scores by the predicted objectness at test time (S3DIS
config), so the score head must be trained. As in ``InstanceCriterion``, a query's score regresses (MSE) the IoU
of its binarised mask with an instance when that IoU > 0.5 -- here the best IoU over all instances, since there is
no matching -- weighted by ``score_weight`` (OneFormer3D's fourth loss weight, 0.5), summed over layers, averaged
over scenes. ``query_masks`` (which queries lie inside which instance, used by OneFormer3D's ``SparseMatcher``) is
accepted and unused: the library's assignment has no per-pair restriction.

DDP: the library averages each call's instance count over ranks, i.e. one collective per scene, so every rank
must see the same number of scenes per step (mmengine's ``DefaultSampler`` pads ranks to equal length).

Importing this module never needs mmengine or mmdet3d: ``MODELS`` is mmdet3d's registry when ``mmdet3d`` imports,
else an mmengine ``Registry("model", scope="mmdet3d")`` stand-in, else None; ``REGISTRY_KIND`` says which and
``REGISTRY_ERROR`` why a better one was not available.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from influencerformer.losses.criterion import base_name
from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion

__all__ = ["FORM_KEYS", "MODELS", "REGISTRY_ERROR", "REGISTRY_KIND", "InfluencerCriterion", "build_from_registry",
           "make_synthetic_inputs"]

COMMON_KEYS = ("num_classes", "loss_weight", "non_object_weight", "form", "score_weight")
FORM_KEYS = {
    "transport": ("epsilon", "sinkhorn_iters", "sinkhorn_epsilon_start", "aux_multiplicity", "quality_targets",
                  "class_weight", "mask_weight", "dice_weight", "detach_plan", "topk"),
    "ownership": ("temperature", "class_weight", "mask_weight", "dice_weight"),
    "seed": ("attr_weight", "rep_weight", "bg_weight", "rep_margin", "temperature", "claim_threshold"),
}
CLASS_TERMS = ("loss_ce", "loss_cls")  # the library's classification terms, scaled by loss_weight[0]
SCORE_IOU_THRESHOLD = 0.5  # InstanceCriterion supervises objectness only where the mask IoU exceeds this


def _load_registry() -> tuple[Any, str | None, str | None]:
    """``(registry, kind, error)``: mmdet3d's MODELS, else an mmengine stand-in with scope "mmdet3d", else None."""
    try:
        from mmdet3d.registry import MODELS as registry

        return registry, "mmdet3d", None
    except Exception as err:  # noqa: BLE001 -- mmdet3d raises AssertionError on version mismatch, not ImportError
        error = f"mmdet3d.registry not importable ({type(err).__name__}: {err})"
    try:
        from mmengine.registry import Registry
    except Exception as err:  # noqa: BLE001
        return None, None, f"{error}; mmengine not importable ({type(err).__name__}: {err})"
    return Registry("model", scope="mmdet3d"), "mmengine", error


MODELS, REGISTRY_KIND, REGISTRY_ERROR = _load_registry()


class InfluencerCriterion:
    """OneFormer3D instance criterion backed by ``MaskInfluencerCriterion`` (keys: module docstring).

    A plain object, like OneFormer3D's criteria: they are held by plain ``*UnifiedCriterion`` objects, so the model
    never moves them between devices; the library module (its no-object class weight is a buffer) follows the
    predictions' device at each call instead.

    Args:
        num_classes: instance classes ``C``; ``cls_preds`` have ``C + 1`` columns (last = no object).
        loss_weight: ``[cls, influencer]`` scales of the library's classification and mask terms.
        non_object_weight: class weight of "no object" in the classification loss.
        form: ``"transport"`` (default, the library's), ``"ownership"`` or ``"seed"``.
        score_weight: weight of the objectness regression (0 turns it off).
        **options: the form keys listed in the module docstring, passed to ``MaskInfluencerCriterion``.
    """

    def __init__(self, num_classes: int, loss_weight: Sequence[float] = (0.5, 1.0), non_object_weight: float = 0.1,
                 form: str | None = None, score_weight: float = 0.5, **options: Any) -> None:
        valid = set(COMMON_KEYS).union(*FORM_KEYS.values())
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"InfluencerCriterion: unknown keys {unknown}; valid keys: {', '.join(sorted(valid))}")
        if len(loss_weight) != 2:
            raise ValueError(f"loss_weight: expected [cls, influencer] (2 numbers), got {list(loss_weight)}; "
                             "OneFormer3D's 4-weight list belongs to its InstanceCriterion")
        if form is not None:
            options["form"] = form
        if options.get("form", "transport") == "seed":
            options["claim_class_weight"] = 1.0  # the seed form's class weight; loss_weight[0] scales it here
        self.criterion = MaskInfluencerCriterion(num_classes, no_object_weight=non_object_weight, num_points=None,
                                                 **options)
        self.num_classes, self.form = num_classes, self.criterion.form
        self.loss_weight = (float(loss_weight[0]), float(loss_weight[1]))
        self.score_weight = float(score_weight)

    def __call__(self, pred: Mapping[str, Any], insts: Sequence[Any]) -> dict[str, Tensor]:
        """OneFormer3D's call (shapes in the module docstring) -> ``{"inst_loss": scalar with gradient}``."""
        layers = [pred] + list(pred.get("aux_outputs") or [])
        _check_batch(layers, insts, self.num_classes)
        device = pred["cls_preds"][0].device
        self.criterion.to(device)  # no-op after the first call
        scene_losses = [self._scene_loss(layers, i, insts[i]) for i in range(len(insts))]
        return {"inst_loss": torch.stack(scene_losses).mean()}

    def _scene_loss(self, layers: list[Mapping[str, Any]], i: int, inst: Any) -> Tensor:
        """Weighted loss of scene ``i`` over all decoder layers (final layer first)."""
        labels, masks = _field(inst, "labels_3d"), _field(inst, "sp_masks")
        target = {"labels": labels.to(torch.int64), "masks": masks if masks.dtype == torch.bool else masks > 0.5}
        outputs = _scene_outputs(layers, i)
        terms = self.criterion(outputs, [target])
        cls_part = sum(self.criterion.weight_dict[base_name(k)] * v for k, v in terms.items()
                       if k != "loss" and base_name(k) in CLASS_TERMS)
        mask_part = terms["loss"] - cls_part  # every other weighted term, taken from the library's own total
        loss = self.loss_weight[0] * cls_part + self.loss_weight[1] * mask_part
        if self.score_weight:
            loss = loss + self.score_weight * sum(_score_loss(layer, i, target["masks"]) for layer in layers)
        return loss


def _scene_outputs(layers: list[Mapping[str, Any]], i: int) -> dict[str, Any]:
    """Scene ``i`` in the library's contract: a batch of one, ``(1, Q_i, C+1)`` and ``(1, Q_i, P_i)`` views."""
    final, *aux = [{"pred_logits": layer["cls_preds"][i][None], "pred_masks": layer["masks"][i][None]}
                   for layer in layers]
    return {**final, "aux_outputs": aux}


def _score_loss(layer: Mapping[str, Any], i: int, target_masks: Tensor) -> Tensor:
    """Objectness MSE of scene ``i`` in one layer: ``scores (Q, 1)`` vs best mask IoU where it exceeds 0.5.

    Returns a scalar: the mean squared error over the queries that pass, 0 when none does or the layer has no
    scores (masked mean rather than indexing, so there is no host sync).
    """
    masks, scores = layer["masks"][i], layer.get("scores")
    scores = None if scores is None else scores[i]
    if scores is None or target_masks.shape[0] == 0:
        return masks.new_zeros(())
    with torch.no_grad():  # the target is a measurement of the mask, not a path for its gradient
        binary, tgt = (masks >= 0).float(), target_masks.float()  # sigmoid >= 0.5, as InstanceCriterion
        inter = binary @ tgt.T  # (Q, K)
        union = binary.sum(1, keepdim=True) + tgt.sum(1) - inter
        best = (inter / (union + 1e-6)).max(dim=1).values  # (Q,)
        keep = (best > SCORE_IOU_THRESHOLD).float()
    squared = (scores[:, 0].float() - best) ** 2
    return (squared * keep).sum() / keep.sum().clamp_min(1.0)


def _field(inst: Any, name: str) -> Any:
    """Attribute of an ``InstanceData`` or key of a dict; None if absent."""
    return inst.get(name) if isinstance(inst, Mapping) else getattr(inst, name, None)


def _check_batch(layers: list[Mapping[str, Any]], insts: Sequence[Any], num_classes: int) -> None:
    """Raise ValueError, naming the scene and layer, unless every list fits OneFormer3D's contract."""
    if len(insts) == 0:
        raise ValueError("insts: expected one InstanceData per scene, got an empty list")
    for name, layer in zip(["pred"] + [f"pred['aux_outputs'][{j}]" for j in range(len(layers) - 1)], layers):
        cls_preds, masks = layer.get("cls_preds"), layer.get("masks")
        scores = layer.get("scores") or [None] * len(insts)
        if any(x is None or len(x) != len(insts) for x in (cls_preds, masks, scores)):
            raise ValueError(f"{name}: expected lists 'cls_preds', 'masks' (and 'scores' or None) with one entry per "
                             f"scene ({len(insts)} scenes)")
        for i, (logits, mask, score) in enumerate(zip(cls_preds, masks, scores)):
            _check_scene(f"{name}, scene {i}", logits, mask, score, insts[i], num_classes)


def _check_scene(where: str, logits: Tensor, masks: Tensor, scores: Tensor | None, inst: Any,
                 num_classes: int) -> None:
    labels, sp_masks = _field(inst, "labels_3d"), _field(inst, "sp_masks")
    if labels is None or sp_masks is None:
        raise ValueError(f"{where}: insts need 'sp_masks' (K, P) and 'labels_3d' (K,)")
    if logits.dim() != 2 or logits.shape[1] != num_classes + 1:
        raise ValueError(f"{where}: cls_preds expected (Q, num_classes + 1 = {num_classes + 1}), "
                         f"got {tuple(logits.shape)}")
    if masks.dim() != 2 or masks.shape[0] != logits.shape[0]:
        raise ValueError(f"{where}: masks expected (Q = {logits.shape[0]}, P), got {tuple(masks.shape)}")
    if scores is not None and scores.shape != (logits.shape[0], 1):
        raise ValueError(f"{where}: scores expected (Q = {logits.shape[0]}, 1), got {tuple(scores.shape)}")
    if sp_masks.dim() != 2 or sp_masks.shape != (labels.shape[0], masks.shape[1]):
        raise ValueError(f"{where}: sp_masks expected (K = {labels.shape[0]}, P = {masks.shape[1]}), "
                         f"got {tuple(sp_masks.shape)}")


def build_from_registry(cfg: Mapping[str, Any]) -> tuple[Any, str]:
    """Build ``cfg`` (``type`` + keys) through ``MODELS``; returns ``(object, how)``.

    ``how`` is ``"MODELS.build"``, or ``"registry lookup"`` where mmdet3d's registry is importable but
    ``MODELS.build`` cannot run because it first imports ``mmdet3d.models``, which needs numba and mmcv's compiled
    ops (absent with mmcv-lite): the class is then read from ``MODELS.module_dict`` and called with the keys.
    """
    if MODELS is None:
        raise ImportError(f"no registry available: {REGISTRY_ERROR}")
    cfg = dict(cfg)
    try:
        return MODELS.build(cfg), "MODELS.build"
    except ImportError:
        if REGISTRY_KIND != "mmdet3d" or _mmdet3d_models_importable():
            raise
    cls = MODELS.module_dict.get(cfg.pop("type"))
    if cls is None:
        raise KeyError(f"not registered in {MODELS.scope}::{MODELS.name}; registered: {sorted(MODELS.module_dict)}")
    return cls(**cfg), "registry lookup"


def _mmdet3d_models_importable() -> bool:
    try:
        import mmdet3d.models  # noqa: F401
    except ImportError:
        return False
    return True


def make_synthetic_inputs(num_classes: int, style: str = "s3dis", num_scenes: int = 2, num_aux: int = 2,
                          seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """OneFormer3D-shaped ``(pred, insts)`` for checks; tensors of ``pred`` require grad.

    ``style="s3dis"``: 40 learned queries over voxels, ``scores`` given; ``"scannet"``: queries are a random subset
    of the superpoints, ``scores=None``, ``query_masks`` given. Scenes differ in ``Q_i`` and ``P_i``; the last scene
    has no instance. ``insts`` are plain dicts (wrap them in ``InstanceData(**d)`` to mimic mmengine).
    """
    if style not in ("s3dis", "scannet"):
        raise ValueError(f"style: expected 's3dis' or 'scannet', got {style!r}")
    gen = torch.Generator().manual_seed(seed)
    insts, num_queries = [], []
    for i in range(num_scenes):
        num_points, num_inst = 150 + 37 * i, (0 if i == num_scenes - 1 and num_scenes > 1 else 3 + i)
        owner = torch.randint(-1, max(num_inst, 1), (num_points,), generator=gen)  # -1 = background point
        masks = owner[None] == torch.arange(num_inst)[:, None]
        inst = {"sp_masks": masks, "labels_3d": torch.randint(0, num_classes, (num_inst,), generator=gen)}
        num_queries.append(40 if style == "s3dis" else num_points // 2)
        if style == "scannet":  # OneFormer3D's ScanNet queries: a random subset of the superpoints
            inst["query_masks"] = masks[:, torch.randperm(num_points, generator=gen)[:num_queries[-1]]]
        insts.append(inst)

    def layer() -> dict[str, Any]:
        masks = [torch.randn(q, m["sp_masks"].shape[1], generator=gen) * 2 for q, m in zip(num_queries, insts)]
        for mask, inst in zip(masks, insts):  # query k ~ instance k, so some masks pass the objectness IoU filter
            k = inst["sp_masks"].shape[0]
            mask[:k] = torch.where(inst["sp_masks"], 3.0, -3.0) + torch.randn(k, mask.shape[1], generator=gen)
        scores = [torch.randn(q, 1, generator=gen).requires_grad_() for q in num_queries]
        return {"cls_preds": [torch.randn(q, num_classes + 1, generator=gen).requires_grad_() for q in num_queries],
                "masks": [m.requires_grad_() for m in masks], "scores": scores if style == "s3dis" else None}

    pred = layer()
    pred["aux_outputs"] = [layer() for _ in range(num_aux)]
    return pred, insts


if MODELS is not None:
    MODELS.register_module(module=InfluencerCriterion)
