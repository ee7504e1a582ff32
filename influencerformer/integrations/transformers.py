"""Train HF transformers' Mask2Former (or MaskFormer) with our criteria: swap ``model.criterion``.

    from transformers import Mask2FormerForUniversalSegmentation
    from influencerformer.integrations.transformers import use_influencer_loss

    model = Mask2FormerForUniversalSegmentation(config)
    use_influencer_loss(model)                      # or use_hungarian_loss(model), use_criterion(model, "seed")
    loss = model(pixel_values, mask_labels=masks, class_labels=labels).loss   # our loss, with gradient

How transformers computes the loss (``Mask2FormerForUniversalSegmentation``, same in
``MaskFormerForInstanceSegmentation``): ``loss_dict = model.criterion(masks_queries_logits, class_queries_logits,
mask_labels, class_labels, auxiliary_predictions)``, then ``get_loss_dict`` multiplies, *in place*, every entry
whose key contains a key of ``model.weight_dict`` by that weight (substring match, so ``loss_dice`` also weighs
``loss_dice_3``), and ``get_loss`` sums all entries. The adapter therefore returns our criterion's unweighted,
suffixed terms (without its ``"loss"`` total, which would be counted twice) as fresh tensors, and
``model.weight_dict`` becomes our criterion's ``weight_dict`` (the same dict object): the model's loss is then
exactly our criterion's ``"loss"``.

Checkpoints: the adapter keeps the replaced criterion's ``empty_weight`` buffer as its only persistent state, so
``save_pretrained`` writes the same keys as a stock model and a stock ``from_pretrained`` loads them with no
missing or unexpected key. The criterion is not part of the config: after ``from_pretrained``, call ``use_*``
again.

transformers is imported lazily; this module imports without it (install the ``[transformers]`` extra to use it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from influencerformer.losses.criterion import base_name
from influencerformer.losses.registry import build_criterion

__all__ = ["HFCriterionAdapter", "SUPPORTED_MODELS", "use_criterion", "use_hungarian_loss", "use_influencer_loss"]

# transformers classes whose forward calls ``self.criterion(...)`` and weighs it with ``self.weight_dict``
SUPPORTED_MODELS = ("Mask2FormerForUniversalSegmentation", "MaskFormerForInstanceSegmentation")


class HFCriterionAdapter(nn.Module):
    """Our criterion behind transformers' criterion call; installed as ``model.criterion`` by ``use_criterion``.

    Args:
        criterion: a ``SetCriterion`` (``criterion(outputs, targets) -> dict`` with ``"loss"`` and a
            ``weight_dict`` keyed by base term names).
        empty_weight: the replaced HF criterion's ``empty_weight`` ``(C+1,)``, kept only so checkpoints keep
            their keys (the adapter never uses it; our criterion has its own no-object weight).

    After each call ``last_losses`` holds the criterion's full dict (unweighted terms and the weighted ``"loss"``),
    detached, for logging: transformers' model output does not return its loss dict.
    """

    def __init__(self, criterion: nn.Module, empty_weight: Tensor | None = None) -> None:
        super().__init__()
        self.criterion = criterion
        _make_buffers_non_persistent(criterion)
        if empty_weight is not None:
            self.register_buffer("empty_weight", empty_weight.detach().clone())
        self.last_losses: dict[str, Tensor] | None = None

    @property
    def weight_dict(self) -> dict[str, float]:
        """The wrapped criterion's weights (also ``model.weight_dict``), as HF's criterion exposes its own."""
        return self.criterion.weight_dict

    def forward(
        self,
        masks_queries_logits: Tensor,
        class_queries_logits: Tensor,
        mask_labels: Sequence[Tensor],
        class_labels: Sequence[Tensor],
        auxiliary_predictions: Sequence[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """transformers' criterion call -> our unweighted terms ``{"loss_ce": ..., "loss_ce_0": ..., ...}``.

        Args:
            masks_queries_logits: ``(B, Q, h, w)`` mask logits of the final decoder layer.
            class_queries_logits: ``(B, Q, C+1)`` class logits, last column = "no object".
            mask_labels: B tensors ``(K_i, H, W)``, 0/1 (binarised at 0.5: our targets are bool masks).
            class_labels: B long tensors ``(K_i,)``.
            auxiliary_predictions: one dict per earlier decoder layer with the two logits keys above.
        Returns:
            every term of the criterion except ``"loss"``, as new tensors (transformers weights them in place).
        """
        outputs, targets = hf_to_criterion_inputs(
            masks_queries_logits, class_queries_logits, mask_labels, class_labels, auxiliary_predictions)
        losses = self.criterion(outputs, targets)
        self.last_losses = {key: value.detach() for key, value in losses.items()}
        # clone: transformers multiplies each entry in place, which must not touch a tensor autograd saved
        return {key: value.clone() for key, value in losses.items() if key != "loss"}


def hf_to_criterion_inputs(
    masks_queries_logits: Tensor,
    class_queries_logits: Tensor,
    mask_labels: Sequence[Tensor],
    class_labels: Sequence[Tensor],
    auxiliary_predictions: Sequence[dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """transformers' loss inputs (shapes as in ``HFCriterionAdapter.forward``) -> our ``(outputs, targets)``."""
    if len(mask_labels) != len(class_labels):
        raise ValueError(f"mask_labels and class_labels must have one entry per image, got {len(mask_labels)} "
                         f"and {len(class_labels)}")
    outputs: dict[str, Any] = {"pred_logits": class_queries_logits, "pred_masks": masks_queries_logits}
    if auxiliary_predictions:
        outputs["aux_outputs"] = [
            {"pred_logits": aux["class_queries_logits"], "pred_masks": aux["masks_queries_logits"]}
            for aux in auxiliary_predictions
        ]
    targets = [{"labels": labels, "masks": masks > 0.5} for masks, labels in zip(mask_labels, class_labels)]
    return outputs, targets


# ------------------------------------------------------------------------------------------------ swapping


def use_criterion(model: nn.Module, criterion: str | nn.Module, **criterion_kwargs: Any) -> HFCriterionAdapter:
    """Replace ``model.criterion`` by ``criterion`` (a registered name or a built criterion); returns the adapter.

    Supported: ``Mask2FormerForUniversalSegmentation`` and ``MaskFormerForInstanceSegmentation`` (and their
    subclasses); both call ``model.criterion`` with the same five arguments and weigh its dict with
    ``model.weight_dict``. By name, the criterion is built with ``num_classes = model.config.num_labels`` and
    defaults read from the model's config, which ``criterion_kwargs`` override:

    - Mask2Former: ``class_weight``, ``mask_weight``, ``dice_weight``, ``no_object_weight``, ``num_points``
      (``train_num_points``), ``oversample_ratio``, ``importance_sample_ratio`` — so ``"hungarian"`` is
      transformers' own loss (same numbers under one seed).
    - MaskFormer: ``no_object_weight`` only. MaskFormer's own loss is a *focal* mask loss on upsampled masks
      (``mask_weight=20``); those weights do not fit our BCE/dice terms, so ours keep their defaults and
      ``"hungarian"`` here is Mask2Former's criterion, not MaskFormer's. With ``use_auxiliary_loss=True``,
      transformers' MaskFormer only builds its aux predictions when called with ``output_hidden_states=True``.

    A built criterion is used as given, except that its buffers become non-persistent (checkpoint keys, above).

    Raises:
        TypeError: the model is not a supported class (the message names both), or ``criterion_kwargs`` are
            given with a built criterion.
        ValueError: a built criterion's ``num_classes`` differs from ``model.config.num_labels``, or its
            ``weight_dict`` keys would be weighed twice by transformers' substring matching.
    """
    kind = supported_kind(model)
    num_classes = int(model.config.num_labels)
    if isinstance(criterion, str):
        criterion = build_criterion(criterion, num_classes, **{**_config_defaults(model, kind), **criterion_kwargs})
    elif criterion_kwargs:
        raise TypeError(f"criterion keyword arguments {sorted(criterion_kwargs)} only apply when the criterion is "
                        f"given by name, not as a built {type(criterion).__name__}")
    elif getattr(criterion, "num_classes", num_classes) != num_classes:
        raise ValueError(f"criterion has num_classes={criterion.num_classes}, but the model predicts "
                         f"config.num_labels={num_classes} classes")
    check_weight_keys(criterion.weight_dict)
    old_empty_weight = getattr(model.criterion, "empty_weight", None)
    adapter = HFCriterionAdapter(criterion, old_empty_weight)
    if old_empty_weight is not None:
        adapter.to(old_empty_weight.device)  # follow the model's device (the old buffer moved with it)
    model.criterion = adapter
    # the same dict object: later edits of the criterion's weights reach transformers' weighting step too
    model.weight_dict = criterion.weight_dict
    return adapter


def use_influencer_loss(model: nn.Module, **criterion_kwargs: Any) -> HFCriterionAdapter:
    """``use_criterion(model, "influencer", ...)``: ``MaskInfluencerCriterion`` (its default form; ``form=`` picks
    another), with the model-config defaults of ``use_criterion``."""
    return use_criterion(model, "influencer", **criterion_kwargs)


def use_hungarian_loss(model: nn.Module, **criterion_kwargs: Any) -> HFCriterionAdapter:
    """``use_criterion(model, "hungarian", ...)``: our ``HungarianCriterion``; on Mask2Former it equals the model's
    own ``Mask2FormerLoss`` (a baseline trained through the same code path as the influencer loss)."""
    return use_criterion(model, "hungarian", **criterion_kwargs)


def supported_kind(model: nn.Module) -> str:
    """The supported transformers class that ``model`` is an instance of; TypeError otherwise."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("influencerformer.integrations.transformers needs transformers: "
                          "pip install 'influencerformer[transformers]'") from error
    for name in SUPPORTED_MODELS:
        if isinstance(model, getattr(transformers, name)):
            return name
    raise TypeError(f"{type(model).__name__} is not supported: the criterion can be swapped on "
                    f"{' and '.join(SUPPORTED_MODELS)} (transformers models that call model.criterion)")


def check_weight_keys(weight_dict: dict[str, float]) -> None:
    """ValueError if transformers' weighting (``if key in loss_key: loss *= weight``) would weigh a term twice.

    Term keys are base names or base names with an aux-layer suffix ``_i``; each must contain exactly one
    weight key, its own base name.
    """
    for name in weight_dict:
        if base_name(name) != name:
            raise ValueError(f"weight_dict key {name!r} ends in an aux-layer suffix; keys must be base term names")
        for term in (name, f"{name}_0"):
            matches = sorted(key for key in weight_dict if key in term)
            if matches != [name]:
                raise ValueError(f"transformers weighs every loss whose key contains a weight_dict key: {term!r} "
                                 f"would be multiplied by the weights of {matches}; rename the terms")


def _config_defaults(model: nn.Module, kind: str) -> dict[str, Any]:
    """Criterion keyword defaults read from the model config (see ``use_criterion``)."""
    config = model.config
    if kind == "MaskFormerForInstanceSegmentation":
        return {"no_object_weight": config.no_object_weight}
    return {
        "class_weight": config.class_weight, "mask_weight": config.mask_weight, "dice_weight": config.dice_weight,
        "no_object_weight": config.no_object_weight, "num_points": config.train_num_points,
        "oversample_ratio": config.oversample_ratio, "importance_sample_ratio": config.importance_sample_ratio,
    }


def _make_buffers_non_persistent(module: nn.Module) -> None:
    """Re-register every buffer of ``module`` as non-persistent: the criterion's buffers (e.g. its no-object
    weight, rebuilt from its arguments) stay out of ``state_dict`` so checkpoints keep a stock model's keys."""
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(name, buffer, persistent=False)
