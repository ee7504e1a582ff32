"""COCO mask AP: known answers, both backends agreeing, and the dataset → COCO json path."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from faster_coco_eval.core import mask as fce_mask

from influencerformer.metrics import build_coco_gt, coco_mask_ap, masks_to_coco_results

BACKENDS = ["faster", "pycocotools"]
CAT_IDS = [1, 5, 9]  # non-contiguous on purpose, as in COCO
NAMES = ["square", "ellipse", "ring"]


def rect_masks(boxes, size=(48, 64)):
    """bool (K, H, W) masks of boxes (y0, y1, x0, x1)."""
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
    return masks


def two_instance_gt():
    masks = rect_masks([(2, 12, 2, 12), (20, 40, 30, 50)])
    item = {"masks": masks, "labels": torch.tensor([0, 0]), "image_id": 7}
    return item, build_coco_gt([item], CAT_IDS, NAMES)


def random_scene(rng, image_id, n, sides=(5, 14)):
    """Random rectangles (side lengths in [sides)) and labels for one 48×64 image, plus noisy
    predictions of them."""
    y0, x0 = rng.integers(0, 48 - sides[1], n), rng.integers(0, 64 - sides[1], n)
    h, w = rng.integers(*sides, n), rng.integers(*sides, n)
    gt_masks = rect_masks(list(zip(y0, y0 + h, x0, x0 + w)))
    labels = torch.as_tensor(rng.integers(0, 3, n))
    # jittered copies (IoU spread over the thresholds), some with a wrong class, plus random clutter
    dy, dx = rng.integers(-1, 2, n), rng.integers(-1, 2, n)
    jitter = rect_masks(list(zip(np.clip(y0 + dy, 0, 47), y0 + h + dy, np.clip(x0 + dx, 0, 63), x0 + w + dx)))
    p_labels = torch.where(torch.as_tensor(rng.random(n) < 0.2), (labels + 1) % 3, labels)
    m = n // 2
    cy, cx = rng.integers(0, 40, m), rng.integers(0, 56, m)
    clutter = rect_masks(list(zip(cy, cy + 8, cx, cx + 8)))
    pred_masks = torch.cat([jitter, clutter])
    pred_labels = torch.cat([p_labels, torch.as_tensor(rng.integers(0, 3, m))])
    scores = torch.as_tensor(rng.random(n + m))
    item = {"masks": gt_masks, "labels": labels, "image_id": image_id}
    return item, masks_to_coco_results(image_id, pred_masks, pred_labels, scores, CAT_IDS)


def assert_results_equal(a, b, tol=1e-6):
    for key, value in a.items():
        if key == "per_class":
            assert value.keys() == b[key].keys()
            for c in value:
                assert value[c] == pytest.approx(b[key][c], abs=tol, nan_ok=True), (key, c)
        else:
            assert value == pytest.approx(b[key], abs=tol, nan_ok=True), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(backend):
    rng = np.random.default_rng(0)
    items = [random_scene(rng, i + 1, 6)[0] for i in range(3)]
    preds = []
    for it in items:
        preds += masks_to_coco_results(it["image_id"], it["masks"], it["labels"], torch.rand(6) + 0.1, CAT_IDS)
    res = coco_mask_ap(build_coco_gt(items, CAT_IDS, NAMES), preds, backend=backend)
    for key in ("AP", "AP50", "AP75", "APs", "AR100"):
        assert res[key] == pytest.approx(1.0), key
    # every box is below 32² px: the medium and large ranges are undefined, reported as NaN
    assert math.isnan(res["APm"]) and math.isnan(res["APl"])


def test_backends_agree_on_noisy_predictions():
    rng = np.random.default_rng(1)
    # small images plus images with medium (≥ 32² px) instances, so every area range is compared
    sides = [(5, 14), (30, 44)]
    scenes = [random_scene(rng, i + 1, int(rng.integers(3, 12)), sides[i % 2]) for i in range(6)]
    gt = build_coco_gt([s[0] for s in scenes], CAT_IDS, NAMES)
    preds = [p for s in scenes for p in s[1]]
    fast, ref = coco_mask_ap(gt, preds, backend="faster"), coco_mask_ap(gt, preds, backend="pycocotools")
    # partial scores in both ranges, so the comparison exercises real matching
    assert 0.05 < ref["AP"] < 0.95 and 0.05 < ref["APm"] < 0.95
    assert_results_equal(fast, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_of_two_instances_found(backend):
    item, gt = two_instance_gt()
    preds = masks_to_coco_results(7, item["masks"][:1], [0], [0.9], CAT_IDS)
    res = coco_mask_ap(gt, preds, backend=backend)
    # precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points
    for key in ("AP", "AP50", "AP75"):
        assert res[key] == pytest.approx(51 / 101), key
    assert res["AR100"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_first_halves_precision(backend):
    item, gt = two_instance_gt()
    masks = torch.cat([rect_masks([(40, 46, 2, 8)]), item["masks"][:1]])
    preds = masks_to_coco_results(7, masks, [0, 0], [0.9, 0.8], CAT_IDS)
    # precision envelope is 1/2 for recall in [0, 0.5]
    assert coco_mask_ap(gt, preds, backend=backend)["AP50"] == pytest.approx(0.5 * 51 / 101)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_overlap_counts_only_thresholds_it_passes(backend):
    item, gt = two_instance_gt()
    gt = build_coco_gt([{**item, "masks": item["masks"][1:], "labels": item["labels"][1:]}], CAT_IDS, NAMES)
    pred = rect_masks([(20, 40, 30, 45)])  # inside the 20×20 gt: IoU = 300 / 400 = 0.75
    pred[0, 20:25, 30:45] = False  # IoU = 225 / 400 = 0.5625: passes 0.50 and 0.55 only
    res = coco_mask_ap(gt, masks_to_coco_results(7, pred, [0], [0.5], CAT_IDS), backend=backend)
    assert res["AP50"] == pytest.approx(1.0)
    assert res["AP75"] == pytest.approx(0.0)
    assert res["AP"] == pytest.approx(2 / 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_predictions_score_zero(backend):
    _, gt = two_instance_gt()
    res = coco_mask_ap(gt, [], backend=backend)
    for key in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100"):
        assert res[key] == 0.0, key
    assert res["per_class"][1] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowded_image_evaluates_100_predictions(backend):
    boxes = [(6 * (k // 8), 6 * (k // 8) + 5, 8 * (k % 8), 8 * (k % 8) + 6) for k in range(40)]
    item = {"masks": rect_masks(boxes), "labels": torch.zeros(40, dtype=torch.long), "image_id": 1}
    gt = build_coco_gt([item], CAT_IDS, NAMES)
    # 60 higher-scored misses come first; the 40 hits are found only if all 100 are evaluated
    junk = rect_masks([(47, 48, 63, 64)] * 60)
    masks = torch.cat([junk, item["masks"]])
    scores = torch.cat([torch.linspace(0.99, 0.9, 60), torch.linspace(0.8, 0.5, 40)])
    res = coco_mask_ap(gt, masks_to_coco_results(1, masks, torch.zeros(100, dtype=torch.long), scores, CAT_IDS),
                       backend=backend)
    assert res["AR100"] == pytest.approx(1.0)
    assert res["AR10"] == 0.0


def test_gt_as_coco_objects_and_path_give_same_result(tmp_path):
    from faster_coco_eval import COCO as FasterCOCO
    from pycocotools.coco import COCO

    rng = np.random.default_rng(2)
    scenes = [random_scene(rng, i + 1, 5) for i in range(2)]
    gt = build_coco_gt([s[0] for s in scenes], CAT_IDS, NAMES)
    preds = [p for s in scenes for p in s[1]]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ref = coco_mask_ap(gt, preds)
    py_coco = COCO(str(path))
    assert_results_equal(coco_mask_ap(py_coco, preds, backend="pycocotools"), ref)
    assert_results_equal(coco_mask_ap(py_coco, preds, backend="faster"), ref)
    assert_results_equal(coco_mask_ap(FasterCOCO(gt), preds), ref)
    assert_results_equal(coco_mask_ap(str(path), preds), ref)


def test_predictions_are_not_modified():
    item, gt = two_instance_gt()
    preds = masks_to_coco_results(7, item["masks"], [0, 1], [0.9, 0.8], CAT_IDS)
    before = copy.deepcopy(preds)
    coco_mask_ap(gt, preds, backend="pycocotools")
    coco_mask_ap(gt, preds, backend="faster")
    assert preds == before


def test_results_are_rle_that_decode_to_the_masks():
    masks = torch.rand(4, 17, 23) > 0.5
    res = masks_to_coco_results(3, masks, torch.tensor([2, 0, 1, 2]), torch.tensor([0.1, 0.2, 0.3, 0.4]), CAT_IDS)
    assert [r["category_id"] for r in res] == [9, 1, 5, 9]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in res)
    json.dumps(res)  # must be serialisable as a COCO results file
    for r, m in zip(res, masks):
        decoded = fce_mask.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), m.numpy())


def test_build_coco_gt_fields():
    item = {"masks": rect_masks([(2, 12, 3, 8), (20, 21, 30, 50)]), "labels": torch.tensor([1, 2]), "image_id": 4}
    empty = {"masks": torch.zeros(0, 48, 64, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long),
             "image_id": 5}
    gt = build_coco_gt([item, empty], CAT_IDS, NAMES)
    assert gt["images"] == [{"id": 4, "height": 48, "width": 64}, {"id": 5, "height": 48, "width": 64}]
    anns = gt["annotations"]
    assert [a["id"] for a in anns] == [1, 2]
    assert [a["category_id"] for a in anns] == [5, 9]
    assert [a["area"] for a in anns] == [50.0, 20.0]
    assert anns[0]["bbox"] == [3.0, 2.0, 5.0, 10.0]  # COCO bbox: x, y, w, h
    assert gt["categories"] == [{"id": c, "name": n} for c, n in zip(CAT_IDS, NAMES)]


def test_bad_inputs_raise_clear_errors():
    item, gt = two_instance_gt()
    good = masks_to_coco_results(7, item["masks"], [0, 0], [0.9, 0.8], CAT_IDS)
    with pytest.raises(ValueError, match="backend: expected 'faster' or 'pycocotools', got 'lvis'"):
        coco_mask_ap(gt, good, backend="lvis")
    with pytest.raises(ValueError, match=r"predictions\[0\]: .*missing \['score'\]"):
        coco_mask_ap(gt, [{k: v for k, v in good[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="image_id 99 is not an image of coco_gt"):
        coco_mask_ap(gt, [{**good[0], "image_id": 99}])
    with pytest.raises(ValueError, match="coco_gt: expected keys .*missing \\['annotations'\\]"):
        coco_mask_ap({"images": [], "categories": []}, good)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\)"):
        masks_to_coco_results(7, item["masks"], [0, 3], [0.9, 0.8], CAT_IDS)
    with pytest.raises(ValueError, match=r"masks: expected shape \(N, H, W\), got \(48, 64\)"):
        masks_to_coco_results(7, item["masks"][0], [0], [0.9], CAT_IDS)
    with pytest.raises(ValueError, match="labels/scores: expected 2 entries"):
        masks_to_coco_results(7, item["masks"], [0], [0.9, 0.8], CAT_IDS)
    with pytest.raises(ValueError, match="class_names: expected 3 names"):
        build_coco_gt([item], CAT_IDS, NAMES[:2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_prints_nothing(backend, capsys):
    item, gt = two_instance_gt()
    coco_mask_ap(gt, masks_to_coco_results(7, item["masks"], [0, 0], [0.9, 0.8], CAT_IDS), backend=backend)
    coco_mask_ap(gt, [], backend=backend)
    assert capsys.readouterr().out == ""
