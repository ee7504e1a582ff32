"""benchmarks/plan_sharpness.py: its statistics on costs with a known answer, and its cost on a tiny model."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_sharpness.py"
spec = importlib.util.spec_from_file_location("plan_sharpness", PATH)
plan_sharpness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan_sharpness)


def test_a_clear_gap_gives_a_hard_plan_that_agrees_with_hungarian():
    cost = torch.full((6, 3), 2.0)
    cost[[4, 0, 2], [0, 1, 2]] = 1.0  # instance k's best query is 4, 0, 2; every gap is 1.0
    s = plan_sharpness.sharpness([cost], epsilon=0.05, iters=200)
    assert s["instances"] == 3 and s["gap"] == pytest.approx(1.0)
    assert s["gap<eps"] == 0.0 and s["agrees"] == 1.0 and s["off"] == 0.0
    assert s["top share"] > 0.99


def test_off_counts_unconverged_columns_and_epsilon_scaling_fixes_them():
    gen = torch.Generator().manual_seed(0)
    cost = 5 + 5 * torch.rand(32, 20, generator=gen, dtype=torch.float64)
    q = torch.arange(10)
    cost[q, 2 * q], cost[q, 2 * q + 1] = 0.2, 0.5  # instances 2i and 2i + 1 both prefer query i,
    cost[q + 10, 2 * q + 1] = 1.5  # and 2i + 1 must move to its second choice, 1.0 worse
    assert plan_sharpness.sharpness([cost], epsilon=0.02, iters=30)["off"] > 0.5
    assert plan_sharpness.sharpness([cost], epsilon=0.02, iters=30, epsilon_start=1.0)["off"] == 0.0


def test_equal_costs_spread_each_instance_over_every_query():
    s = plan_sharpness.sharpness([torch.ones(5, 2)], epsilon=0.1, iters=50)
    assert s["gap"] == 0.0 and s["gap<eps"] == 1.0
    assert s["top share"] == pytest.approx(1 / 5, abs=1e-6)


def test_final_layer_costs_are_the_matching_cost_of_each_scene():
    torch.manual_seed(0)
    q, k, n = 4, 2, 30
    logits, masks = torch.randn(1, q, 4), torch.randn(1, q, n)  # 3 classes + no object
    tgt = torch.zeros(k, n, dtype=torch.bool)
    tgt[0, :10], tgt[1, 15:] = True, True
    labels = torch.tensor([0, 2])

    class Fixed(torch.nn.Module):
        def forward(self, coords, colors):
            return {"pred_logits": logits, "pred_masks": masks}

    batch = {"coords": torch.zeros(1, n, 3), "colors": torch.zeros(1, n, 3),
             "targets": [{"labels": labels, "masks": tgt}]}
    criterion = plan_sharpness.MaskInfluencerCriterion(3, num_points=None)
    (cost,) = plan_sharpness.final_layer_costs(Fixed(), batch, criterion)
    p, t = masks[0].sigmoid(), tgt.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        masks[0][:, None].expand(q, k, n), t[None].expand(q, k, n), reduction="none").mean(-1)
    dice = 1 - (2 * p @ t.T + 1) / (p.sum(-1, keepdim=True) + t.sum(-1) + 1)
    prob = logits[0].softmax(-1)[:, labels]
    torch.testing.assert_close(cost, 2 * (1 - prob) + 5 * bce + 5 * dice, rtol=1e-5, atol=1e-5)
