"""Set criteria for query segmentation: the shared contract, its base and the Hungarian baseline.

Every criterion consumes the same contract (docs/background.md, "Criterion interface"):

- ``outputs["pred_logits"]``: ``(B, Q, C+1)`` class logits, last column = "no object";
- ``outputs["pred_masks"]``: ``(B, Q, H, W)`` image mask logits or ``(B, Q, P)`` point-cloud mask logits;
- optional ``outputs["aux_outputs"]``: list of dicts with the same two keys (deep supervision);
- ``targets``: list of ``B`` dicts ``{"labels": LongTensor (K_i,), "masks": (K_i, H', W') or (K_i, P)}``.

``validation.py`` checks it; ``SetCriterion`` (``set_criterion.py``), the base of every criterion, validates,
normalises, runs deep supervision and sums the weighted total; ``HungarianCriterion`` (``hungarian.py``) is the
baseline.  This module is the import path of those names (``from influencerformer.losses.criterion import ...``).
"""
from __future__ import annotations

from .hungarian import HungarianCriterion, PaddedTargets, flat_indices, pad_targets
from .set_criterion import SetCriterion, base_name, reduced_num_masks, suffixed
from .validation import Layer, decoder_layers, validate_inputs

__all__ = [
    "HungarianCriterion",
    "Layer",
    "PaddedTargets",
    "SetCriterion",
    "base_name",
    "decoder_layers",
    "flat_indices",
    "pad_targets",
    "reduced_num_masks",
    "suffixed",
    "validate_inputs",
]
