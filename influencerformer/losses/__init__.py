"""Losses: Hungarian baseline and matching-free criteria on one interface, plus their building blocks.

Every criterion takes ``outputs = {"pred_logits" (B,Q,C+1), "pred_masks" (B,Q,H,W) or (B,Q,P), "aux_outputs"}``
and ``targets = [{"labels" (K,), "masks" bool (K,H',W') or (K,P)}]`` and returns named unweighted terms plus
``"loss"`` (the weighted total).
"""

from .assignment import linear_sum_assignment_batched
from .condensation import InfluencerLoss
from .criterion import HungarianCriterion, SetCriterion
from .influencer import mask_influencer_loss
from .influencer_criterion import MaskInfluencerCriterion
from .mask_losses import (
    brier_loss,
    dice_loss,
    pairwise_brier,
    pairwise_dice,
    pairwise_sigmoid_bce,
    sigmoid_bce_loss,
)
from .registry import CRITERIA, build_criterion
from .sampling import point_sample, uncertainty_point_coords, uniform_point_coords
from .transport import sinkhorn

__all__ = [
    "CRITERIA",
    "HungarianCriterion",
    "InfluencerLoss",
    "MaskInfluencerCriterion",
    "SetCriterion",
    "brier_loss",
    "build_criterion",
    "dice_loss",
    "linear_sum_assignment_batched",
    "mask_influencer_loss",
    "pairwise_brier",
    "pairwise_dice",
    "pairwise_sigmoid_bce",
    "point_sample",
    "sigmoid_bce_loss",
    "sinkhorn",
    "uncertainty_point_coords",
    "uniform_point_coords",
]
