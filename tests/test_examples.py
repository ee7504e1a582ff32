"""The examples run end to end with tiny budgets, return finite numbers, and their training lowers the loss."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def _check_losses(result):
    losses = [loss for _, loss in result["losses"]]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    assert result["final_loss"] == losses[-1]
    assert losses[-1] < losses[0], losses


def _check_prf(result):
    for key in ("precision", "recall", "f1"):
        assert math.isfinite(result[key]) and 0.0 <= result[key] <= 1.0
    assert result["tp"] + result["fn"] > 0  # there was ground truth to find


@pytest.mark.parametrize("criterion", ["influencer", "hungarian"])
def test_squares_trains_and_writes_png(tmp_path, criterion):
    squares = _load("squares")
    out = tmp_path / "sq.png"
    result = squares.main(["--criterion", criterion, "--steps", "12", "--seconds", "30", "--num-train", "8",
                           "--num-val", "4", "--batch-size", "4", "--log-every", "3", "--out", str(out)])
    assert result["steps"] == 12
    _check_losses(result)
    assert 0.0 <= result["found_fraction"] <= 1.0 and math.isfinite(result["mean_best_iou"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_squares_are_disjoint_squares():
    squares = _load("squares")
    for item in squares.make_squares(5, size=64, max_squares=3, seed=1):
        masks = item["masks"]
        assert masks.dtype.is_floating_point is False and masks.shape[1:] == (64, 64)
        assert int(masks.sum(0).max()) == 1  # disjoint
        for m in masks:
            ys, xs = m.nonzero(as_tuple=True)
            h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
            assert h == w and int(m.sum()) == h * w  # a filled axis-aligned square


def test_greedy_cluster_separates_two_blobs():
    import torch

    toy_image = _load("toy_image")
    emb = torch.cat([torch.zeros(5, 2), torch.full((4, 2), 3.0), torch.tensor([[10.0, 10.0]])])
    beta = torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -5.0])
    masks, scores = toy_image.greedy_cluster(emb, beta, beta_threshold=0.5, radius=0.5)
    assert masks.shape == (2, 10)
    assert masks[0, :5].all() and not masks[0, 5:].any()  # highest beta seeds first
    assert masks[1, 5:9].all() and not masks[1, :5].any() and not masks[1, 9]  # low-beta outlier never seeds
    assert torch.allclose(scores, torch.sigmoid(torch.tensor([3.0, 1.0])))


def test_toy_image_trains():
    toy_image = _load("toy_image")
    result = toy_image.main(["--steps", "20", "--num-train", "4", "--num-val", "2", "--batch-size", "2",
                             "--log-every", "5", "--points", "1024"])
    assert result["steps"] == 20
    _check_losses(result)
    _check_prf(result)


def test_toy_pointcloud_trains():
    toy_pointcloud = _load("toy_pointcloud")
    result = toy_pointcloud.main(["--steps", "30", "--num-train", "2", "--num-val", "2", "--points", "1500",
                                  "--log-every", "10"])
    assert result["steps"] == 30
    _check_losses(result)
    _check_prf(result)
    assert 0.0 <= result["train_f1"] <= 1.0
