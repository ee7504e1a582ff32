"""OneFormer3D drop-in: InfluencerCriterion's call contract, registry, configs, verify tool and scripts.

The criterion tests need neither mmengine nor mmdet3d (insts are plain dicts). Registry and config tests use
mmdet3d's real ``MODELS`` when it imports, else mmengine's stand-in registry (scope "mmdet3d"); the test that
needs ``MODELS.build`` itself (mmcv's compiled ops) runs only where they are installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from influencerformer.integrations import oneformer3d
from influencerformer.integrations.oneformer3d import InfluencerCriterion, make_synthetic_inputs
from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion

REPO = Path(__file__).resolve().parents[2]
FIXTURE_ROOT = Path(__file__).resolve().parent / "fixtures" / "oneformer3d"  # stand-in ONEFORMER3D_ROOT
CONFIGS = {"s3dis": REPO / "configs/s3dis/influencerformer_1xb2_s3dis-area-5.py",
           "scannet": REPO / "configs/scannet/influencerformer_1xb4_scannet.py"}
BASELINES = {"s3dis": REPO / "configs/s3dis/oneformer3d_1xb2_s3dis-area-5.py",
             "scannet": REPO / "configs/scannet/oneformer3d_1xb4_scannet.py"}
NUM_CLASSES = {"s3dis": 13, "scannet": 18}


# ----------------------------------------------------------------------------------------------- inputs
def scene(num_queries: int, num_points: int, num_inst: int, num_classes: int, gen: torch.Generator,
          scores: bool, superpoint_queries: bool) -> tuple[dict, dict]:
    """One scene: prediction tensors (leaf, requires grad) and its instances as a plain dict."""
    owner = torch.randint(-1, max(num_inst, 1), (num_points,), generator=gen)  # -1: background
    masks = owner[None] == torch.arange(num_inst)[:, None]
    inst = {"sp_masks": masks, "labels_3d": torch.randint(0, num_classes, (num_inst,), generator=gen)}
    if superpoint_queries:  # ScanNet: every query is a superpoint, query_masks says which instance holds it
        inst["query_masks"] = masks[:, torch.randperm(num_points, generator=gen)[:num_queries]]
    masks_logits = torch.randn(num_queries, num_points, generator=gen) * 2
    masks_logits[:num_inst] = torch.where(masks, 3.0, -3.0)  # query k ~ instance k: objectness gets supervised
    pred = {"cls_preds": torch.randn(num_queries, num_classes + 1, generator=gen).requires_grad_(),
            "masks": masks_logits.requires_grad_(),
            "scores": torch.randn(num_queries, 1, generator=gen).requires_grad_() if scores else None}
    return pred, inst


def batch(style: str, num_aux: int = 2, seed: int = 0) -> tuple[dict, list[dict]]:
    """OneFormer3D-shaped batch of 3 scenes, the last without instances.

    s3dis: 400 learned queries over voxels, ``scores`` per scene; scannet: queries = a subset of the superpoints
    (Q_i differs per scene), ``scores=None``, ``query_masks`` present.
    """
    gen = torch.Generator().manual_seed(seed)
    c = NUM_CLASSES[style]
    sizes = [(400, 300, 5), (400, 420, 9), (400, 250, 0)] if style == "s3dis" else [(90, 180, 6), (130, 260, 11),
                                                                                    (60, 120, 0)]
    layers, insts = [], None
    for _ in range(1 + num_aux):
        scenes = [scene(q, p, k, c, torch.Generator().manual_seed(seed + i), style == "s3dis", style == "scannet")
                  for i, (q, p, k) in enumerate(sizes)]
        insts = [inst for _, inst in scenes]  # same seed per scene, so every layer sees the same instances
        layer = {key: [p[key] for p, _ in scenes] for key in ("cls_preds", "masks")}
        layer["scores"] = [p["scores"] for p, _ in scenes] if style == "s3dis" else None
        layer["masks"] = [m.detach().add(torch.randn(m.shape, generator=gen)).requires_grad_() for m in layer["masks"]]
        layers.append(layer)
    pred = {**layers[0], "aux_outputs": layers[1:], "sem_preds": ["ignored"]}
    return pred, insts


def leaves(pred: dict) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``pred`` and its aux layers, named."""
    out = []
    for j, layer in enumerate([pred] + pred.get("aux_outputs", [])):
        for key in ("cls_preds", "masks", "scores"):
            for i, t in enumerate(layer.get(key) or []):
                if t is not None:
                    out.append((f"layer {j} {key}[{i}]", t))
    return out


# ----------------------------------------------------------------------------------------------- call contract
@pytest.mark.parametrize("style", ["s3dis", "scannet"])
def test_call_on_oneformer3d_shapes(style):
    pred, insts = batch(style)
    out = InfluencerCriterion(NUM_CLASSES[style], form="transport")(pred, insts)
    assert set(out) == {"inst_loss"}
    loss = out["inst_loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, t in leaves(pred):
        if name.endswith("[2]") and "cls_preds" not in name:
            continue  # the scene without instances: transport gives its masks (and scores) no target, as Hungarian
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("form", ["transport", "ownership", "seed"])
def test_every_form_runs_with_a_zero_instance_scene(form):
    pred, insts = batch("scannet", num_aux=1)
    loss = InfluencerCriterion(18, form=form)(pred, insts)["inst_loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in pred["cls_preds"])
    if form == "seed":  # the background term supervises masks of a scene without instances
        assert pred["masks"][2].grad.abs().sum() > 0


def test_batch_of_only_empty_scenes():
    gen = torch.Generator().manual_seed(3)
    p, inst = scene(50, 80, 0, 13, gen, scores=True, superpoint_queries=False)
    pred = {"cls_preds": [p["cls_preds"]], "masks": [p["masks"]], "scores": [p["scores"]]}
    loss = InfluencerCriterion(13)(pred, [inst])["inst_loss"]
    loss.backward()
    assert torch.isfinite(loss) and p["cls_preds"].grad.abs().sum() > 0
    assert p["cls_preds"].grad[:, :-1].sum() > 0 > p["cls_preds"].grad[:, -1].sum()  # pushed towards no object


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_follows_the_predictions_device_and_dtype(device):
    """OneFormer3D never moves its criteria (plain objects); the library's class-weight buffer must follow."""
    pred, insts = batch("s3dis", num_aux=1)
    moved = {"aux_outputs": []}
    for src, dst in [(pred, moved)] + [(a, {}) for a in pred["aux_outputs"]]:
        for key in ("cls_preds", "masks", "scores"):
            dst[key] = [t.detach().to(device, torch.bfloat16).requires_grad_() for t in src[key]]
        if dst is not moved:
            moved["aux_outputs"].append(dst)
    insts = [{k: v.to(device) for k, v in inst.items()} for inst in insts]
    criterion = InfluencerCriterion(13)
    loss = criterion(moved, insts)["inst_loss"]
    loss.backward()
    assert loss.device.type == device and torch.isfinite(loss)
    assert moved["masks"][0].grad.abs().sum() > 0 and criterion.criterion.empty_weight.device.type == device


def test_pred_is_not_mutated():
    pred, insts = batch("s3dis")
    lists = {k: (v, list(v)) for k, v in pred.items() if isinstance(v, list)}
    values = [(name, t, t.detach().clone()) for name, t in leaves(pred)]
    keys = set(pred)
    InfluencerCriterion(13)(pred, insts)["inst_loss"].backward()
    assert set(pred) == keys
    for key, (obj, items) in lists.items():
        assert pred[key] is obj and len(obj) == len(items) and all(a is b for a, b in zip(obj, items)), key
    for (name, t, before), (_, now) in zip(values, leaves(pred)):
        assert now is t and torch.equal(t.detach(), before), f"{name} changed"
    assert all(m.dtype == torch.bool for m in (inst["sp_masks"] for inst in insts))


def test_matches_the_library_per_scene_and_mean_over_scenes():
    """inst_loss = mean over scenes of loss_weight[0] x class terms + loss_weight[1] x mask terms of the library."""
    pred, insts = batch("scannet", num_aux=1)
    ours = InfluencerCriterion(18, loss_weight=[0.3, 2.0], non_object_weight=0.1, score_weight=0.0)
    library = MaskInfluencerCriterion(18, no_object_weight=0.1, num_points=None)
    expected = []
    for i, inst in enumerate(insts):
        outputs = {"pred_logits": pred["cls_preds"][i][None], "pred_masks": pred["masks"][i][None],
                   "aux_outputs": [{"pred_logits": a["cls_preds"][i][None], "pred_masks": a["masks"][i][None]}
                                   for a in pred["aux_outputs"]]}
        terms = library(outputs, [{"labels": inst["labels_3d"], "masks": inst["sp_masks"]}])
        cls = library.weight_dict["loss_ce"] * (terms["loss_ce"] + terms["loss_ce_0"])
        expected.append(0.3 * cls + 2.0 * (terms["loss"] - cls))
    torch.testing.assert_close(ours(pred, insts)["inst_loss"], torch.stack(expected).mean())


def test_loss_weight_scales_class_and_mask_groups():
    pred, insts = batch("s3dis", num_aux=1)

    def loss(lw):
        return InfluencerCriterion(13, loss_weight=lw, score_weight=0.0)(pred, insts)["inst_loss"]

    torch.testing.assert_close(loss([1.0, 0.0]) + loss([0.0, 1.0]), loss([1.0, 1.0]))
    for t in pred["cls_preds"]:
        t.grad = None
    loss([0.0, 1.0]).backward()  # the transport plan is detached: mask terms alone never reach the class logits
    assert all(t.grad is None or t.grad.abs().sum() == 0 for t in pred["cls_preds"])


def test_objectness_regresses_best_iou_of_passing_queries():
    """Query 0 covers instance 0 exactly (IoU 1), query 1 covers 3 of its 4 points (IoU .75), query 2 nothing."""
    sp_masks = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    masks = torch.full((3, 8), -5.0)
    masks[0, :4] = 5.0
    masks[1, :3] = 5.0
    scores = torch.tensor([[0.5], [0.25], [3.0]], requires_grad=True)
    pred = {"cls_preds": [torch.zeros(3, 3)], "masks": [masks], "scores": [scores]}
    insts = [{"sp_masks": sp_masks, "labels_3d": torch.tensor([0, 1])}]
    with_score = InfluencerCriterion(2, score_weight=2.0)(pred, insts)["inst_loss"]
    without = InfluencerCriterion(2, score_weight=0.0)(pred, insts)["inst_loss"]
    expected_mse = ((0.5 - 1.0) ** 2 + (0.25 - 0.75) ** 2) / 2  # query 2 (IoU 0) is not supervised
    torch.testing.assert_close(with_score - without, torch.tensor(2.0 * expected_mse), rtol=1e-4, atol=1e-5)
    with_score.backward()
    assert scores.grad[2, 0] == 0 and scores.grad[0, 0] < 0 and scores.grad[1, 0] < 0


def test_seed_keys_act_only_on_the_seed_form():
    pred, insts = batch("scannet", num_aux=0)

    def loss(**kw):
        return InfluencerCriterion(18, **kw)(pred, insts)["inst_loss"]

    assert not torch.allclose(loss(form="seed", bg_weight=0.1), loss(form="seed", bg_weight=0.5))
    torch.testing.assert_close(loss(form="transport", bg_weight=0.1), loss(form="transport", bg_weight=0.5))
    assert InfluencerCriterion(18).form == "transport"  # the library's default form


def test_point_cloud_transport_settings_reach_the_library_criterion():
    crit = InfluencerCriterion(18, epsilon=0.02, aux_multiplicity=1, sinkhorn_epsilon_start=1.0, sinkhorn_iters=50)
    inner = crit.criterion
    assert (inner.epsilon, inner.aux_multiplicity, inner.sinkhorn_epsilon_start, inner.sinkhorn_iters) == (0.02, 1.0, 1.0, 50)
    pred, insts = batch("scannet", num_aux=2)
    assert not torch.allclose(crit(pred, insts)["inst_loss"], InfluencerCriterion(18, epsilon=0.02)(pred, insts)["inst_loss"])
    with pytest.raises(TypeError, match=r"unknown keys \['epsilon_end'\]"):  # mmengine never calls set_progress
        InfluencerCriterion(18, epsilon_end=0.01)


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(TypeError, match=r"unknown keys \['matcher'\].*bg_weight.*epsilon"):
        InfluencerCriterion(13, matcher=dict(type="HungarianMatcher"))


def test_oneformer3d_four_weight_list_is_rejected():
    with pytest.raises(ValueError, match=r"\[cls, influencer\]"):
        InfluencerCriterion(13, loss_weight=[0.5, 1.0, 1.0, 0.5])


def test_shape_errors_name_the_scene():
    pred, insts = batch("scannet", num_aux=1)
    insts[1] = {**insts[1], "sp_masks": insts[1]["sp_masks"][:, :-1]}
    with pytest.raises(ValueError, match=r"pred, scene 1: sp_masks expected"):
        InfluencerCriterion(18)(pred, insts)
    pred, insts = batch("scannet", num_aux=1)
    with pytest.raises(ValueError, match=r"num_classes \+ 1 = 14"):
        InfluencerCriterion(13)(pred, insts)
    with pytest.raises(ValueError, match=r"aux_outputs'\]\[0\]: expected lists"):
        InfluencerCriterion(18)({**pred, "aux_outputs": [{"cls_preds": pred["cls_preds"][:1], "masks": []}]}, insts)
    pred, insts = batch("s3dis", num_aux=0)
    with pytest.raises(ValueError, match=r"scene 0: scores expected \(Q = 400, 1\)"):
        InfluencerCriterion(13)({**pred, "scores": [s[:, 0] for s in pred["scores"]]}, insts)


def test_synthetic_inputs_of_the_verify_tool_have_oneformer3d_shapes():
    s3dis, _ = make_synthetic_inputs(13, "s3dis")
    assert [tuple(m.shape) for m in s3dis["masks"]] == [(40, 150), (40, 187)]
    assert [tuple(s.shape) for s in s3dis["scores"]] == [(40, 1), (40, 1)] and len(s3dis["aux_outputs"]) == 2
    scannet, insts = make_synthetic_inputs(18, "scannet")
    assert scannet["scores"] is None and [len(i["labels_3d"]) for i in insts] == [3, 0]
    assert all(i["query_masks"].shape == (len(i["labels_3d"]), m.shape[0]) for i, m in zip(insts, scannet["masks"]))
    with pytest.raises(ValueError, match="style"):
        make_synthetic_inputs(13, "kitti")


# ----------------------------------------------------------------------------------------------- registry + configs
@pytest.fixture
def registry():
    if oneformer3d.MODELS is None:  # neither mmdet3d nor mmengine imports
        pytest.skip(f"no registry: {oneformer3d.REGISTRY_ERROR}")
    print(f"\nregistry under test: {oneformer3d.REGISTRY_KIND} ({oneformer3d.MODELS.scope}::{oneformer3d.MODELS.name})"
          + (f"; {oneformer3d.REGISTRY_ERROR}" if oneformer3d.REGISTRY_ERROR else ""))
    return oneformer3d.MODELS


def load_config(path: Path, monkeypatch):
    """mmengine Config of ``path`` with OneFormer3D's configs taken from $ONEFORMER3D_ROOT (the stand-in if unset)."""
    from mmengine.config import Config

    monkeypatch.setenv("ONEFORMER3D_ROOT", os.environ.get("ONEFORMER3D_ROOT", str(FIXTURE_ROOT)))
    return Config.fromfile(str(path), import_custom_modules=False)  # "oneformer3d" itself need not import here


def test_registered_in_the_mmdet3d_scope(registry):
    assert registry.scope == "mmdet3d"
    assert registry.module_dict["InfluencerCriterion"] is InfluencerCriterion
    if oneformer3d.REGISTRY_KIND == "mmdet3d":
        from mmdet3d.registry import MODELS

        assert registry is MODELS


@pytest.mark.parametrize("dataset,bg_weight,non_object", [("s3dis", 0.1, 0.05), ("scannet", 0.5, 0.1)])
def test_influencer_config_replaces_only_the_instance_criterion(registry, monkeypatch, dataset, bg_weight, non_object):
    cfg, base = load_config(CONFIGS[dataset], monkeypatch), load_config(BASELINES[dataset], monkeypatch)
    assert cfg.model.criterion.inst_criterion.to_dict() == dict(
        type="InfluencerCriterion", num_classes=NUM_CLASSES[dataset], loss_weight=[0.5, 1.0],
        non_object_weight=non_object, form="transport", bg_weight=bg_weight)
    assert base.model.criterion.inst_criterion.type == "InstanceCriterion"
    assert cfg.custom_imports.to_dict() == dict(imports=["oneformer3d", "influencerformer.integrations.oneformer3d"],
                                                allow_failed_imports=False)
    cfg.model.criterion.pop("inst_criterion")
    base.model.criterion.pop("inst_criterion")
    for key in set(base) - {"custom_imports"}:
        assert cfg[key] == base[key], f"the influencer config changed {key}"


@pytest.mark.parametrize("dataset", ["s3dis", "scannet"])
def test_registry_builds_from_the_config_and_runs(registry, monkeypatch, dataset):
    cfg = load_config(CONFIGS[dataset], monkeypatch).model.criterion.inst_criterion.to_dict()
    criterion, how = oneformer3d.build_from_registry(cfg)
    assert isinstance(criterion, InfluencerCriterion) and criterion.num_classes == NUM_CLASSES[dataset]
    lookup_only = oneformer3d.REGISTRY_KIND == "mmdet3d" and not oneformer3d._mmdet3d_models_importable()
    assert how == ("registry lookup" if lookup_only else "MODELS.build")
    assert criterion.criterion.empty_weight[-1].item() == pytest.approx(cfg["non_object_weight"])
    pred, insts = batch(dataset, num_aux=1)
    from mmengine.structures import InstanceData

    loss = criterion(pred, [InstanceData(**inst) for inst in insts])["inst_loss"]
    torch.testing.assert_close(loss, criterion(pred, insts)["inst_loss"])  # InstanceData == plain dict
    loss.backward()
    assert pred["masks"][0].grad.abs().sum() > 0 and pred["cls_preds"][0].grad.abs().sum() > 0


def test_registry_build_reports_unknown_keys(registry):
    with pytest.raises(TypeError, match="valid keys"):
        oneformer3d.build_from_registry(dict(type="InfluencerCriterion", num_classes=13, fix_mean_loss=True))


def test_models_build_with_the_full_stack(registry):
    """``MODELS.build`` itself, as OneFormer3D calls it: needs mmcv's compiled ops and numba (opt-in install)."""
    if oneformer3d.REGISTRY_KIND != "mmdet3d" or not oneformer3d._mmdet3d_models_importable():
        pytest.skip("needs mmdet3d's registry with mmdet3d.models importable (mmcv compiled ops, numba): opt-in stack")
    criterion = registry.build(dict(type="InfluencerCriterion", num_classes=13, bg_weight=0.1))
    assert isinstance(criterion, InfluencerCriterion)


def test_missing_oneformer3d_names_the_path(registry, monkeypatch, tmp_path):
    from mmengine.config import Config

    monkeypatch.setenv("ONEFORMER3D_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere/configs/oneformer3d_1xb2_s3dis-area-5.py"):
        Config.fromfile(str(CONFIGS["s3dis"]), import_custom_modules=False)


# ----------------------------------------------------------------------------------------------- verify tool, scripts
def run(args: list[str], env: dict | None = None, blocked: tuple[str, ...] = (), tmp_path: Path | None = None):
    """Run a command with a clean ONEFORMER3D_ROOT; ``blocked`` modules raise ImportError (stack missing)."""
    full_env = {**os.environ, "ONEFORMER3D_ROOT": str(FIXTURE_ROOT), **(env or {})}
    if blocked:
        blocker = tmp_path / "blocker"
        blocker.mkdir(exist_ok=True)
        for name in blocked:
            (blocker / f"{name}.py").write_text(f"raise ImportError('{name} blocked by the test')\n")
        full_env["PYTHONPATH"] = os.pathsep.join([str(blocker), full_env.get("PYTHONPATH", "")])
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_verify_passes_with_the_available_registry(registry):
    standin = [] if oneformer3d.REGISTRY_KIND == "mmdet3d" else ["--allow-standin"]
    result = run([sys.executable, "scripts/register_criterion.py", "--verify", *standin])
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("PASS: InfluencerCriterion(form='transport')") and "scannet" in last


def test_verify_fails_with_the_stack_missing(tmp_path):
    result = run([sys.executable, "scripts/register_criterion.py", "--verify"],
                 blocked=("mmengine", "mmdet3d", "mmcv", "mmdet"), tmp_path=tmp_path)
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL: no OpenMMLab registry") and "blocked by the test" in last
    assert "pip install mmengine==0.10.7 mmcv-lite==2.1.0" in last


def test_verify_fails_without_oneformer3d_configs(registry, tmp_path):
    standin = [] if oneformer3d.REGISTRY_KIND == "mmdet3d" else ["--allow-standin"]
    result = run([sys.executable, "scripts/register_criterion.py", "--verify", *standin],
                 env={"ONEFORMER3D_ROOT": str(tmp_path)})
    assert result.returncode == 1
    assert "FAIL: cannot load" in result.stdout and "export ONEFORMER3D_ROOT" in result.stdout


bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def fake_root(tmp_path):
    """A OneFormer3D checkout as the scripts see it: tools/train.py and the stand-in configs."""
    root = tmp_path / "oneformer3d"
    (root / "tools").mkdir(parents=True)
    (root / "tools" / "train.py").write_text("")
    shutil.copytree(FIXTURE_ROOT / "configs", root / "configs")
    return root


@bash
def test_train_script_builds_the_command(fake_root, tmp_path):
    ckpt = tmp_path / "epoch_3.pth"
    ckpt.write_text("")
    env = {"ONEFORMER3D_ROOT": str(fake_root), "DRY_RUN": "1"}
    one = run(["bash", "scripts/train_oneformer3d.sh", "s3dis", "influencerformer", "--resume", str(ckpt), "--amp"],
              env=env)
    assert one.returncode == 0, one.stderr
    assert (f"python tools/train.py {CONFIGS['s3dis']} --resume {ckpt} --amp" in one.stdout
            and str(fake_root) in one.stdout)
    multi = run(["bash", "scripts/train_oneformer3d.sh", "scannet", "baseline", "--resume"], env={**env, "GPUS": "2"})
    assert multi.returncode == 0, multi.stderr
    assert ("-m torch.distributed.run --nproc_per_node=2" in multi.stdout
            and f"tools/train.py {BASELINES['scannet']} --resume --launcher pytorch" in multi.stdout)
    (fake_root / "tools" / "dist_train.sh").write_text("")
    dist = run(["bash", "scripts/train_oneformer3d.sh", "scannet", "baseline"], env={**env, "GPUS": "2"})
    assert f"bash tools/dist_train.sh {BASELINES['scannet']} 2" in dist.stdout


@bash
def test_train_script_says_what_is_missing(fake_root, tmp_path):
    absent = run(["bash", "scripts/train_oneformer3d.sh", "s3dis", "baseline"],
                 env={"ONEFORMER3D_ROOT": str(tmp_path / "none"), "DRY_RUN": "1"})
    assert absent.returncode == 1
    assert "git clone https://github.com/filaPro/oneformer3d" in absent.stderr and "ONEFORMER3D_ROOT" in absent.stderr
    stack = run(["bash", "scripts/train_oneformer3d.sh", "s3dis", "baseline"],
                env={"ONEFORMER3D_ROOT": str(fake_root), "PYTHON": sys.executable},
                blocked=("mmengine",), tmp_path=tmp_path)
    assert stack.returncode == 1 and "import mmengine failed" in stack.stderr and "pip install mmengine" in stack.stderr
    bad = run(["bash", "scripts/train_oneformer3d.sh", "kitti", "baseline"], env={"DRY_RUN": "1"})
    assert bad.returncode == 1 and "dataset must be s3dis or scannet" in bad.stderr


@bash
def test_eval_script_converts_the_last_checkpoint(fake_root):
    work_dir = fake_root / "work_dirs" / "influencerformer_1xb2_s3dis-area-5"
    work_dir.mkdir(parents=True)
    (work_dir / "last_checkpoint").write_text("./work_dirs/influencerformer_1xb2_s3dis-area-5/epoch_512.pth")
    result = run(["bash", "scripts/eval_oneformer3d.sh", "s3dis", "influencerformer"],
                 env={"ONEFORMER3D_ROOT": str(fake_root), "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    fixed = work_dir / "epoch_512_test.pth"
    assert f"tools/fix_spconv_checkpoint.py --in-path {work_dir / 'epoch_512.pth'} --out-path {fixed}" in result.stdout
    assert f"tools/test.py {CONFIGS['s3dis']} {fixed}" in result.stdout
