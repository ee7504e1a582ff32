"""mIoU and PQ: hand-computed cases, accumulation over images, a loop-based reference, errors."""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from influencerformer.metrics import MeanIoU, PanopticQuality, mean_iou, panoptic_quality

# ---------------------------------------------------------------- mIoU


def test_miou_perfect_is_one():
    gt = torch.randint(0, 5, (2, 8, 9))
    res = mean_iou(gt.clone(), gt, num_classes=5)
    assert res["mIoU"] == pytest.approx(1.0)
    assert torch.allclose(res["IoU"], torch.ones(5, dtype=torch.float64))


def test_miou_hand_computed_with_ignore_and_absent_class():
    gt = torch.tensor([[[0, 0, 1, 255], [1, 1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 3], [1, 2, 2, 0]]])
    res = mean_iou(pred, gt, num_classes=4)
    # class 0: tp 1, union 2; class 1: tp 2, union 4; class 2: tp 1, union 2; class 3: only on ignored pixels
    assert res["IoU"][:3].tolist() == pytest.approx([1 / 2, 2 / 4, 1 / 2])
    assert math.isnan(res["IoU"][3])
    assert res["mIoU"] == pytest.approx(0.5)


def test_miou_accumulates_counts_not_per_image_means():
    gt = [torch.tensor([[0, 0, 0, 1]]), torch.tensor([[1, 1, 1, 1]])]
    pred = [torch.tensor([[0, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1]])]
    acc = MeanIoU(num_classes=2)
    for p, g in zip(pred, gt):
        acc.update(p, g)
    # dataset confusion: class 0 tp 3 union 4; class 1 tp 4 union 5
    assert acc.compute()["mIoU"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    per_image = [mean_iou(p, g, 2)["mIoU"] for p, g in zip(pred, gt)]
    assert acc.compute()["mIoU"] != pytest.approx(sum(per_image) / 2)


def test_miou_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (3, 16, 16), generator=g)
    gt[gt == 5] = 255  # some ignored pixels
    pred = torch.where(torch.rand(3, 16, 16, generator=g) < 0.6, gt.clamp(max=4), torch.randint(0, 5, (3, 16, 16)))
    res = mean_iou(pred, gt, num_classes=5)
    valid = gt != 255
    for c in range(5):
        p, t = (pred == c) & valid, (gt == c) & valid
        assert res["IoU"][c] == pytest.approx(((p & t).sum() / (p | t).sum()).item())


def test_miou_bad_inputs():
    gt = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"pred: expected class ids in \[0, 3\).*got range \[0, 7\]"):
        mean_iou(torch.tensor([[[0, 7], [0, 0]]]), gt, 3)
    with pytest.raises(ValueError, match=r"pred: expected the shape of gt \(1, 2, 2\), got \(1, 2, 3\)"):
        mean_iou(torch.zeros(1, 2, 3, dtype=torch.long), gt, 3)
    with pytest.raises(ValueError, match="pred: expected an integer tensor, got dtype torch.float32"):
        mean_iou(torch.zeros(1, 2, 2), gt, 3)


# ---------------------------------------------------------------- PQ


def seg_map(columns, width=10, height=4):
    """(H, W) map from {segment id: (first column, end column)}; other columns void (0)."""
    m = torch.zeros(height, width, dtype=torch.long)
    for sid, (a, b) in columns.items():
        m[:, a:b] = sid
    return m


def test_pq_perfect_is_one():
    m = seg_map({1: (0, 3), 2: (3, 7), 3: (7, 10)})
    segs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}, {"id": 3, "category_id": 1}]
    res = panoptic_quality([(m, segs)], [(m.clone(), segs)], category_ids=[1, 2])
    assert (res["PQ"], res["SQ"], res["RQ"]) == pytest.approx((1.0, 1.0, 1.0))


def test_pq_hand_computed_partial():
    gt = (seg_map({1: (0, 5), 2: (5, 10)}), [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}])
    # 7 covers 4 of the 5 columns of 1 (IoU 0.8); 8 overlaps 2 by one column of its two (IoU 4/24): FP + FN
    pred = (seg_map({7: (0, 4), 8: (4, 6)}), [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}])
    res = panoptic_quality([pred], [gt], category_ids=[1, 2, 3])
    assert res["per_class"][1] == pytest.approx({"PQ": 0.8, "SQ": 0.8, "RQ": 1.0})
    assert res["per_class"][2] == pytest.approx({"PQ": 0.0, "SQ": 0.0, "RQ": 0.0})
    assert all(math.isnan(v) for v in res["per_class"][3].values())  # absent class, not averaged
    assert (res["PQ"], res["SQ"], res["RQ"]) == pytest.approx((0.4, 0.4, 0.5))


def test_pq_void_pixels_leave_the_union_and_excuse_false_positives():
    gt = (seg_map({1: (0, 5)}), [{"id": 1, "category_id": 1}])  # columns 5-9 void
    # 7 spills three void columns: IoU = 20 / (20 + 32 - 20 - 12) = 1; 8 lies on void only: not a FP
    pred = (seg_map({7: (0, 8), 8: (8, 10)}), [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}])
    res = panoptic_quality([pred], [gt], category_ids=[1, 2])
    assert (res["PQ"], res["SQ"], res["RQ"]) == pytest.approx((1.0, 1.0, 1.0))


def test_pq_crowd_regions():
    gt = (seg_map({1: (0, 5), 2: (5, 10)}), [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1, "iscrowd": 1}])
    # 7 matches 1; 8 sits on the crowd of its own class: neither TP nor FP; crowd 2 is no FN
    pred = (seg_map({7: (0, 5), 8: (5, 10)}), [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}])
    assert panoptic_quality([pred], [gt], category_ids=[1, 2])["PQ"] == pytest.approx(1.0)
    # the same segment with another class is a false positive of that class
    pred[1][1]["category_id"] = 2
    res = panoptic_quality([pred], [gt], category_ids=[1, 2])
    assert res["per_class"][2]["PQ"] == 0.0 and res["PQ"] == pytest.approx(0.5)


def test_pq_accumulates_counts_and_splits_things_and_stuff():
    gt = (seg_map({1: (0, 5), 2: (5, 10)}), [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}])
    good = (seg_map({7: (0, 4), 8: (5, 10)}), [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}])
    missing = (seg_map({8: (5, 10)}), [{"id": 8, "category_id": 2}])
    acc = PanopticQuality([1, 2], thing_ids=[1])
    acc.update(*good, *gt)
    acc.update(*missing, *gt)
    res = acc.compute()
    # class 1 (thing): TP 1 with IoU 0.8 and FN 1 → PQ 0.8 / 1.5; class 2 (stuff): 2 perfect TPs
    assert res["PQ_th"] == pytest.approx(0.8 / 1.5)
    assert res["SQ_th"] == pytest.approx(0.8)
    assert res["PQ_st"] == pytest.approx(1.0)
    assert res["PQ"] == pytest.approx((0.8 / 1.5 + 1.0) / 2)


def reference_pq(pairs, categories):
    """Loop port of panopticapi's pq_compute_single_core + pq_average (one crowd per class)."""
    stat = defaultdict(lambda: [0.0, 0, 0, 0])  # iou, tp, fp, fn
    for (p_map, p_segs), (g_map, g_segs) in pairs:
        p_info = {s["id"]: dict(s) for s in p_segs}
        g_info = {s["id"]: dict(s) for s in g_segs}
        for info, m in ((p_info, p_map), (g_info, g_map)):
            for sid in info:
                info[sid]["area"] = int((m == sid).sum())
        joint = defaultdict(int)
        for g, p in zip(g_map.flatten().tolist(), p_map.flatten().tolist()):
            joint[g, p] += 1
        g_done, p_done = set(), set()
        for (g, p), inter in joint.items():
            if g not in g_info or p not in p_info or g_info[g].get("iscrowd", 0):
                continue
            if g_info[g]["category_id"] != p_info[p]["category_id"]:
                continue
            union = p_info[p]["area"] + g_info[g]["area"] - inter - joint.get((0, p), 0)
            if inter / union > 0.5:
                st = stat[g_info[g]["category_id"]]
                st[0] += inter / union
                st[1] += 1
                g_done.add(g)
                p_done.add(p)
        crowd = {}
        for g, info in g_info.items():
            if g in g_done:
                continue
            if info.get("iscrowd", 0):
                crowd[info["category_id"]] = g
                continue
            stat[info["category_id"]][3] += 1
        for p, info in p_info.items():
            if p in p_done or info["area"] == 0:
                continue
            inter = joint.get((0, p), 0)
            if info["category_id"] in crowd:
                inter += joint.get((crowd[info["category_id"]], p), 0)
            if inter / info["area"] > 0.5:
                continue
            stat[info["category_id"]][2] += 1
    pqs, sqs, rqs = [], [], []
    for c in categories:
        iou, tp, fp, fn = stat[c]
        if tp + fp + fn == 0:
            continue
        pqs.append(iou / (tp + 0.5 * fp + 0.5 * fn))
        sqs.append(iou / tp if tp else 0.0)
        rqs.append(tp / (tp + 0.5 * fp + 0.5 * fn))
    return np.mean(pqs), np.mean(sqs), np.mean(rqs)


def random_panoptic(rng, first_id, n, size=24):
    """Segment map painted with n random rectangles (later ones on top), void elsewhere."""
    m = torch.zeros(size, size, dtype=torch.long)
    for k in range(n):
        y, x = rng.integers(0, size - 4, 2)
        h, w = rng.integers(4, 12, 2)
        m[y : y + h, x : x + w] = first_id + k
    cats = rng.integers(1, 4, n)
    return m, [{"id": first_id + k, "category_id": int(cats[k])} for k in range(n)]


def test_pq_matches_loop_reference_on_random_maps():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(6):
        g_map, g_segs = random_panoptic(rng, 1, 8)
        g_segs[0]["iscrowd"] = 1  # one crowd segment per image
        # prediction: the gt shifted by one pixel, relabelled, with some classes changed and clutter on top
        p_map = torch.where(g_map > 0, g_map + 100, 0).roll(1, dims=int(rng.integers(0, 2)))
        p_segs = [{"id": s["id"] + 100, "category_id": s["category_id"]} for s in g_segs]
        for s in p_segs[1::3]:
            s["category_id"] = s["category_id"] % 3 + 1
        c_map, c_segs = random_panoptic(rng, 200, 2)
        p_map = torch.where(c_map > 0, c_map, p_map)
        pairs.append(((p_map, p_segs + c_segs), (g_map, g_segs)))
    res = panoptic_quality([p for p, _ in pairs], [g for _, g in pairs], category_ids=[1, 2, 3])
    ref = reference_pq(pairs, [1, 2, 3])
    assert 0.1 < ref[0] < 0.9  # a partial score, so matching is exercised
    assert (res["PQ"], res["SQ"], res["RQ"]) == pytest.approx(ref)


def test_pq_bad_inputs():
    m = seg_map({1: (0, 5)})
    segs = [{"id": 1, "category_id": 1}]
    with pytest.raises(ValueError, match=r"gt_map: segment ids \[1\] are in the map but not in the list"):
        panoptic_quality([(m, segs)], [(m, [])], category_ids=[1])
    with pytest.raises(ValueError, match=r"pred_segments: expected category_id in \[1, 2\], got \[5\]"):
        panoptic_quality([(m, [{"id": 1, "category_id": 5}])], [(m, segs)], category_ids=[1, 2])
    with pytest.raises(ValueError, match="pred_segments: expected unique segment ids"):
        panoptic_quality([(m, segs + segs)], [(m, segs)], category_ids=[1])
    with pytest.raises(ValueError, match=r"pred_map: expected the shape of gt_map \(4, 10\), got \(4, 9\)"):
        panoptic_quality([(m[:, :9], segs)], [(m, segs)], category_ids=[1])
    with pytest.raises(ValueError, match="predictions: expected 1 images"):
        panoptic_quality([], [(m, segs)], category_ids=[1])
    with pytest.raises(ValueError, match=r"gt_segments\[0\]: expected keys 'id' and 'category_id'"):
        panoptic_quality([(m, segs)], [(m, [{"id": 1}])], category_ids=[1])
