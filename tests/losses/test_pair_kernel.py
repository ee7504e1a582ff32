"""pair_kernel: the sparse path (segment sums by instance id) equals the dense one, values and gradients.

The dense reference is ``PairTerms`` without ids (four matmuls against the target masks) and the plain
``pairwise_sigmoid_bce`` / ``pairwise_dice``; everything in float64 so that equality is to rounding.
"""
import pytest
import torch
import torch.nn.functional as F

from influencerformer.losses import pair_kernel
from influencerformer.losses.criterion import HungarianCriterion
from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion
from influencerformer.losses.mask_losses import pairwise_dice, pairwise_sigmoid_bce
from influencerformer.losses.pair_kernel import PairTerms, dense_pair_terms, instance_ids, pair_terms
from influencerformer.losses.sampling import sample_pixels

B, Q, H, W, K = 2, 7, 6, 7, 4


def targets_of(ids, k, dtype=torch.float64):
    """Instance ids ``(B, P)`` in [0, K] (K: none) -> disjoint binary targets with their ones row ``(B, K + 1, P)``."""
    t = F.one_hot(ids, k + 1).transpose(1, 2).to(dtype)
    t[:, k] = 1
    return t


def logits(seed=3, q=Q, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    masks = 3 * torch.randn(B, q, H, W, generator=gen, dtype=dtype)
    masks[0, 0, 0, :3] = torch.tensor([-120.0, 60.0, 0.0], dtype=dtype)  # saturated logits
    return masks.requires_grad_()


def random_ids(p, k, seed=5):
    ids = torch.randint(0, k + 1, (B, p), generator=torch.Generator().manual_seed(seed))
    ids[0, :5] = 1  # a run of one instance (the lanes of the segment sums)
    return ids


@pytest.fixture
def path_taken(monkeypatch):
    """Records, per call of ``_pair_sums``, whether it summed by instance id (sparse) or by matmul (dense)."""
    taken = []
    real = pair_kernel._pair_sums

    def spy(values, targets1, lanes):
        taken.append("sparse" if lanes is not None else "dense")
        return real(values, targets1, lanes)

    monkeypatch.setattr(pair_kernel, "_pair_sums", spy)
    return taken


@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("chunk", [None, 2 * 20 * 3])  # None: one chunk; else 3 queries per chunk (3, 3, 1)
def test_sparse_equals_dense_values_and_gradients(monkeypatch, path_taken, with_index, chunk):
    if chunk is not None:
        monkeypatch.setattr(pair_kernel, "_CPU_CHUNK_ELEMENTS", chunk)
    masks = logits()
    index = sample_pixels(B, 20, H, W) if with_index else None
    p = 20 if with_index else H * W
    tgt1 = targets_of(random_ids(p, K), K)
    tgt = tgt1[:, :K]

    def node(m):
        return pair_terms(m.flatten(2), index, tgt1)

    flat = masks.flatten(2)
    points = flat if index is None else flat.gather(2, index[:, None].expand(-1, Q, -1))
    bce, dice = node(masks)
    assert set(path_taken) == {"sparse"}
    dense_bce, dense_dice = PairTerms.apply(flat, index, tgt1, None)
    for got, dense, ref in ((bce, dense_bce, pairwise_sigmoid_bce(points, tgt)), (dice, dense_dice, pairwise_dice(points, tgt))):
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(node, (masks,))  # several backward passes: also the retain_graph path
    gen = torch.Generator().manual_seed(4)
    w1, w2 = (torch.rand(B, Q, K, generator=gen, dtype=torch.float64) for _ in range(2))
    bce, dice = node(masks)
    loss = (w1 * bce + w2 * dice).sum()
    first = torch.autograd.grad(loss, masks, retain_graph=True)[0]
    second = torch.autograd.grad(loss, masks)[0]  # s is recomputed: the first backward reused its buffer
    dense_bce, dense_dice = PairTerms.apply(masks.flatten(2), index, tgt1, None)
    want = torch.autograd.grad((w1 * dense_bce + w2 * dense_dice).sum(), masks)[0]
    reference = torch.autograd.grad((w1 * pairwise_sigmoid_bce(points, tgt) + w2 * pairwise_dice(points, tgt)).sum(),
                                    masks)[0]
    torch.testing.assert_close(first, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=1e-14)


def test_no_instances():
    masks = logits()
    tgt1 = torch.ones(B, 1, H * W, dtype=torch.float64)
    assert torch.equal(instance_ids(tgt1[:, :0]), torch.zeros(B, H * W, dtype=torch.int64))
    bce, dice = pair_terms(masks.flatten(2), None, tgt1)
    assert bce.shape == dice.shape == (B, Q, 0)
    (grad,) = torch.autograd.grad(bce.sum() + dice.sum(), masks)
    assert torch.equal(grad, torch.zeros_like(masks))


def test_empty_instances_and_padding_rows(path_taken):
    """An instance with no location (a padding row of the criterion's K_max, or a mask outside the samples)."""
    masks = logits()
    ids = random_ids(H * W, K)
    ids[ids == 2] = K  # instance 2 is empty in both images
    ids[1][ids[1] == 0] = 3  # instance 0 is empty in image 1
    tgt1 = targets_of(ids, K)
    gen = torch.Generator().manual_seed(6)
    w1, w2 = (torch.rand(B, Q, K, generator=gen, dtype=torch.float64) for _ in range(2))
    got = pair_terms(masks.flatten(2), None, tgt1)
    assert path_taken == ["sparse", "sparse"]
    want = PairTerms.apply(masks.flatten(2), None, tgt1, None)
    for g, d in zip(got, want):
        torch.testing.assert_close(g, d, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad((w1 * bce + w2 * dice).sum(), masks)[0] for bce, dice in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("change", ["overlap", "fraction", "negative", "above_one", "nan"])
def test_targets_that_are_not_disjoint_binary_take_the_dense_path(path_taken, change):
    masks = logits()
    tgt1 = targets_of(random_ids(H * W, K), K)
    value = {"overlap": 1.0, "fraction": 0.5, "negative": -1.0, "above_one": 2.0, "nan": float("nan")}[change]
    column = 0 if change != "overlap" else int((tgt1[0, 0] == 0).nonzero()[0])  # overlap: add a second 1
    tgt1[0, 0, column] = value
    if change == "overlap":
        assert tgt1[0, :K, column].sum() == 2
    assert instance_ids(tgt1[:, :K]) is None
    if change == "nan":
        return
    bce, dice = pair_terms(masks.flatten(2), None, tgt1)
    assert set(path_taken) == {"dense"}
    flat, tgt = masks.flatten(2), tgt1[:, :K]
    torch.testing.assert_close(bce, pairwise_sigmoid_bce(flat, tgt), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dice, pairwise_dice(flat, tgt), rtol=1e-12, atol=1e-12)


def test_instance_ids_values_and_where_they_are_not_read():
    ids = random_ids(30, K)
    tgt = targets_of(ids, K)[:, :K]
    assert torch.equal(instance_ids(tgt), ids)
    assert torch.equal(instance_ids(tgt.float()), ids)
    assert instance_ids(tgt.to("meta")) is None  # off the CPU acting on the answer would be a host sync
    with dense_pair_terms():
        assert instance_ids(tgt) is None
    assert torch.equal(instance_ids(tgt), ids)  # the switch is restored


def test_detection_runs_once_per_targets_tensor(monkeypatch):
    calls = []
    real = pair_kernel.instance_ids
    monkeypatch.setattr(pair_kernel, "instance_ids", lambda t: calls.append(1) or real(t))
    monkeypatch.setattr(pair_kernel, "_LAST_IDS", None)
    masks = logits()
    tgt1 = targets_of(random_ids(H * W, K), K)
    for _ in range(3):  # decoder layers of one batch
        pair_terms(masks.flatten(2), None, tgt1)
    assert len(calls) == 1
    tgt1[0, 0, 0] = 0.5  # changed in place: read again
    pair_terms(masks.flatten(2), None, tgt1)
    assert len(calls) == 2
    pair_terms(masks.flatten(2), None, tgt1.clone())  # another tensor
    assert len(calls) == 3


def test_dense_switch_and_explicit_ids(path_taken):
    masks = logits()
    ids = random_ids(H * W, K)
    tgt1 = targets_of(ids, K)
    with dense_pair_terms():
        dense = pair_terms(masks.flatten(2), None, tgt1)
        assert path_taken == ["dense", "dense"]
        explicit = pair_terms(masks.flatten(2), None, tgt1, ids)  # given ids: sparse even inside the switch
        assert path_taken[2:] == ["sparse", "sparse"]
    for a, b in zip(dense, explicit):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ids: expected int64"):
        pair_terms(masks.flatten(2), None, tgt1, ids.int())
    with pytest.raises(ValueError, match="ids: expected int64"):
        pair_terms(masks.flatten(2), None, tgt1, ids[:, :5])


def test_sparse_half_precision_masks(path_taken):
    gen = torch.Generator().manual_seed(4)
    masks = torch.randn(B, 5, H, W, generator=gen).bfloat16().requires_grad_()
    index = sample_pixels(B, 20, H, W)
    tgt1 = targets_of(random_ids(20, K), K, torch.float32)
    bce, dice = pair_terms(masks.flatten(2), index, tgt1)
    assert set(path_taken) == {"sparse"}
    assert bce.dtype == dice.dtype == torch.float32
    (bce.sum() + dice.sum()).backward()
    assert masks.grad.dtype == torch.bfloat16 and torch.isfinite(masks.grad).all()
    points = masks.detach().float().flatten(2).gather(2, index[:, None].expand(-1, 5, -1))
    torch.testing.assert_close(bce, pairwise_sigmoid_bce(points, tgt1[:, :K]))
    torch.testing.assert_close(dice, pairwise_dice(points, tgt1[:, :K]))


# ---------------------------------------------------------------------------------------------- criteria


def disjoint_batch(kind, sizes=(3, 0), q=6, seed=0):
    """float64 outputs (one aux layer) and disjoint targets: point clouds (P = 40) or 12 x 10 images whose
    24 x 20 targets are read at the pixel centres as whole 2 x 2 blocks (binary)."""
    g = torch.Generator().manual_seed(seed)
    spatial = (40,) if kind == "points" else (12, 10)
    layers = [(torch.randn(len(sizes), q, 5, generator=g, dtype=torch.float64).requires_grad_(),
               (3 * torch.randn(len(sizes), q, *spatial, generator=g, dtype=torch.float64)).requires_grad_())
              for _ in range(2)]
    outputs = {"pred_logits": layers[1][0], "pred_masks": layers[1][1],
               "aux_outputs": [{"pred_logits": layers[0][0], "pred_masks": layers[0][1]}]}
    targets = []
    for k in sizes:
        owner = torch.randint(0, k + 1, spatial, generator=g)  # k: background
        if kind == "image":
            owner = owner.repeat_interleave(2, 0).repeat_interleave(2, 1)
        targets.append({"labels": torch.randint(0, 4, (k,), generator=g),
                        "masks": owner[None] == torch.arange(k).view(-1, *[1] * len(spatial))})
    return outputs, targets, [t for layer in layers for t in layer]


def losses_and_grads(criterion, outputs, targets, leaves):
    torch.manual_seed(0)  # the same sampled pixels every call
    out = criterion(outputs, targets)
    grads = torch.autograd.grad(out["loss"], leaves, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("kind, num_points", [("points", None), ("image", None), ("image", 50)])
def test_transport_criterion_sparse_equals_dense(path_taken, kind, num_points):
    outputs, targets, leaves = disjoint_batch(kind)
    criterion = MaskInfluencerCriterion(4, num_points=num_points)
    sparse = losses_and_grads(criterion, outputs, targets, leaves)
    assert path_taken and set(path_taken) == {"sparse"}
    with dense_pair_terms():
        dense = losses_and_grads(criterion, outputs, targets, leaves)
    assert set(path_taken[len(path_taken) // 2:]) == {"dense"}
    for key in dense[0]:
        torch.testing.assert_close(sparse[0][key], dense[0][key], rtol=1e-10, atol=1e-12)
    for a, b in zip(sparse[1], dense[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["points", "image"])
def test_hungarian_every_location_costs_sparse_equal_dense(path_taken, kind):
    outputs, targets, leaves = disjoint_batch(kind, sizes=(3, 0, 5))
    criterion = HungarianCriterion(4, num_points=None)
    layers = [(outputs["pred_logits"], outputs["pred_masks"])] + [
        (a["pred_logits"], a["pred_masks"]) for a in outputs["aux_outputs"]]
    context = criterion.layer_context(layers, targets)[0]
    path_taken.clear()
    with torch.no_grad():
        sparse = criterion.matching_costs(layers, context["padded"], None, context["grid_targets"])
        assert path_taken and set(path_taken) == {"sparse"}
        with dense_pair_terms():
            dense = criterion.matching_costs(layers, context["padded"], None, context["grid_targets"])
    assert len(path_taken) == 2 * len(layers)  # the dense costs are the pairwise functions, not the kernel
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)  # float32 costs
    first = losses_and_grads(criterion, outputs, targets, leaves)
    with dense_pair_terms():
        second = losses_and_grads(criterion, outputs, targets, leaves)
    assert criterion.last_indices is not None
    for key in first[0]:  # same matching, hence the same losses
        torch.testing.assert_close(first[0][key], second[0][key], rtol=1e-12, atol=1e-12)


def test_benchmark_disjoint_inputs_take_the_sparse_path(path_taken):
    """``benchmarks/loss_speed.py --case disjoint`` times the sparse path (its other cases overlap: dense)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_speed.py"
    spec = importlib.util.spec_from_file_location("loss_speed_disjoint", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outputs, targets = module.make_inputs(2, 8, 5, 0, 16, 32, 3, "cpu", case="disjoint")
    masks = torch.stack([t["masks"] for t in targets])
    assert masks.any(-1).any(-1).all() and (masks.sum(1) <= 1).all()  # every instance present, none overlap
    MaskInfluencerCriterion(3, num_points=100)(outputs, targets)["loss"].backward()
    assert path_taken and set(path_taken) == {"sparse"}
    path_taken.clear()
    outputs, targets = module.make_inputs(2, 8, 5, 0, 16, 32, 3, "cpu", case="random")
    MaskInfluencerCriterion(3, num_points=100)(outputs, targets)
    assert path_taken and set(path_taken) == {"dense"}
