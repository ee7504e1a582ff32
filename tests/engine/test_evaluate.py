"""Evaluation output is strict JSON: undefined metrics are null with a reason (issue 16)."""
import json

import torch

from influencerformer.engine.evaluate import UNDEFINED, json_safe


def test_json_safe_turns_nan_into_null_with_a_reason():
    metrics = {"AP": float("nan"), "AP50": 0.5, "F1": float("inf"), "step": 3, "checkpoint": "x"}
    safe = json_safe(metrics)
    assert safe == {"AP": None, "AP50": 0.5, "F1": None, "step": 3, "checkpoint": "x",
                    "undefined": {"AP": UNDEFINED, "F1": UNDEFINED}}
    json.dumps(safe, allow_nan=False)
    assert json_safe({"AP": 0.1}) == {"AP": 0.1}  # nothing undefined: no extra key


def test_point_scenes_without_instances_give_null_ap(tmp_path):
    from influencerformer.data.pointcloud import write_preprocessed
    from influencerformer.data.rooms3d import Rooms3D
    from influencerformer.engine.build import build_model
    from influencerformer.engine.config import DatasetInfo, load_config
    from influencerformer.engine.points import PointEvaluator, build_point_dataset

    scene = Rooms3D("train", num_scenes=1, points_per_room=(300, 400))[0]
    write_preprocessed({**scene, "instance_labels": torch.full_like(scene["instance_labels"], -1)}, tmp_path,
                       "Area_5_office_1")
    ds = build_point_dataset("s3dis", str(tmp_path), "val", num_scenes=None, seed=0, points_per_room=(300, 400),
                             strict=True)
    info = DatasetInfo(len(ds.class_names), ds.class_names, list(range(len(ds.class_names))))
    cfg = load_config(None, ["data.name=rooms3d", "model.num_queries=4", "model.hidden_dim=16",
                             "model.dim_feedforward=32", "model.num_decoder_layers=1", "model.nheads=2"])
    metrics = json_safe(PointEvaluator(ds, info)(build_model(cfg, info.num_classes)))
    assert metrics["AP"] is None and metrics["AP25"] is None and "no ground-truth" in metrics["undefined"]["AP"]
    json.dumps(metrics, allow_nan=False)
