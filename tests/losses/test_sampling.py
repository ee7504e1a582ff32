"""Point sampling: detectron2/Mask2Former conventions, vectorised uncertainty sampling, every-location helper."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former import modeling_mask2former as hf

from influencerformer.losses.sampling import (
    draw_uncertainty_random,
    flatten_to_points,
    grid_point_coords,
    point_sample,
    target_masks_at_prediction_grid,
    uncertainty_point_coords,
    uniform_point_coords,
)


def test_point_sample_equals_hf_sample_point():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 9, 11, generator=g)
    coords = torch.rand(3, 17, 2, generator=g)
    ours = point_sample(x, coords)
    assert ours.shape == (3, 2, 17)
    torch.testing.assert_close(ours, hf.sample_point(x, coords, align_corners=False))


def test_point_sample_reads_pixel_centres_exactly():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    coords = grid_point_coords(3, 4)[None]
    torch.testing.assert_close(point_sample(x, coords)[0, 0], torch.arange(12.0))


def test_grid_coords_are_x_then_y_row_major():
    coords = grid_point_coords(2, 4)
    torch.testing.assert_close(coords[1], torch.tensor([0.375, 0.25]))  # row 0, column 1
    torch.testing.assert_close(coords[4], torch.tensor([0.125, 0.75]))  # row 1, column 0


def test_uniform_coords_shape_and_range():
    c = uniform_point_coords(4, 100, "cpu")
    assert c.shape == (4, 100, 2) and c.min() >= 0 and c.max() < 1


def test_uncertainty_sampling_equals_hf_under_same_seed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 12, 12, generator=g) * 3
    loss = hf.Mask2FormerLoss(Mask2FormerConfig(num_labels=3), {})
    torch.manual_seed(7)
    ref = loss.sample_points_using_uncertainty(logits, loss.calculate_uncertainty, 40, 3.0, 0.75)
    torch.manual_seed(7)
    ours = uncertainty_point_coords(logits, 40, 3.0, 0.75)
    assert ours.shape == (5, 40, 2)
    torch.testing.assert_close(ours, ref)


def test_uncertainty_sampling_picks_the_most_uncertain_candidates():
    logits = torch.randn(2, 1, 8, 8) * 5
    candidates, extra = draw_uncertainty_random(2, 10, 4.0, 0.5)
    assert candidates.shape == (2, 40, 2) and extra.shape == (2, 5, 2)
    coords = uncertainty_point_coords(logits, 10, 4.0, 0.5, random_draws=(candidates, extra))
    values = point_sample(logits, candidates)[:, 0].abs()
    chosen = point_sample(logits, coords[:, :5])[:, 0].abs()
    # every chosen point is at least as uncertain (|logit| as small) as every rejected candidate
    kth = values.sort(dim=1).values[:, 4]
    assert (chosen <= kth[:, None] + 1e-6).all()
    torch.testing.assert_close(coords[:, 5:], extra)


def test_uncertainty_sampling_all_importance_draws_no_extra():
    candidates, extra = draw_uncertainty_random(3, 8, 2.0, 1.0)
    assert extra.shape == (3, 0, 2)
    assert uncertainty_point_coords(torch.randn(3, 1, 4, 4), 8, 2.0, 1.0).shape == (3, 8, 2)


def test_targets_same_resolution_are_flattened():
    t = torch.rand(3, 5, 6) > 0.5
    torch.testing.assert_close(target_masks_at_prediction_grid(t, (5, 6)), t.float().flatten(1))


def test_targets_at_higher_resolution_average_the_covered_pixels():
    # a 2x upsampled target read at the centres of a 4x4 grid: the bilinear midpoint of each 2x2 block
    t = torch.rand(2, 8, 8) > 0.5
    expected = F.avg_pool2d(t.float()[None], 2)[0].flatten(1)
    torch.testing.assert_close(target_masks_at_prediction_grid(t, (4, 4)), expected)


def test_flatten_to_points_images_and_point_clouds():
    pred = torch.randn(2, 3, 4, 5)
    pred_pts, tgt = flatten_to_points(pred, torch.zeros(6, 8, 10, dtype=torch.bool))
    assert pred_pts.shape == (2, 3, 20) and tgt.shape == (6, 20)
    cloud = torch.randn(2, 3, 50)
    pred_pts, tgt = flatten_to_points(cloud, torch.ones(4, 50, dtype=torch.bool))
    assert pred_pts is cloud and tgt.dtype == torch.float32 and tgt.shape == (4, 50)


def test_point_cloud_size_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 49\).*P = 50"):
        target_masks_at_prediction_grid(torch.ones(4, 49, dtype=torch.bool), (50,))


def test_point_sample_bad_shapes():
    with pytest.raises(ValueError, match=r"expected input \(N, C, H, W\) and coords \(N, P, 2\)"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match=r"expected logits \(N, 1, H, W\)"):
        uncertainty_point_coords(torch.zeros(2, 3, 4, 4), 5)
