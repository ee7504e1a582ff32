"""influencerformer: query-based segmentation trained without Hungarian matching.

The public API, as a user reaches it (primitives — mask losses, Sinkhorn, sampling, metrics, data readers —
stay in their submodules)::

    import influencerformer as inf
    criterion = inf.build_criterion("influencer", num_classes=80)   # or inf.MaskInfluencerCriterion(80, ...)
    model = inf.MaskFormer(inf.MaskFormerConfig.preset("tiny", num_classes=80))
    summary = inf.train(inf.load_config("configs/shapes2d_medium.yaml", ["train.steps=200"]))
"""

__version__ = "0.1.0"

from .engine import Config, compare, evaluate_checkpoint, load_config, train
from .losses import HungarianCriterion, InfluencerLoss, MaskInfluencerCriterion, build_criterion
from .losses.seeded import SeededCriterion
from .models import MaskFormer, MaskFormerConfig, PointModelConfig, PointQueryModel

__all__ = [
    "Config",
    "HungarianCriterion",
    "InfluencerLoss",
    "MaskFormer",
    "MaskFormerConfig",
    "MaskInfluencerCriterion",
    "PointModelConfig",
    "PointQueryModel",
    "SeededCriterion",
    "__version__",
    "build_criterion",
    "compare",
    "evaluate_checkpoint",
    "load_config",
    "train",
]
