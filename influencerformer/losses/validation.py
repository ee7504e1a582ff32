"""Input validation shared by every criterion: the contract of ``outputs`` and ``targets``, checked once per call.

Shapes, types and dtypes are checked on the host; finite logits and label ranges without a host sync on CUDA
(``torch._assert_async``), with a ValueError naming the field on the CPU. The contract itself is in
``criterion.py``'s module docstring.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

Layer = tuple[Tensor, Tensor]  # (pred_logits (B, Q, C+1), pred_masks (B, Q, *spatial))


def decoder_layers(outputs: dict[str, Any]) -> list[Layer]:
    """``[(pred_logits, pred_masks)]`` of the final layer, then of each ``aux_outputs`` entry in order."""
    entries = [("outputs", outputs)]
    entries += [(f"outputs['aux_outputs'][{i}]", aux) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
    for where, entry in entries:
        missing = [k for k in ("pred_logits", "pred_masks") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; expected 'pred_logits' and 'pred_masks'")
    return [(entry["pred_logits"], entry["pred_masks"]) for _, entry in entries]


def validate_inputs(layers: list[Layer], targets: Sequence[dict[str, Tensor]], num_classes: int) -> None:
    """Raise ValueError on malformed outputs/targets, naming the field.

    Shapes, types and (for non-bool target masks) the values {0, 1} are checked on the host. Finite
    logits and label ranges are checked without a host sync on CUDA (``torch._assert_async``: a bad
    value stops the next CUDA call with the field's message); on the CPU they raise ValueError.
    """
    for where, tensor in (("pred_logits", layers[0][0]), ("pred_masks", layers[0][1])):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"outputs['{where}']: expected a torch.Tensor, got {type(tensor).__name__}")
    pred_logits, pred_masks = layers[0]
    if pred_logits.dim() != 3 or pred_logits.shape[-1] != num_classes + 1:
        raise ValueError(
            f"pred_logits: expected (B, Q, num_classes + 1 = {num_classes + 1}), got {tuple(pred_logits.shape)}"
        )
    if pred_masks.dim() not in (3, 4) or pred_masks.shape[:2] != pred_logits.shape[:2]:
        raise ValueError(
            f"pred_masks: expected (B, Q, H, W) or (B, Q, P) with (B, Q) = {tuple(pred_logits.shape[:2])}, "
            f"got {tuple(pred_masks.shape)}"
        )
    if pred_logits.shape[0] == 0:
        raise ValueError(f"pred_logits: empty batch (B = 0), shape {tuple(pred_logits.shape)}; nothing to score")
    if pred_logits.shape[1] == 0:
        raise ValueError(f"pred_logits: no queries (Q = 0), shape {tuple(pred_logits.shape)}; a criterion "
                         "needs at least one query")
    if 0 in pred_masks.shape[2:]:
        raise ValueError(f"pred_masks: empty mask grid, shape {tuple(pred_masks.shape)}")
    for i, (logits, masks) in enumerate(layers[1:]):
        if not (isinstance(logits, Tensor) and isinstance(masks, Tensor)):
            raise ValueError(f"aux_outputs[{i}]: pred_logits and pred_masks must be torch.Tensors, got "
                             f"{type(logits).__name__} and {type(masks).__name__}")
        if logits.shape != pred_logits.shape or masks.shape != pred_masks.shape:
            raise ValueError(
                f"aux_outputs[{i}]: expected pred_logits {tuple(pred_logits.shape)} and pred_masks "
                f"{tuple(pred_masks.shape)}, got {tuple(logits.shape)} and {tuple(masks.shape)}"
            )
    for logits, masks in layers:
        if not (logits.is_floating_point() and masks.is_floating_point()):
            raise ValueError(f"pred_logits / pred_masks must be floating point, got {logits.dtype} / {masks.dtype}")
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"targets: expected a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != pred_logits.shape[0]:
        raise ValueError(f"targets: expected one dict per image (B = {pred_logits.shape[0]}), got {len(targets)}")
    for b, target in enumerate(targets):
        _validate_target(b, target, pred_masks)
    _check_values(layers, targets, num_classes)


def _validate_target(b: int, target: dict[str, Tensor], pred_masks: Tensor) -> None:
    """Type/shape/dtype checks of one target dict (no host sync)."""
    if not isinstance(target, dict) or "labels" not in target or "masks" not in target:
        got = sorted(target) if isinstance(target, dict) else type(target).__name__
        raise ValueError(f"targets[{b}]: expected a dict with keys 'labels' and 'masks', got {got}")
    for key in ("labels", "masks"):
        if not isinstance(target[key], Tensor):
            raise ValueError(f"targets[{b}]['{key}']: expected a torch.Tensor, got {type(target[key]).__name__} "
                             "(convert it with torch.as_tensor)")
    labels, masks = target["labels"], target["masks"]
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets[{b}]['labels']: expected an integer tensor (K,), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if not (masks.dtype == torch.bool or masks.is_floating_point() or masks.dtype in _INT_DTYPES):
        raise ValueError(f"targets[{b}]['masks']: expected bool masks (or 0/1 values), got {masks.dtype}")
    spatial = pred_masks.shape[2:]
    if masks.dim() != 1 + len(spatial) or masks.shape[0] != labels.shape[0]:
        raise ValueError(
            f"targets[{b}]['masks']: shape {tuple(masks.shape)} does not fit labels (K = {labels.shape[0]},) "
            f"and pred_masks {tuple(pred_masks.shape)}; expected (K, {'H, W' if len(spatial) == 2 else 'P'})"
        )
    if len(spatial) == 1 and masks.shape[1] != spatial[0]:
        raise ValueError(
            f"targets[{b}]['masks']: shape {tuple(masks.shape)} has P = {masks.shape[1]}, but pred_masks "
            f"{tuple(pred_masks.shape)} has P = {spatial[0]}"
        )
    if 0 in masks.shape[1:]:
        raise ValueError(f"targets[{b}]['masks']: empty mask grid, shape {tuple(masks.shape)}")


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@torch.no_grad()
def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: no NaN/Inf in ``t``. min/max propagate NaN and Inf, so one reduction pass suffices
    (``isfinite(t).all()`` allocates full-size masks and cost 25-70 ms per call at Q 200-400 on CPU)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.isfinite(lo) & torch.isfinite(hi)


@torch.no_grad()
def _binary(t: Tensor) -> Tensor:
    """0-dim bool: every value of ``t`` is 0 or 1 (NaN is neither)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    if t.is_floating_point():
        return ((t == 0) | (t == 1)).all()
    return (lo >= 0) & (hi <= 1)


def _check_values(layers: list[Layer], targets: Sequence[dict[str, Tensor]], num_classes: int) -> None:
    """Finite logits, labels in range and {0, 1} values of non-bool masks.

    CUDA: finite logits and label range are ``torch._assert_async`` (no host sync on the matching-free
    path with bool masks); only non-bool masks cost one sync. CPU: each check raises ValueError naming the
    field (the CPU has nothing to overlap, so a check costs no sync there)."""
    device = layers[0][0].device
    where = ["outputs"] + [f"outputs['aux_outputs'][{i}]" for i in range(len(layers) - 1)]
    finite = [(f"{w}['{key}']", _all_finite(t)) for w, layer in zip(where, layers)
              for key, t in zip(("pred_logits", "pred_masks"), layer)]
    if device.type == "cuda":
        torch._assert_async(torch.stack([ok for _, ok in finite]).all(),
                            "outputs: pred_logits / pred_masks (final or aux layer) contain NaN or Inf")
        labels = torch.cat([t["labels"].reshape(-1).to(device, torch.int64) for t in targets])
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"targets[i]['labels']: a class id is out of range [0, {num_classes})")
    else:
        for name, ok in finite:
            if not ok:
                raise ValueError(f"{name} contains NaN or Inf")
        for b, t in enumerate(targets):
            lab = t["labels"]
            bad = lab[(lab < 0) | (lab >= num_classes)]
            if bad.numel():
                raise ValueError(f"targets[{b}]['labels']: class id {int(bad[0])} out of range [0, {num_classes})")
    soft = [(b, t["masks"]) for b, t in enumerate(targets) if t["masks"].dtype != torch.bool]
    if soft:  # one host sync for every non-bool mask of the batch
        ok = torch.stack([_binary(m).to(device) for _, m in soft]).tolist()
        for (b, m), good in zip(soft, ok):
            if not good:
                raise ValueError(f"targets[{b}]['masks']: {m.dtype} masks must hold only 0 and 1 (values in "
                                 f"[{float(m.min()):g}, {float(m.max()):g}]); pass bool masks, e.g. masks > 0")
