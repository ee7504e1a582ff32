"""Post-processing on constructed (class, mask) pairs with hand-computed answers."""

import math

import pytest
import torch

from influencerformer.models import instance_inference, panoptic_inference, semantic_inference


def logits_from_probs(rows):
    """Class logits whose softmax is exactly ``rows`` (each row sums to 1, last column = no object)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# Q=3 queries, C=2 classes. Class table without no-object: q0 [.7 .2], q1 [.1 .6], q2 [.25 .35].
INSTANCE_LOGITS = logits_from_probs([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.35, 0.4]])
INSTANCE_MASKS = torch.tensor([
    [[2.0, -1.0], [0.5, -3.0]],  # left column foreground: mask score (sig(2) + sig(.5)) / 2
    [[4.0, -1.0], [-1.0, -1.0]],  # one pixel: mask score sig(4)
    [[1.0, 1.0], [1.0, 1.0]],  # everything: mask score sig(1)
])


def test_instance_inference_scores_and_order():
    out = instance_inference(INSTANCE_LOGITS, INSTANCE_MASKS, topk=3)
    # Top-3 class scores: (q0, c0) .7, (q1, c1) .6, (q2, c1) .35; final = class x mask score.
    s0 = 0.7 * (sigmoid(2) + sigmoid(0.5)) / 2  # 0.526
    s1 = 0.6 * sigmoid(4)  # 0.589: beats q0 once mask quality counts
    s2 = 0.35 * sigmoid(1)
    torch.testing.assert_close(out["scores"], torch.tensor([s1, s0, s2]), atol=1e-5, rtol=1e-5)
    assert out["labels"].tolist() == [1, 0, 1]
    assert out["query_indices"].tolist() == [1, 0, 2]
    assert out["masks"].dtype == torch.bool
    assert out["masks"][1].tolist() == [[True, False], [True, False]]
    assert out["masks"][0].tolist() == [[True, False], [False, False]]


def test_instance_inference_topk_is_over_queries_times_classes():
    top2 = instance_inference(INSTANCE_LOGITS, INSTANCE_MASKS, topk=2)
    assert sorted(zip(top2["query_indices"].tolist(), top2["labels"].tolist())) == [(0, 0), (1, 1)]
    everything = instance_inference(INSTANCE_LOGITS, INSTANCE_MASKS, topk=100)
    assert len(everything["scores"]) == 6  # clamped to Q x C; a query appears once per class
    assert sorted(everything["query_indices"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.all(everything["scores"][:-1] >= everything["scores"][1:])


def test_instance_inference_upsamples_before_binarising():
    masks = torch.tensor([[[2.0, -2.0], [2.0, -2.0]]])
    out = instance_inference(logits_from_probs([[0.9, 0.1]]), masks, image_size=(4, 4), topk=1)
    # Bilinear (align_corners=False) 2 -> 4 columns gives logits 2, 1, -1, -2.
    assert out["masks"].shape == (1, 4, 4)
    assert out["masks"][0].tolist() == [[True, True, False, False]] * 4
    torch.testing.assert_close(out["scores"], torch.tensor([0.9 * (sigmoid(2) + sigmoid(1)) / 2]))


def test_semantic_inference_hand_computed():
    logits = logits_from_probs([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2]])
    masks = torch.tensor([[[3.0, -3.0]], [[-3.0, 3.0]]])  # q0 left pixel, q1 right pixel
    sem = semantic_inference(logits, masks)
    assert sem.shape == (2, 1, 2)
    hi, lo = sigmoid(3), sigmoid(-3)
    expected = torch.tensor([[[0.8 * hi + 0.2 * lo, 0.8 * lo + 0.2 * hi]],
                             [[0.1 * hi + 0.6 * lo, 0.1 * lo + 0.6 * hi]]])
    torch.testing.assert_close(sem, expected)
    assert sem.argmax(0).tolist() == [[0, 1]]
    assert semantic_inference(logits, masks, image_size=(3, 4)).shape == (2, 3, 4)


def box_mask(cols, shape=(4, 4), inside=5.0):
    """Logits +inside on the given columns, -5 elsewhere: (H, W)."""
    m = torch.full(shape, -5.0)
    m[:, cols] = inside
    return m


def test_panoptic_drops_no_object_and_low_confidence():
    logits = logits_from_probs([[0.05, 0.05, 0.9], [0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])
    masks = torch.stack([box_mask([0]), box_mask([1]), box_mask([2, 3])])
    seg, info = panoptic_inference(logits, masks)
    # q0: best is no object; q1: 0.7 <= 0.8 threshold; only q2 becomes segment 1.
    assert info == [{"id": 1, "category_id": 1, "isthing": True}]
    assert seg.dtype == torch.long
    assert seg.tolist() == [[0, 0, 1, 1]] * 4


def test_panoptic_overlap_filter():
    logits = logits_from_probs([[0.95, 0.03, 0.02], [0.03, 0.9, 0.07]])
    masks = torch.stack([box_mask([0, 1]), box_mask([1, 2, 3])])
    # q1 wins columns 2-3 only (q0 has the higher score on column 1): 8 / 12 = 0.67 of its own mask.
    seg, info = panoptic_inference(logits, masks, overlap_threshold=0.8)
    assert [s["category_id"] for s in info] == [0]
    assert seg.tolist() == [[1, 1, 0, 0]] * 4
    seg, info = panoptic_inference(logits, masks, overlap_threshold=0.6)
    assert info == [{"id": 1, "category_id": 0, "isthing": True}, {"id": 2, "category_id": 1, "isthing": True}]
    assert seg.tolist() == [[1, 1, 2, 2]] * 4


def test_panoptic_merges_stuff_of_one_class():
    logits = logits_from_probs([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.05, 0.92, 0.03]])
    masks = torch.stack([box_mask([0]), box_mask([1]), box_mask([2, 3])])
    seg, info = panoptic_inference(logits, masks, thing_ids=[0])
    # Class 1 is stuff: q0 opens segment 1, q2 joins it; thing q1 is segment 2.
    assert info == [{"id": 1, "category_id": 1, "isthing": False}, {"id": 2, "category_id": 0, "isthing": True}]
    assert seg.tolist() == [[1, 2, 1, 1]] * 4
    _, info_things = panoptic_inference(logits, masks)
    assert [s["id"] for s in info_things] == [1, 2, 3]


def test_panoptic_empty_and_pixels_below_half_stay_void():
    seg, info = panoptic_inference(logits_from_probs([[0.1, 0.1, 0.8]]), torch.zeros(1, 2, 2))
    assert info == [] and seg.tolist() == [[0, 0], [0, 0]]
    masks = box_mask([0, 1], inside=5.0)[None]
    masks[0, :, 1] = -0.5  # sigmoid < 0.5: the query wins it (only query) but it is not its mask
    seg, info = panoptic_inference(logits_from_probs([[0.95, 0.05]]), masks, overlap_threshold=0.5)
    assert len(info) == 1 and seg.tolist() == [[1, 0, 0, 0]] * 4


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"pred_masks has 2 queries, pred_logits has 3"):
        instance_inference(INSTANCE_LOGITS, INSTANCE_MASKS[:2])
    with pytest.raises(ValueError, match=r"pred_logits must be \(Q, C\+1\) with C >= 1, got \(3,\)"):
        semantic_inference(INSTANCE_LOGITS[:, 0], INSTANCE_MASKS)
    with pytest.raises(ValueError, match=r"pred_masks must be \(Q, h, w\), got \(3, 4\)"):
        panoptic_inference(INSTANCE_LOGITS, INSTANCE_MASKS.flatten(1))
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\) with positive ints, got \(0, 4\)"):
        instance_inference(INSTANCE_LOGITS, INSTANCE_MASKS, image_size=(0, 4))
    with pytest.raises(ValueError, match="topk must be >= 1, got 0"):
        instance_inference(INSTANCE_LOGITS, INSTANCE_MASKS, topk=0)
    with pytest.raises(ValueError, match=r"thing_ids must lie in \[0, 2\), got \[0, 5\]"):
        panoptic_inference(logits_from_probs([[0.9, 0.05, 0.05]]), torch.ones(1, 2, 2), thing_ids=[0, 5])


def reference_panoptic(mask_cls, mask_pred, object_mask_threshold, overlap_threshold, thing_ids):
    """Mask2Former's ``panoptic_inference`` loop, transcribed as the reference for the vectorised one."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    mask_pred = mask_pred.sigmoid()
    num_classes = mask_cls.shape[-1] - 1
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    panoptic_seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.long)
    segments_info, current_segment_id, stuff_memory = [], 0, {}
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        isthing = pred_class in thing_ids
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if pred_class in stuff_memory:
                    panoptic_seg[mask] = stuff_memory[pred_class]
                    continue
                stuff_memory[pred_class] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "category_id": int(pred_class), "isthing": isthing})
    return panoptic_seg, segments_info


@pytest.mark.parametrize("seed", range(2, 8))
def test_panoptic_matches_mask2former_loop(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, 5, generator=g) * 3
    masks = torch.randn(10, 4, 4, generator=g) * 4 - 3  # coarse sparse blobs, upsampled to the image
    thing_ids = [0, 2]
    seg, info = panoptic_inference(logits, masks, (9, 11), object_mask_threshold=0.5, overlap_threshold=0.6,
                                   thing_ids=thing_ids)
    big = torch.nn.functional.interpolate(masks[None], size=(9, 11), mode="bilinear", align_corners=False)[0]
    ref_seg, ref_info = reference_panoptic(logits, big, 0.5, 0.6, thing_ids)
    assert len(ref_info) >= 2  # a random case that exercises the merge, not an empty one
    assert info == ref_info
    assert torch.equal(seg, ref_seg)
    all_things = reference_panoptic(logits, big, 0.5, 0.6, thing_ids=range(4))[1]
    assert panoptic_inference(logits, masks, (9, 11), object_mask_threshold=0.5, overlap_threshold=0.6)[1] == all_things
