"""The assignment timer: off by default (no cost, no sync), on it times only the assignment section."""
import time

import pytest
import torch

from influencerformer.losses import build_criterion
from influencerformer.losses.timing import SectionTimer


def test_timer_accumulates_and_resets_only_when_enabled():
    timer = SectionTimer()
    with timer(torch.device("cpu")):
        time.sleep(0.01)
    assert timer.pop_ms() == 0.0
    timer.enabled = True
    for _ in range(2):
        with timer(torch.device("cpu")):
            time.sleep(0.01)
    assert 20.0 <= timer.pop_ms() < 1000.0
    assert timer.pop_ms() == 0.0


@pytest.mark.parametrize("name", ["hungarian", "influencer"])
def test_criteria_time_their_assignment_within_the_loss(name):
    torch.manual_seed(0)
    criterion = build_criterion(name, 3, num_points=None)
    outputs = {"pred_logits": torch.randn(2, 10, 4), "pred_masks": torch.randn(2, 10, 16, 16)}
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 16, 16) > 0.5} for _ in range(2)]
    criterion(outputs, targets)
    assert criterion.assign_timer.pop_ms() == 0.0  # disabled by default
    criterion.assign_timer.enabled = True
    start = time.perf_counter()
    criterion(outputs, targets)
    total_ms = 1000 * (time.perf_counter() - start)
    assert 0.0 < criterion.assign_timer.pop_ms() < total_ms
