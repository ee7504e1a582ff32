"""Config: YAML loading, --set overrides (types, unknown keys), the shipped configs, the LR schedule."""
from pathlib import Path

import pytest
import yaml

from influencerformer.engine.config import Config, ConfigError, apply_override, copy_config, from_dict, load_config
from influencerformer.engine.train import lr_factor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_overrides_parse_yaml_scalars_and_types():
    cfg = load_config(None, ["train.steps=123", "optim.lr=5e-4", "train.amp=bf16", "data.num_train=null",
                             "train.tensorboard=true", "optim.clip=2"])
    assert cfg.train.steps == 123 and cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.train.amp == "bf16" and cfg.data.num_train is None and cfg.train.tensorboard is True
    assert isinstance(cfg.optim.clip, float) and cfg.optim.clip == 2.0


def test_model_and_criterion_keys_go_to_overrides_and_kwargs():
    cfg = load_config(None, ["model.num_queries=16", "model.overrides.hidden_dim=32",
                             "criterion.name=influencer", "criterion.epsilon=0.05"])
    assert cfg.model.overrides == {"num_queries": 16, "hidden_dim": 32}
    assert cfg.criterion.kwargs == {"num_points": None, "epsilon": 0.05}  # added to the default num_points


@pytest.mark.parametrize("item, words", [
    ("train.bogus=1", ["train.bogus", "steps", "eval_every"]),  # lists the valid keys
    ("bogus.steps=1", ["sections", "train"]),
    ("model.bogus=1", ["model.bogus", "num_queries"]),
    ("criterion.bogus=1", ["criterion.bogus", "num_points"]),
    ("train.steps=ten", ["train.steps", "int"]),
    ("train.steps=true", ["train.steps", "integer"]),
    ("train.amp=fp8", ["none", "bf16", "fp16"]),
    ("train.steps", ["section.key=value"]),
])
def test_bad_overrides_name_the_problem(item, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    for word in words:
        assert word in str(err.value)


def test_validation_of_criterion_and_data_root(tmp_path):
    with pytest.raises(ConfigError, match="unknown criterion 'nope'.*hungarian"):
        load_config(None, ["criterion.name=nope"])
    with pytest.raises(ConfigError, match="data root"):
        load_config(None, ["data.name=coco"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, ["data.name=coco", f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=0"])


def test_yaml_with_unknown_section_or_key_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown section"):
        from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["shapes2d_tiny", "shapes2d_medium", "shapes2d_crowded"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.name == "shapes2d"


def test_crowded_config_is_the_design_recipe():
    cfg = load_config(CONFIGS / "shapes2d_crowded.yaml")
    assert (cfg.data.preset, cfg.data.batch_size, cfg.model.preset) == ("crowded", 16, "crowded")
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.warmup_steps, o.schedule, o.clip) == (5e-4, 0.05, 200, "cosine", 1.0)
    assert cfg.train.steps == 4000


def test_copy_config_is_deep():
    cfg = load_config(None, ["model.num_queries=16"])
    new = copy_config(cfg, train={"seed": 3})
    new.model.overrides["num_queries"] = 99
    assert cfg.model.overrides["num_queries"] == 16 and new.train.seed == 3 and cfg.train.seed == 0


def test_lr_schedule_warmup_then_cosine_or_poly():
    cfg = load_config(None, ["optim.warmup_steps=10", "train.steps=110"])
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    apply_override(cfg, "optim.schedule=poly")
    assert lr_factor(60, cfg) == pytest.approx(0.5 ** 0.9)
    apply_override(cfg, "optim.min_lr_ratio=0.1")
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_builtin_defaults_are_the_medium_cpu_budget():
    medium = load_config(CONFIGS / "shapes2d_medium.yaml")
    defaults = Config()
    assert (medium.data.preset, medium.model, medium.criterion, medium.optim) == \
        (defaults.data.preset, defaults.model, defaults.criterion, defaults.optim)
    assert (medium.train.steps, medium.data.batch_size) == (defaults.train.steps, defaults.data.batch_size)


def test_compare_accepts_a_kwarg_of_any_compared_criterion():
    cfg = load_config(None, ["criterion.epsilon=0.05"], criteria=["hungarian", "influencer"])
    assert cfg.criterion.name == "hungarian" and cfg.criterion.kwargs["epsilon"] == 0.05
    with pytest.raises(ConfigError, match="unknown key criterion.epsilon"):
        load_config(None, ["criterion.epsilon=0.05"])  # a hungarian run alone has no epsilon
    with pytest.raises(ConfigError, match="unknown key criterion.bogus; valid keys: .*epsilon"):
        load_config(None, ["criterion.bogus=1"], criteria=["hungarian", "influencer"])


def test_compare_runs_keep_the_kwargs_their_criterion_accepts(tmp_path):
    from influencerformer.engine.compare import run_config

    cfg = load_config(None, ["criterion.epsilon=0.05", "criterion.num_points=64"], criteria=["hungarian", "influencer"])
    hungarian, influencer = (run_config(cfg, name, 0, tmp_path) for name in ("hungarian", "influencer"))
    assert hungarian.criterion.kwargs == {"num_points": 64}
    assert influencer.criterion.kwargs == {"num_points": 64, "epsilon": 0.05}


# ------------------------------------------------------------------- numbers checked at load time (issue 16)


@pytest.mark.parametrize("item, words", [
    ("train.eval_topk=0", "train.eval_topk must be 1 ≤ eval_topk, got 0"),
    ("optim.lr=nan", "optim.lr must be finite, got nan"),
    ("optim.lr=.inf", "optim.lr must be finite, got inf"),
    ("optim.lr=1e999", "optim.lr must be finite, got inf"),
    ("optim.lr=0", "optim.lr must be 0 < lr, got 0"),
    ("optim.beta2=1", "optim.beta2 must be 0 ≤ beta2 < 1, got 1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be 0 ≤ min_lr_ratio ≤ 1"),
    ("optim.clip=-1", "optim.clip must be 0 ≤ clip, got -1"),
    ("optim.weight_decay=.nan", "optim.weight_decay must be finite"),
    ("train.seed=-1", "train.seed must be 0 ≤ seed ≤ 4294967295, got -1"),
    ("train.eval_every=-5", "train.eval_every must be 0 ≤ eval_every"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be 0 ≤ keep_checkpoints"),
    ("data.num_val=0", "data.num_val must be 1 ≤ num_val, got 0"),
    ("data.workers=-2", "data.workers must be 0 ≤ workers"),
    ("criterion.no_object_weight=-1", "criterion.no_object_weight must be ≥ 0, got -1"),
    ("criterion.no_object_weight=nan", "criterion.no_object_weight must be a number, got 'nan'"),
    ("criterion.no_object_weight=.nan", "criterion.no_object_weight must be finite, got nan"),
    ("model.num_queries=0", "model:"),
    ("model.dropout=.nan", "model.dropout must be finite"),
])
def test_every_number_is_checked_at_load_time(item, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_numbers_in_a_yaml_file_are_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="optim.lr must be finite"):
        load_config(path)
    path.write_text("criterion:\n  name: influencer\n  kwargs:\n    epsilon: -0.1\n")
    with pytest.raises(ConfigError, match="criterion.epsilon must be ≥ 0"):
        load_config(path)
