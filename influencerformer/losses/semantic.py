"""The semantic term of point models with a semantic head: per-point cross-entropy, added to any criterion.

OneFormer3D trains a semantic head next to its instance queries (its ``ScanNetSemanticCriterion``, weight 0.2)
and reports semantic mIoU next to instance AP.  Here the term is attached to an instance criterion with a forward
hook instead of a wrapper module: the criterion stays the same object (its class, ``last_indices``,
``assign_timer``, ``set_progress`` and state dict are untouched), and it only gains ``loss_sem`` when the
outputs carry ``sem_logits`` and every target carries ``sem_labels``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IGNORE", "add_semantic_term", "semantic_loss"]

IGNORE = -1  # semantic label of a point of no class (the readers' convention)


def semantic_loss(sem_logits: Tensor, sem_labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Mean cross-entropy over the labelled points: ``sem_logits (B, N, S)``, ``sem_labels (B, N)`` long.

    0 (with a gradient path) when no point is labelled. Labels >= S raise ValueError on the CPU and a
    device-side assert on CUDA (no host sync), naming ``model.num_semantic_classes``.
    """
    num = sem_logits.shape[-1]
    labels = sem_labels.long()
    message = (f"sem_labels: a semantic class is >= the semantic head's {num} classes; set "
               f"model.num_semantic_classes (S3DIS and rooms3d: 13, ScanNet: 20)")
    if labels.device.type == "cuda":
        torch._assert_async(labels.max() < num if labels.numel() else torch.ones((), dtype=torch.bool,
                                                                                  device=labels.device), message)
    elif labels.numel() and int(labels.max()) >= num:
        raise ValueError(f"{message}; got class {int(labels.max())}")
    logits = sem_logits if sem_logits.dtype == torch.float64 else sem_logits.float()
    flat = F.cross_entropy(logits.reshape(-1, num), labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return flat / (labels != ignore_index).sum().clamp_min(1)


def add_semantic_term(criterion: nn.Module, weight: float) -> Any:
    """Make ``criterion(outputs, targets)`` also return ``loss_sem`` and add ``weight * loss_sem`` to ``loss``
    whenever ``outputs["sem_logits"]`` (B, N, S) exists and every target has ``"sem_labels"`` (N,).

    Returns the hook's handle (``handle.remove()`` detaches the term). ``weight_dict["loss_sem"]`` records the
    weight where the criterion has a ``weight_dict``.
    """
    if hasattr(criterion, "weight_dict"):
        criterion.weight_dict["loss_sem"] = float(weight)

    def hook(module: nn.Module, args: tuple, kwargs: dict, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        outputs = args[0] if args else kwargs.get("outputs")
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if not isinstance(outputs, dict) or "sem_logits" not in outputs or not targets:
            return losses
        if not all(isinstance(t, dict) and "sem_labels" in t for t in targets):
            return losses
        labels = torch.stack([t["sem_labels"] for t in targets]).to(outputs["sem_logits"].device)
        term = semantic_loss(outputs["sem_logits"], labels)
        return {**losses, "loss_sem": term, "loss": losses["loss"] + weight * term}

    return criterion.register_forward_hook(hook, with_kwargs=True)
