"""Criteria by name, so configs and the CLI can pick a loss with a string.

Imports are lazy: building a criterion is the only moment its module is needed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn


def _hungarian(num_classes: int, **kwargs: Any) -> nn.Module:
    from .criterion import HungarianCriterion

    return HungarianCriterion(num_classes, **kwargs)


def _seeded(num_classes: int, **kwargs: Any) -> nn.Module:
    from .seeded import SeededCriterion

    return SeededCriterion(num_classes, **kwargs)


def _influencer(form: str | None) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        from .influencer_criterion import MaskInfluencerCriterion

        if form is not None:
            kwargs.setdefault("form", form)
        return MaskInfluencerCriterion(num_classes, **kwargs)

    return build


# "influencer" is MaskInfluencerCriterion with its default form (transport: see docs/results.md for the evidence).
CRITERIA: dict[str, Callable[..., nn.Module]] = {
    "hungarian": _hungarian,
    "influencer": _influencer(None),
    "transport": _influencer("transport"),
    "ownership": _influencer("ownership"),
    "seed": _influencer("seed"),
    "seeded": _seeded,  # OneFormer3D's sparse matcher: targets fixed by each query's seed point (point clouds)
}


def build_criterion(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a criterion by registered name (``hungarian``, ``influencer``, ``transport``, ``ownership``, ``seed``,
    ``seeded``)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; registered criteria: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](num_classes, **kwargs)
