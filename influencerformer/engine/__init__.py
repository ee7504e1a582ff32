"""Training engine: typed config, the training loop, evaluation, checkpoints, DDP and criterion comparison.

    from influencerformer.engine import load_config, train, compare
    cfg = load_config("configs/shapes2d_tiny.yaml", ["train.steps=100"])
    summary = train(cfg)                       # final metrics, curve, timings
    compare(cfg, ["hungarian", "influencer"], seeds=[0], out_dir="runs/compare")
"""
from .checkpoint import latest_checkpoint, load_checkpoint
from .compare import compare
from .config import Config, ConfigError, CriterionConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .build import build_criterion, build_dataset, build_model, evaluate_checkpoint, load_trained, modality
from .images import Evaluator, predict_instances
from .points import PointEvaluator
from .train import NonFiniteLossError, train

__all__ = [
    "Config",
    "ConfigError",
    "CriterionConfig",
    "DataConfig",
    "Evaluator",
    "PointEvaluator",
    "build_criterion",
    "build_dataset",
    "build_model",
    "modality",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "TrainConfig",
    "compare",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_trained",
    "predict_instances",
    "train",
]
