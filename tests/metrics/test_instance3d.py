"""ScanNet-protocol 3D instance AP: known answers, the min-region rules, and a loop-for-loop port of
ScanNet's evaluate_semantic_instance.py as the reference on random scenes."""

import json
import math

import numpy as np
import pytest
import torch

from influencerformer.metrics.instance3d import IOU_THRESHOLDS, InstanceAP3D, instance_ap_3d, semantic_miou_3d


def _labels_gt(sizes, classes, void=0):
    """Per-point ground truth: instance i has sizes[i] consecutive points of class classes[i]; then void."""
    inst = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)] + [torch.full((void,), -1)])
    sem = torch.cat([torch.full((n,), c) for n, c in zip(sizes, classes)] + [torch.full((void,), -1)])
    return {"instance_labels": inst, "sem_labels": sem}


def _pred(num_points, spans, labels, scores):
    masks = torch.zeros(len(spans), num_points, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        masks[i, a:b] = True
    return {"masks": masks, "labels": torch.tensor(labels), "scores": torch.tensor(scores)}


def test_perfect_predictions_score_one():
    gt = [_labels_gt([120, 150, 200], [0, 1, 0], void=30), _labels_gt([300, 110], [2, 1])]
    preds = []
    for g in gt:
        ids = g["instance_labels"].unique()
        ids = ids[ids >= 0]
        masks = g["instance_labels"][None] == ids[:, None]
        preds.append(
            {"masks": masks, "labels": g["sem_labels"][masks.float().argmax(1)], "scores": torch.rand(len(ids))}
        )
    res = instance_ap_3d(preds, gt, class_names=["a", "b", "c"])
    assert (res["AP"], res["AP50"], res["AP25"]) == (1.0, 1.0, 1.0)
    assert res["per_class"]["c"] == {"AP": 1.0, "AP50": 1.0, "AP25": 1.0}


def test_hand_computed_partial_case():
    # class 0: A = points 0-9, B = 10-59; class 1: C = 60-69
    gt = [_labels_gt([10, 50, 10], [0, 0, 1])]
    # p1 = A exactly (0.9); p2 = 39 of B's 50 points, IoU 0.78 (0.8); p3 = class 0 on C, a false positive (0.95)
    pred = [_pred(70, [(0, 10), (10, 49), (60, 70)], [0, 0, 0], [0.9, 0.8, 0.95])]
    res = instance_ap_3d(pred, gt, min_region_size=1)
    # thresholds <= 0.75: T, T, F with the F scored highest → P/R points (2/3, 1), (1/2, 1/2), (0, 0)
    # and ScanNet's step widths .25, .5, .25 → AP = 2/3·.25 + 1/2·.5 = 5/12.
    # thresholds 0.8-0.9: p2 is a false positive and B a missed instance → AP = 1/2·.25 = 1/8
    ap0 = (6 * 5 / 12 + 3 / 8) / 9
    assert res["per_class"]["0"]["AP"] == pytest.approx(ap0)
    assert res["per_class"]["0"]["AP50"] == pytest.approx(5 / 12)
    assert res["per_class"]["1"] == {"AP": 0.0, "AP50": 0.0, "AP25": 0.0}  # ground truth, no prediction
    assert res["AP"] == pytest.approx(ap0 / 2)
    assert res["AP50"] == pytest.approx(5 / 24) and res["AP25"] == pytest.approx(5 / 24)


def test_small_ground_truth_is_ignored_and_predictions_on_it_are_not_false_positives():
    # class 0: big (0-199) and small (200-249, 50 points); 50 void points at the end
    gt = [_labels_gt([200, 50], [0, 0], void=50)]
    hit_big = (0, 200)
    on_small = (200, 250)
    assert instance_ap_3d([_pred(300, [hit_big], [0], [0.5])], gt)["AP"] == 1.0  # the missed small one is not counted
    # a higher-scored prediction exactly on the small instance is neither a TP nor an FP
    assert instance_ap_3d([_pred(300, [hit_big, on_small], [0, 0], [0.5, 0.9])], gt)["AP"] == 1.0
    # ... nor is one lying on void (ignored fraction 1 > every threshold)
    assert instance_ap_3d([_pred(300, [hit_big, (250, 300)], [0, 0], [0.5, 0.9])], gt)["AP"] == 1.0
    # with min_region_size 1 the small instance counts: missed → recall 1/2 at every threshold
    res = instance_ap_3d([_pred(300, [hit_big], [0], [0.5])], gt, min_region_size=1)
    assert res["AP"] == pytest.approx(0.5)


def test_predictions_below_min_region_size_are_dropped():
    gt = [_labels_gt([200, 300], [0, 0])]
    tiny_fp = (200, 260)  # 60 points inside the second instance: IoU 0.2, a false positive if kept
    pred = [_pred(500, [(0, 200), (200, 500), tiny_fp], [0, 0, 0], [0.5, 0.5, 0.9])]
    assert instance_ap_3d(pred, gt)["AP"] == 1.0
    assert instance_ap_3d(pred, gt, min_region_size=50)["AP"] < 1.0


def test_empty_predictions_give_zero_and_absent_classes_nan():
    gt = [_labels_gt([150], [1]), _labels_gt([120], [1])]
    empty = {"masks": torch.zeros(0, 150, dtype=torch.bool), "labels": torch.zeros(0), "scores": torch.zeros(0)}
    also_empty = {"masks": [], "labels": [], "scores": []}
    res = instance_ap_3d([empty, also_empty], gt, class_names=["a", "b"])
    assert (res["AP"], res["AP50"], res["AP25"]) == (0.0, 0.0, 0.0)
    assert math.isnan(res["per_class"]["a"]["AP"])  # no ground truth of class a: left out, not 0
    none = instance_ap_3d([], [])
    assert math.isnan(none["AP"]) and none["per_class"] == {}


def test_mask_form_equals_label_form_and_class_map():
    g = _labels_gt([120, 130, 140], [5, 7, 9], void=10)
    ids = torch.arange(3)
    masks = g["instance_labels"][None] == ids[:, None]
    pred = [_pred(400, [(0, 100), (120, 250), (250, 400)], [0, 1, 2], [0.3, 0.6, 0.9])]
    class_map = [-1] * 5 + [0, -1, 1, -1, 2]
    by_labels = instance_ap_3d(pred, [g], class_map=class_map)
    by_masks = instance_ap_3d(pred, [{"masks": masks, "labels": torch.tensor([0, 1, 2])}])
    assert by_labels == by_masks
    assert by_labels["per_class"]["1"]["AP"] == 1.0 and by_labels["per_class"]["0"]["AP50"] == 1.0
    # class 7 → -1 makes instance 1 void: the prediction on it is then ignored, class 1 has no gt
    unmapped = instance_ap_3d(pred, [g], class_map=[-1] * 5 + [0, -1, -1, -1, 2], class_names=["x", "y", "z"])
    assert math.isnan(unmapped["per_class"]["y"]["AP"])


def test_errors_name_the_scene_and_field():
    gt = [_labels_gt([10], [0])]
    with pytest.raises(ValueError, match=r"predictions\[0\]\['masks'\]: expected shape \(N, 10\).*got \(1, 9\)"):
        instance_ap_3d([_pred(9, [(0, 5)], [0], [1.0])], gt)
    with pytest.raises(ValueError, match=r"predictions\[0\]\['labels'\]: expected class indices in \[0, 2\).*\[4\]"):
        instance_ap_3d([_pred(10, [(0, 5)], [4], [1.0])], gt, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"predictions\[0\]: expected labels and scores of length 1.*got 1 and 2"):
        instance_ap_3d([_pred(10, [(0, 5)], [0], [1.0, 2.0])], gt)
    with pytest.raises(ValueError, match=r"ground_truths\[0\]: expected a dict with keys"):
        instance_ap_3d([_pred(10, [(0, 5)], [0], [1.0])], [{"sem_labels": torch.zeros(10)}])
    with pytest.raises(ValueError, match="expected 1 scenes"):
        instance_ap_3d([], gt)


# ---------------------------------------------------------------- reference port


def _reference_ap(preds, gts, num_classes, min_region_size):
    """ScanNet evaluate_semantic_instance.py (assign_instances_for_scan + evaluate_matches), loop for loop."""
    matches = []
    for s, (p, g) in enumerate(zip(preds, gts)):
        inst, sem = g["instance_labels"].numpy(), g["sem_labels"].numpy()
        gt_list = {c: [] for c in range(num_classes)}
        for i in np.unique(inst[inst >= 0]):
            gt_list[int(sem[inst == i][0])].append({"id": i, "count": int((inst == i).sum()), "matched_pred": []})
        void = inst < 0
        pred_list = {c: [] for c in range(num_classes)}
        for j in range(len(p["masks"])):
            m = p["masks"][j].numpy()
            c, num = int(p["labels"][j]), int(m.sum())
            if num < min_region_size:
                continue
            pr = {
                "name": (s, j),
                "count": num,
                "conf": float(p["scores"][j]),
                "void": int((m & void).sum()),
                "matched_gt": [],
            }
            for gi in gt_list[c]:
                inter = int((m & (inst == gi["id"])).sum())
                if inter > 0:
                    pr["matched_gt"].append({**gi, "inter": inter})
                    gi["matched_pred"].append({**pr, "inter": inter})
            pred_list[c].append(pr)
        matches.append((gt_list, pred_list))
    ap = np.zeros((num_classes, len(IOU_THRESHOLDS)))
    for oi, th in enumerate(IOU_THRESHOLDS):
        visited = {}
        for c in range(num_classes):
            y_true, y_score, hard_fn, has_gt, has_pred = [], [], 0, False, False
            for gt_list, pred_list in matches:
                gts_c = [gi for gi in gt_list[c] if gi["count"] >= min_region_size]
                has_gt |= bool(gts_c)
                has_pred |= bool(pred_list[c])
                cur_true, cur_score, cur_match = [1.0] * len(gts_c), [-math.inf] * len(gts_c), [False] * len(gts_c)
                for k, gi in enumerate(gts_c):
                    found = False
                    for pr in gi["matched_pred"]:
                        if visited.get(pr["name"]):
                            continue
                        if pr["inter"] / (gi["count"] + pr["count"] - pr["inter"]) > th:
                            if cur_match[k]:
                                lo, cur_score[k] = min(cur_score[k], pr["conf"]), max(cur_score[k], pr["conf"])
                                cur_true.append(0.0), cur_score.append(lo), cur_match.append(True)
                            else:
                                found, cur_match[k], cur_score[k] = True, True, pr["conf"]
                                visited[pr["name"]] = True
                    hard_fn += not found
                y_true += [t for t, m in zip(cur_true, cur_match) if m]
                y_score += [t for t, m in zip(cur_score, cur_match) if m]
                for pr in pred_list[c]:
                    if any(gi["inter"] / (gi["count"] + pr["count"] - gi["inter"]) > th for gi in pr["matched_gt"]):
                        continue
                    ignore = pr["void"] + sum(gi["inter"] for gi in pr["matched_gt"] if gi["count"] < min_region_size)
                    if ignore / pr["count"] <= th:
                        y_true.append(0.0), y_score.append(pr["conf"])
            if has_gt and has_pred:
                yt, ys = np.array(y_true), np.array(y_score)
                order = np.argsort(ys)
                ys, yt = ys[order], yt[order]
                cs = np.cumsum(yt)
                _, uniq = np.unique(ys, return_index=True)
                n_true = cs[-1] if len(cs) else 0
                prec, rec = np.zeros(len(uniq) + 1), np.zeros(len(uniq) + 1)
                cs = np.append(cs, 0)
                for r, u in enumerate(uniq):
                    tp = n_true - cs[u - 1]
                    prec[r], rec[r] = tp / (len(ys) - u), tp / (n_true + hard_fn)
                prec[-1], rec[-1] = 1.0, 0.0
                steps = np.convolve(np.append(np.append(rec[0], rec), 0.0), [-0.5, 0, 0.5], "valid")
                ap[c, oi] = np.dot(prec, steps)
            else:
                ap[c, oi] = 0.0 if has_gt else np.nan
    return ap


def _random_case(gen, num_scenes=4, num_classes=3):
    preds, gts = [], []
    for _ in range(num_scenes):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        sizes = torch.randint(5, 60, (k,), generator=gen).tolist()
        g = _labels_gt(sizes, torch.randint(0, num_classes, (k,), generator=gen).tolist(), void=20)
        p_count = sum(sizes) + 20
        inst = g["instance_labels"]
        copies = torch.stack([inst == i for i in range(k) for _ in range(2)])  # pairs → duplicates
        drop, add = torch.rand(2, 2 * k, p_count, generator=gen) < torch.tensor([0.2, 0.03])[:, None, None]
        copies = (copies & ~drop) | add  # noisy copies: IoU spread around the thresholds
        unions = torch.stack([(inst == i) | (inst == i + 1) for i in range(k - 1)])  # overlap two instances
        extra = torch.rand(3, p_count, generator=gen) < 0.2
        masks = torch.cat([copies, unions, extra])
        labels = torch.randint(0, num_classes, (len(masks),), generator=gen)
        scores = torch.randint(0, 6, (len(masks),), generator=gen) / 5.0  # ties on purpose
        preds.append({"masks": masks, "labels": labels, "scores": scores})
        gts.append(g)
    return preds, gts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("min_region_size", [1, 15])
def test_matches_loop_reference_on_random_scenes(seed, min_region_size):
    preds, gts = _random_case(torch.Generator().manual_seed(seed))
    ref = _reference_ap(preds, gts, 3, min_region_size)
    res = instance_ap_3d(preds, gts, min_region_size=min_region_size, class_names=["a", "b", "c"])
    main = ~np.isclose(IOU_THRESHOLDS, 0.25)
    for k, name in enumerate("abc"):
        want = ref[k, main].mean()
        got = res["per_class"][name]["AP"]
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)
        assert res["per_class"][name]["AP25"] == pytest.approx(ref[k, -1], nan_ok=True)
    assert res["AP"] == pytest.approx(np.nanmean(ref[:, main]))


@pytest.mark.parametrize("seed", range(3))
def test_accumulator_equals_all_scenes_at_once(seed):
    preds, gts = _random_case(torch.Generator().manual_seed(seed))
    acc = InstanceAP3D(["a", "b", "c"], min_region_size=15)
    for p, g in zip(preds, gts):
        acc.update(p, g)
    want = instance_ap_3d(preds, gts, min_region_size=15, class_names=["a", "b", "c"])
    assert json.dumps(acc.compute(), sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN-equal, exact


def test_accumulator_names_the_scene_of_a_bad_label():
    acc = InstanceAP3D(["a"])
    acc.update({"masks": torch.ones(1, 4, dtype=torch.bool), "labels": torch.tensor([0]), "scores": torch.ones(1)},
               {"masks": torch.ones(1, 4, dtype=torch.bool), "labels": torch.tensor([0])})
    with pytest.raises(ValueError, match=r"scene 1 prediction\['labels'\]: expected class indices in \[0, 1\)"):
        acc.update({"masks": torch.ones(1, 4, dtype=torch.bool), "labels": torch.tensor([3]), "scores": torch.ones(1)},
                   {"masks": torch.ones(1, 4, dtype=torch.bool), "labels": torch.tensor([0])})


def test_semantic_miou_3d_sums_counts_over_scenes():
    gt = [torch.tensor([0, 0, 1, -1]), torch.tensor([1, 1])]
    pred = [torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1])]
    res = semantic_miou_3d(pred, gt, num_classes=2)
    # class 0: tp 1, union 2; class 1: tp 3, union 4 (the ignored point is not counted)
    assert res["mIoU"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    with pytest.raises(ValueError, match=r"pred_labels\[1\]: expected shape \(2,\)"):
        semantic_miou_3d([pred[0], torch.tensor([1])], gt, num_classes=2)
