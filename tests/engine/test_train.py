"""The training loop: kill-and-resume equality, the non-finite guard, logging, data order, AMP."""
import json

import pytest
import torch

from influencerformer.engine.checkpoint import list_checkpoints, load_checkpoint
from influencerformer.engine.config import ConfigError, load_config
from influencerformer.engine.train import NonFiniteLossError, TrainStream, train
from influencerformer.engine.distributed import DistInfo
from influencerformer.engine.evaluate import make_collate
from influencerformer.data import Shapes2D
from influencerformer.losses import registry

# A model small enough for a few steps per second on a shared CPU; 6 images of batch 2 = 3 steps an
# epoch, so 7 steps cross two epoch boundaries. 64 sampled points keep the criterion's RNG in play.
TINY = ["data.num_train=6", "data.num_val=2", "data.batch_size=2", "train.progress=false",
        "model.num_queries=6", "model.hidden_dim=32", "model.dim_feedforward=64", "model.mask_dim=32",
        "model.num_decoder_layers=2", "model.backbone_widths=[8,16,32,32]", "model.stem_width=8",
        "criterion.num_points=64", "optim.warmup_steps=2", "train.log_every=1", "train.device=cpu",
        "train.probe_images=2"]


def tiny(tmp_path, *extra):
    return load_config(None, TINY + [f"train.out_dir={tmp_path}", *extra])


def records(run_dir, kind=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    drop_timing = [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in recs]
    return [r for r in drop_timing if kind is None or r["kind"] == kind]


@pytest.mark.parametrize("criterion, accum", [("hungarian", 1), ("influencer", 2)])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, criterion, accum):
    extra = ["train.steps=7", "train.eval_every=3", "train.checkpoint_every=2", f"criterion.name={criterion}",
             f"train.grad_accum={accum}"]
    full = train(tiny(tmp_path / "full", *extra))
    train(tiny(tmp_path / "killed", *extra), stop_at=5)  # "killed" after step 5 (last checkpoint: 5)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [4, 5]
    resumed = train(tiny(tmp_path / "killed", *extra), resume=True)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert a["step"] == b["step"] == 7
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a["optimizer"]["state"][i][key], b["optimizer"]["state"][i][key])
                   for i in a["optimizer"]["state"])
    assert records(tmp_path / "full") == records(tmp_path / "killed")  # every logged loss and eval, step by step
    assert [p["step"] for p in resumed["curve"]] == [3, 6, 7]
    assert resumed["AP"] == full["AP"] and resumed["final_loss"] == full["final_loss"]


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, capsys):
    result = train(tiny(tmp_path, "train.steps=2"), resume=True)
    assert result["steps"] == 2 and "starting from scratch" in capsys.readouterr().out


class _NaNAfter(torch.nn.Module):
    """Wraps the Hungarian criterion; from call ``at`` on, one aux term becomes NaN."""

    def __init__(self, num_classes, at=3):
        super().__init__()
        self.inner = registry.CRITERIA["hungarian"](num_classes, num_points=64)
        self.weight_dict, self.calls, self.at = self.inner.weight_dict, 0, at

    def forward(self, outputs, targets):
        losses = self.inner(outputs, targets)
        self.calls += 1
        if self.calls >= self.at and self.training:
            losses["loss_dice_0"] = losses["loss_dice_0"] * float("nan")
            losses["loss"] = self.inner.weighted_total({k: v for k, v in losses.items() if k != "loss"})
        return losses


def test_nonfinite_guard_names_step_and_terms(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.CRITERIA, "nan_at_3", lambda num_classes, **kw: _NaNAfter(num_classes))
    cfg = tiny(tmp_path, "train.steps=6", "criterion.name=nan_at_3", "criterion.kwargs={}", "train.eval_every=0")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "step 3" in message and "loss_dice_0=nan" in message and "loss=nan" in message
    assert "loss_ce" not in message  # finite terms are not blamed
    assert max(r["step"] for r in records(tmp_path, "train")) == 2  # nothing logged for the bad step


def test_nan_model_output_is_reported_as_nonfinite(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("influencerformer.engine.train")  # the module, not the function

    real = train_module.build_model

    def poisoned(cfg, num_classes):
        model = real(cfg, num_classes)
        model.register_forward_hook(lambda m, i, out: {**out, "pred_masks": out["pred_masks"] * float("nan")})
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 1: pred_masks"):
        train(tiny(tmp_path, "train.steps=2"))


def test_logs_weighted_and_unweighted_terms_config_and_eval(tmp_path):
    result = train(tiny(tmp_path, "train.steps=4", "train.eval_every=2", "train.log_every=2"))
    assert (tmp_path / "config.yaml").is_file()
    assert load_config(tmp_path / "config.yaml") == tiny(tmp_path, "train.steps=4", "train.eval_every=2",
                                                         "train.log_every=2")
    train_recs, eval_recs = records(tmp_path, "train"), records(tmp_path, "eval")
    assert [r["step"] for r in train_recs] == [2, 4] and [r["step"] for r in eval_recs] == [2, 4]
    rec = train_recs[-1]
    for term in ("loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_1"):  # final + 2 aux layers
        assert term in rec and f"weighted/{term}" in rec
    assert rec["weighted/loss_dice_1"] == pytest.approx(5.0 * rec["loss_dice_1"])
    weighted_sum = sum(v for k, v in rec.items() if k.startswith("weighted/"))
    assert weighted_sum == pytest.approx(rec["loss"], rel=1e-5)
    for key in ("AP", "AP50", "AP75", "F1", "duplicate_rate", "no_object_queries"):
        assert 0.0 <= result[key] <= 1.0
    assert result["step_ms"] > result["loss_ms"] > 0
    assert eval_recs[1]["assignment_change"] is not None and 0 <= eval_recs[1]["assignment_change"] <= 1


def test_data_order_depends_on_seed_only(tmp_path):
    data = Shapes2D("train", preset="medium", num_images=8)
    order = {}
    for seed in (0, 0, 1):
        cfg = tiny(tmp_path, f"train.seed={seed}", "data.batch_size=2")
        stream = TrainStream(data, cfg, DistInfo(), make_collate())
        batches = stream.batches(start=0)
        order.setdefault(seed, []).append([i for _ in range(6) for i in next(batches)["image_ids"]])
    assert order[0][0] == order[0][1] and order[0][0] != order[1][0]
    first_epoch = order[0][0][:8]
    assert sorted(first_epoch) == list(range(8))  # an epoch visits every image once
    resumed = TrainStream(data, tiny(tmp_path, "data.batch_size=2"), DistInfo(), make_collate()).batches(start=3)
    assert next(resumed)["image_ids"] == order[0][0][6:8]  # micro-batch 3 onwards, without replaying 0-2


def test_evaluation_does_not_change_training(tmp_path):
    with_eval = train(tiny(tmp_path / "a", "train.steps=3", "train.eval_every=1"))
    without = train(tiny(tmp_path / "b", "train.steps=3", "train.eval_every=0"))  # evaluates at the end only
    assert with_eval["final_loss"] == without["final_loss"]
    a, b = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_on_cpu_and_fp16_rejected(tmp_path):
    result = train(tiny(tmp_path / "bf16", "train.steps=2", "train.amp=bf16"))
    assert torch.isfinite(torch.tensor(result["final_loss"]))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        train(tiny(tmp_path / "fp16", "train.steps=2", "train.amp=fp16"))


def test_tensorboard_without_package_is_a_config_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            train(tiny(tmp_path, "train.steps=1", "train.tensorboard=true"))
    else:
        train(tiny(tmp_path, "train.steps=1", "train.tensorboard=true"))
        assert any((tmp_path / "tensorboard").iterdir())
