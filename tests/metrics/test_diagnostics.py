"""Diagnostics on hand-made cases: IoU, owner changes, duplicates, greedy F1, no-object queries."""

import pytest
import torch

from influencerformer.metrics import (
    assignment_stability,
    count_duplicates,
    duplicate_rate,
    f1_at_iou,
    f1_from_counts,
    mask_iou,
    query_usage,
)


def cols(*ranges, width=20):
    """bool (K, 1, width) masks; each mask is a list of (start, end) column ranges."""
    masks = torch.zeros(len(ranges), 1, width, dtype=torch.bool)
    for k, spans in enumerate(ranges):
        for a, b in spans:
            masks[k, 0, a:b] = True
    return masks


def test_mask_iou_matches_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 6, 7, generator=g) > 0.5, torch.rand(3, 6, 7, generator=g) > 0.6
    b[2] = False  # empty mask: IoU 0, not NaN
    iou = mask_iou(a, b)
    for i in range(5):
        for j in range(3):
            union = (a[i] | b[j]).sum()
            expected = (a[i] & b[j]).sum() / union if union else 0.0
            assert iou[i, j].item() == pytest.approx(float(expected))
    with pytest.raises(ValueError, match=r"masks: expected equal spatial shapes, got \(6, 7\) and \(6, 8\)"):
        mask_iou(a, torch.zeros(1, 6, 8, dtype=torch.bool))


def test_assignment_stability_counts_changed_owners():
    prev = [torch.tensor([0, 3, 5]), torch.tensor([2]), torch.tensor([], dtype=torch.long)]
    curr = [torch.tensor([0, 4, 5]), torch.tensor([1]), torch.tensor([], dtype=torch.long)]
    assert assignment_stability(prev, curr) == pytest.approx(2 / 4)
    assert assignment_stability(prev, prev) == 0.0
    assert assignment_stability([torch.tensor([], dtype=torch.long)], [torch.tensor([], dtype=torch.long)]) == 0.0


def test_assignment_stability_bad_inputs():
    with pytest.raises(ValueError, match="curr: expected 2 images"):
        assignment_stability([torch.tensor([0]), torch.tensor([1])], [torch.tensor([0])])
    with pytest.raises(ValueError, match=r"curr\[0\]: expected shape \(2,\)"):
        assignment_stability([torch.tensor([0, 1])], [torch.tensor([0])])


def test_duplicate_rate_counts_instances_claimed_twice():
    gt = cols([(0, 10)], [(10, 20)])
    # two confident claims on gt 0 (IoU 1 and 0.8), one on gt 1; the low-score copy of gt 1 does not count
    pred = cols([(0, 10)], [(0, 8)], [(10, 20)], [(11, 20)])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3])
    assert count_duplicates(pred, scores, gt) == (1, 2)
    assert duplicate_rate(pred, scores, gt) == pytest.approx(0.5)
    assert duplicate_rate(pred, scores, gt, score_threshold=0.2) == pytest.approx(1.0)
    assert duplicate_rate(pred, scores, gt, iou_threshold=0.85) == 0.0  # second claim has IoU 0.8
    # with classes, the near copy of another class no longer claims gt 0
    labels = dict(pred_labels=torch.tensor([0, 1, 1, 1]), gt_labels=torch.tensor([0, 1]))
    assert duplicate_rate(pred, scores, gt, **labels) == 0.0
    assert duplicate_rate(pred[:0], scores[:0], gt) == 0.0
    assert duplicate_rate(pred, scores, gt[:0]) == 0.0


def test_f1_counts_duplicates_as_false_positives():
    gt = cols([(0, 5)], [(5, 10)], [(10, 15)])
    pred = cols([(0, 5)], [(0, 4)], [(5, 10)], [(16, 20)], [(10, 15)])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.4])  # duplicate, clutter, and an unconfident hit
    res = f1_at_iou(pred, scores, gt)
    assert (res["tp"], res["fp"], res["fn"]) == (2, 2, 1)
    assert res["precision"] == pytest.approx(0.5)
    assert res["recall"] == pytest.approx(2 / 3)
    assert res["f1"] == pytest.approx(4 / 7)


def test_f1_greedy_in_score_order_not_optimal():
    # columns: a = 0-1, b = 2-7, c = 8, d = 9-14; gt0 = a+b, gt1 = b+c (overlapping instances)
    gt = cols([(0, 8)], [(2, 9)], width=15)
    # p1 = a+b+c: IoU 8/9 with gt0, 7/9 with gt1; p2 = a+b+d: IoU 8/14 with gt0, 6/15 with gt1
    pred = cols([(0, 9)], [(0, 8), (9, 15)], width=15)
    res = f1_at_iou(pred, torch.tensor([0.9, 0.8]), gt)
    # p1 takes its best gt (gt0) first; p2 then has nothing ≥ 0.5 left (an optimal matching would find 2)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 1, 1)
    # with the scores swapped p2 takes gt0 and p1 falls back to gt1
    res = f1_at_iou(pred, torch.tensor([0.8, 0.9]), gt)
    assert (res["tp"], res["fp"], res["fn"]) == (2, 0, 0)


def test_f1_with_labels_and_empty_inputs():
    gt = cols([(0, 5)], [(5, 10)])
    pred = cols([(0, 5)], [(5, 10)])
    scores = torch.tensor([0.9, 0.9])
    res = f1_at_iou(pred, scores, gt, pred_labels=torch.tensor([0, 0]), gt_labels=torch.tensor([0, 1]))
    assert (res["tp"], res["fp"], res["fn"]) == (1, 1, 1)
    assert f1_at_iou(pred, scores, gt[:0]) == {"tp": 0, "fp": 2, "fn": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert f1_at_iou(pred[:0], scores[:0], gt)["fn"] == 2
    assert f1_from_counts(tp=3, fp=1, fn=2) == pytest.approx({"precision": 0.75, "recall": 0.6, "f1": 2 / 3})
    with pytest.raises(ValueError, match="pred_labels/gt_labels: expected both or neither"):
        f1_at_iou(pred, scores, gt, pred_labels=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"scores: expected shape \(2,\)"):
        f1_at_iou(pred, scores[:1], gt)


def test_query_usage_is_fraction_of_no_object_queries():
    logits = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 4.0, 1.0]])
    assert query_usage(logits) == pytest.approx(0.5)
    assert query_usage(torch.stack([logits, logits.roll(1, dims=1)])) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match=r"pred_logits: expected shape \(Q, C\+1\)"):
        query_usage(torch.zeros(5))
