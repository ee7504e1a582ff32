"""DDP: two CPU processes launched by torchrun (gloo) train in lock-step and end with identical weights."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from influencerformer.engine.checkpoint import load_checkpoint
from influencerformer.engine.distributed import DistInfo, any_true, setup

# Each rank runs train() and saves the weights it ends with (train() itself saves rank 0's only).
WORKER = textwrap.dedent("""
    import importlib, os, sys
    import torch
    T = importlib.import_module("influencerformer.engine.train")  # the module (the package exports the function)
    from influencerformer.engine.config import load_config
    from influencerformer.engine.evaluate import unwrap

    out = sys.argv[1]
    final = {}
    summarize = T.summarize
    def keep_weights(run):
        final["model"] = {k: v.clone() for k, v in unwrap(run.model).state_dict().items()}
        return summarize(run)
    T.summarize = keep_weights
    cfg = load_config(None, sys.argv[2:] + [f"train.out_dir={out}/run"])
    T.train(cfg)
    torch.save(final["model"], f"{out}/rank{os.environ['RANK']}.pt")
""")

TINY = ["data.num_train=8", "data.num_val=2", "data.batch_size=2", "train.progress=false", "train.steps=3",
        "model.num_queries=6", "model.hidden_dim=32", "model.dim_feedforward=64", "model.mask_dim=32",
        "model.num_decoder_layers=2", "model.backbone_widths=[8,16,32,32]", "model.stem_width=8",
        "criterion.num_points=64", "optim.warmup_steps=1", "train.device=cpu", "train.probe_images=2",
        "train.eval_every=2"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = load_checkpoint(tmp_path / "run")
    assert saved["step"] == 3 and all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)
    # rank 0 alone printed the config and evaluated (steps 2 and 3)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"kind": "eval"') == 2
    assert proc.stdout.count("resolved config") == 1 and proc.stdout.count("[eval]") == 2


def test_single_process_setup_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup("cpu")
    assert info == DistInfo() and info.is_main and not info.enabled
    assert any_true(True, torch.device("cpu")) and not any_true(False, torch.device("cpu"))


def test_ranks_get_disjoint_shards_of_each_epoch(tmp_path):
    from influencerformer.data import Shapes2D
    from influencerformer.engine.config import load_config
    from influencerformer.engine.images import make_collate
    from influencerformer.engine.train import TrainStream

    data = Shapes2D("train", preset="medium", num_images=8)
    cfg = load_config(None, ["data.batch_size=2"])
    seen = []
    for rank in (0, 1):
        stream = TrainStream(data, cfg, DistInfo(rank=rank, world_size=2), make_collate())
        batches = stream.batches(0)
        seen.append([i for _ in range(2) for i in next(batches)["image_ids"]])
    assert sorted(seen[0] + seen[1]) == list(range(8))  # one epoch, split between the ranks
