"""The training loop: kill-and-resume equality, the non-finite guard, logging, data order, AMP."""
import json

import pytest
import torch

from influencerformer.engine.checkpoint import list_checkpoints, load_checkpoint
from influencerformer.engine.config import ConfigError, load_config
from influencerformer.engine.train import NonFiniteLossError, TrainStream, train
from influencerformer.engine.distributed import DistInfo
from influencerformer.engine.images import make_collate
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


# ------------------------------------------------------------------- nothing a user made is lost (issue 16)


def test_refuses_to_train_into_an_earlier_run(tmp_path):
    from influencerformer.engine.train import RunExistsError

    train(tiny(tmp_path, "train.steps=2"))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunExistsError, match=r"already holds a run .*--resume.*--overwrite"):
        train(tiny(tmp_path, "train.steps=2", "train.seed=1"))
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # not one file touched
    with pytest.raises(ConfigError, match="give one of them"):
        train(tiny(tmp_path, "train.steps=2"), resume=True, overwrite=True)


def test_overwrite_keeps_the_earlier_run_until_the_first_checkpoint(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("influencerformer.engine.train")
    train(tiny(tmp_path, "train.steps=2"))
    old = load_checkpoint(tmp_path)
    seen = {}
    real_save = train_module.ckpt.save_checkpoint

    def spy(run_dir, step, state, keep=2):  # what is on disk just before the new run's first checkpoint
        seen.setdefault("aside", sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()))
        return real_save(run_dir, step, state, keep)

    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", spy)
    train(tiny(tmp_path, "train.steps=3", "train.seed=1"), overwrite=True)
    assert ".replaced-0/checkpoints/step_0000002.pt" in seen["aside"]  # the old run waited aside
    assert ".replaced-0/metrics.jsonl" in seen["aside"] and "checkpoints/step_0000002.pt" not in seen["aside"]
    assert not list(tmp_path.glob(".replaced-*"))  # and went once the new run had its own checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert max(r["step"] for r in records(tmp_path)) == 3 and min(r["step"] for r in records(tmp_path)) == 1
    new = load_checkpoint(tmp_path)["model"]
    assert any(not torch.equal(new[k], old["model"][k]) for k in new)  # seed 1's weights, not the old run's


def test_overwrite_killed_before_its_first_checkpoint_loses_nothing(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("influencerformer.engine.train")
    train(tiny(tmp_path, "train.steps=2"))
    old = (tmp_path / "checkpoints" / "step_0000002.pt").read_bytes()

    def killed(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "train.steps=2", "train.seed=1"), overwrite=True)
    assert (tmp_path / ".replaced-0" / "checkpoints" / "step_0000002.pt").read_bytes() == old


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _NaNGradAt(torch.nn.Module):
    """Hungarian loss whose gradient is NaN (its value stays finite) at the training calls in ``bad``."""

    def __init__(self, num_classes, bad):
        super().__init__()
        self.inner = registry.CRITERIA["hungarian"](num_classes, num_points=64)
        self.weight_dict, self.calls, self.bad = self.inner.weight_dict, 0, bad

    def forward(self, outputs, targets):
        losses = self.inner(outputs, targets)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad:
                losses["loss"] = _NaNGrad.apply(losses["loss"])
        return losses


def test_a_nonfinite_gradient_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry.CRITERIA, "nan_grad", lambda num_classes, **kw: _NaNGradAt(num_classes, {2}))
    result = train(tiny(tmp_path, "train.steps=4", "criterion.name=nan_grad", "criterion.kwargs={}",
                        "train.eval_every=0", "train.probe_images=0"))
    assert result["skipped_steps"] == 1 and result["steps"] == 4
    assert "step 2: non-finite gradients" in capsys.readouterr().err
    assert [r["skipped_steps"] for r in records(tmp_path, "train")] == [0, 1, 1, 1]
    state = load_checkpoint(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_gradients_in_a_row_stop_the_run_and_are_never_saved(tmp_path, monkeypatch):
    from influencerformer.engine.train import MAX_NONFINITE_STEPS

    bad = set(range(3, 100))
    monkeypatch.setitem(registry.CRITERIA, "nan_grad", lambda num_classes, **kw: _NaNGradAt(num_classes, bad))
    cfg = tiny(tmp_path, "train.steps=20", "criterion.name=nan_grad", "criterion.kwargs={}", "train.eval_every=0",
               "train.checkpoint_every=2", "train.probe_images=0")
    with pytest.raises(NonFiniteLossError, match=rf"non-finite gradients in {MAX_NONFINITE_STEPS} steps in a row "
                                                 rf"\(steps 3-{2 + MAX_NONFINITE_STEPS}\), none applied"):
        train(cfg)
    state = load_checkpoint(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_weights_are_never_saved(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("influencerformer.engine.train")
    real = train_module.build_optimizer

    def poisoning(model, cfg):  # after the optimiser's 2nd step one weight is NaN
        opt = real(model, cfg)
        calls = []

        def hook(optimizer, args, kwargs):
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
        opt.register_step_post_hook(hook)
        return opt

    monkeypatch.setattr(train_module, "build_optimizer", poisoning)
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after step 2 .*not evaluated.*step_0000001"):
        train(tiny(tmp_path, "train.steps=4", "train.checkpoint_every=1", "train.eval_every=2",
                   "train.probe_images=0"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_resume_falls_back_past_damaged_and_stray_checkpoints(tmp_path, capsys):
    extra = ["train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.eval_every=0"]
    train(tiny(tmp_path, *extra), stop_at=3)
    folder = tmp_path / "checkpoints"
    good = (folder / "step_0000002.pt").read_bytes()
    (folder / "step_0000003.pt").write_bytes((folder / "step_0000003.pt").read_bytes()[:1000])  # truncated
    (folder / "step_0000009.pt").write_bytes(b"")  # empty, named like a checkpoint
    (folder / "step_12.pt").write_bytes(b"junk")  # not the checkpoint name pattern: ignored
    (folder / ".step_0000004.pt.x1.tmp").write_bytes(b"half")  # orphan of a killed save
    result = train(tiny(tmp_path, *extra), resume=True)
    err = capsys.readouterr().err
    assert f"damaged checkpoint {folder / 'step_0000009.pt'}" in err
    assert f"damaged checkpoint {folder / 'step_0000003.pt'}" in err
    assert result["steps"] == 4 and load_checkpoint(tmp_path)["step"] == 4
    assert (folder / "step_0000009.pt.damaged").exists() and (folder / "step_0000003.pt.damaged").exists()
    assert not (folder / ".step_0000004.pt.x1.tmp").exists()
    assert (folder / "step_0000002.pt").read_bytes() == good
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3, 4]


def test_resume_with_every_checkpoint_damaged_names_them(tmp_path):
    from influencerformer.engine.checkpoint import CheckpointError

    train(tiny(tmp_path, "train.steps=1"))
    (tmp_path / "checkpoints" / "step_0000001.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step_0000001.pt"):
        train(tiny(tmp_path, "train.steps=2"), resume=True)


def test_metrics_survive_a_cut_line_and_a_kill_during_the_resume_rewrite(tmp_path, monkeypatch):
    import os

    train(tiny(tmp_path, "train.steps=3", "train.checkpoint_every=2", "train.eval_every=0"), stop_at=2)
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a kill in the middle of a line
    text = path.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(tmp_path, "train.steps=3", "train.checkpoint_every=2", "train.eval_every=0"), resume=True)
    assert path.read_text() == text  # the rewrite is atomic: a kill leaves the file as it was
    train(tiny(tmp_path, "train.steps=3", "train.checkpoint_every=2", "train.eval_every=0"), resume=True)
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3]  # every line parses


def test_unwritable_or_file_run_folders_fail_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"run folder .*file exists and is not a folder"):
        train(tiny(tmp_path / "file", "train.steps=1"))
    with pytest.raises(ConfigError, match=r"run folder .*file exists and is not a folder"):
        train(tiny(tmp_path / "file" / "run", "train.steps=1"))
