"""Log-domain Sinkhorn: marginals, a numpy reference, the Hungarian limit, padding and precision."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from influencerformer.losses.transport import sinkhorn


def numpy_sinkhorn(cost, a, b, eps, iters):
    """Textbook kernel-form Sinkhorn (same update order: columns, then rows) in float64."""
    kernel = np.exp(-cost / eps)
    u = np.ones_like(a)
    for _ in range(iters):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def instance_problem(b=3, q=7, k=3, seed=0, dtype=torch.float64):
    """Random (B, Q, K+1) cost; rows mass 1, instance columns 1, no-object column Q - K."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(b, q, k + 1, generator=gen, dtype=dtype)
    row = torch.ones(b, q, dtype=dtype)
    col = torch.cat([torch.ones(b, k, dtype=dtype), torch.full((b, 1), float(q - k), dtype=dtype)], 1)
    return cost, row, col


def test_marginals_are_satisfied():
    cost, row, col = instance_problem()
    plan = sinkhorn(cost, row, col, epsilon=0.2, iters=300)
    torch.testing.assert_close(plan.sum(-1), row)  # the last update is the row update: exact
    torch.testing.assert_close(plan.sum(-2), col, atol=1e-8, rtol=0)
    assert (plan >= 0).all()


def test_matches_numpy_reference():
    cost, row, col = instance_problem(b=2, q=5, k=2, seed=1)
    plan = sinkhorn(cost, row, col, epsilon=0.3, iters=7)
    for i in range(2):
        want = numpy_sinkhorn(cost[i].numpy(), row[i].numpy(), col[i].numpy(), 0.3, 7)
        np.testing.assert_allclose(plan[i].numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_epsilon_recovers_hungarian(seed):
    q, k = 6, 4
    cost, row, col = instance_problem(b=1, q=q, k=k, seed=seed)
    cost[..., -1] = 0.0  # constant no-object cost: OT optimum = rectangular assignment
    plan = sinkhorn(cost, row, col, epsilon=0.002, iters=4000)[0]
    rows, cols = linear_sum_assignment(cost[0, :, :k].numpy())
    assert torch.equal(plan[:, :k].argmax(0)[torch.as_tensor(cols)], torch.as_tensor(rows))
    assert (plan[:, :k].max(0).values > 0.99).all()  # near-permutation


def test_padded_columns_are_ignored_and_never_nan():
    cost, row, col = instance_problem(b=1, q=6, k=2, seed=3)
    ref = sinkhorn(cost, row, col, epsilon=0.1, iters=50)
    garbage = torch.tensor([[[float("nan"), float("inf"), 1e9]]], dtype=cost.dtype).expand(1, 6, 3)
    padded_cost = torch.cat([cost[..., :2], garbage, cost[..., 2:]], -1).clone().requires_grad_(True)
    padded_col = torch.cat([col[:, :2], torch.zeros(1, 3, dtype=col.dtype), col[:, 2:]], -1)
    plan = sinkhorn(padded_cost, row, padded_col, epsilon=0.1, iters=50)
    assert (plan[..., 2:5] == 0).all()
    torch.testing.assert_close(torch.cat([plan[..., :2], plan[..., 5:]], -1), ref)
    (plan * torch.rand_like(plan)).sum().backward()  # differentiable through the iterations
    assert torch.isfinite(padded_cost.grad).all()


def test_item_without_instances_puts_all_mass_on_no_object():
    cost = torch.rand(2, 4, 3, dtype=torch.float64)
    row = torch.ones(2, 4, dtype=torch.float64)
    col = torch.tensor([[0.0, 0.0, 4.0], [1.0, 1.0, 2.0]], dtype=torch.float64)
    plan = sinkhorn(cost, row, col, epsilon=0.1, iters=20)
    torch.testing.assert_close(plan[0, :, 2], torch.ones(4, dtype=torch.float64))
    assert (plan[0, :, :2] == 0).all()


def test_float32_is_stable_with_large_costs():
    cost64, row, col = instance_problem(b=2, q=8, k=3, seed=4)
    cost32 = (cost64 * 1000.0).float()  # cost / eps = 1e5: overflows any kernel-form implementation
    plan32 = sinkhorn(cost32, row.float(), col.float(), epsilon=0.01, iters=100)
    plan64 = sinkhorn(cost32.double(), row, col, epsilon=0.01, iters=100)
    assert plan32.dtype == torch.float32 and torch.isfinite(plan32).all()
    # Potentials of size ~1e5 leave float32 an exponent resolution of ~8e-3 (its ulp at 1e5).
    torch.testing.assert_close(plan32.sum(-1), row.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(plan32.double(), plan64, atol=1e-2, rtol=0)


def test_float32_matches_float64_at_mask2former_cost_scale():
    cost64, row, col = instance_problem(b=4, q=20, k=6, seed=7)
    cost64 = cost64 * 12.0  # 2 class + 5 BCE + 5 dice spans about [0, 12]
    plan32 = sinkhorn(cost64.float(), row.float(), col.float(), epsilon=0.1, iters=30)
    plan64 = sinkhorn(cost64, row, col, epsilon=0.1, iters=30)
    torch.testing.assert_close(plan32.double(), plan64, atol=1e-4, rtol=0)


def test_autocast_half_input_is_computed_in_float32():
    cost, row, col = instance_problem(b=2, q=6, k=2, seed=5, dtype=torch.float32)
    cost_bf16 = (cost * 50).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = sinkhorn(cost_bf16, row, col, epsilon=0.1, iters=30)
    want = sinkhorn(cost_bf16.float(), row, col, epsilon=0.1, iters=30)
    assert plan.dtype == torch.bfloat16
    torch.testing.assert_close(plan.float(), want, atol=1e-2, rtol=1e-2)


def test_tolerance_stops_early_within_tolerance():
    cost, row, col = instance_problem(seed=6)
    plan = sinkhorn(cost, row, col, epsilon=0.5, iters=10_000, tol=1e-6)
    assert (plan.sum(-2) - col).abs().max() < 1e-6
    torch.testing.assert_close(plan, sinkhorn(cost, row, col, epsilon=0.5, iters=2000), atol=1e-6, rtol=0)


def test_bad_inputs_raise():
    cost, row, col = instance_problem(b=2, q=5, k=2)
    with pytest.raises(ValueError, match=r"col_mass \(2, 3\); got .*col_mass \(2, 2\)"):
        sinkhorn(cost, row, col[:, :2], epsilon=0.1)
    with pytest.raises(ValueError, match=r"cost must be \(B, Q, K\+1\), got \(5, 3\)"):
        sinkhorn(cost[0], row, col, epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(cost, row, col, epsilon=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_without_denormals_equals_torch(dtype):
    """The iterations' log-sum-exp clamps exponents at -80 (no float32 denormals): same values and gradients."""
    from influencerformer.losses.transport import _logsumexp

    gen = torch.Generator().manual_seed(8)
    z = (torch.rand(3, 40, 9, generator=gen, dtype=dtype) * 300 - 250).requires_grad_()  # spans e^-300 .. e^0
    for dim in (-1, -2):
        ours, want = _logsumexp(z, dim), torch.logsumexp(z, dim)
        torch.testing.assert_close(ours, want, rtol=0, atol=4 * torch.finfo(dtype).eps * want.abs().max().item())
        g_ours, = torch.autograd.grad(ours.sum(), z)
        g_want, = torch.autograd.grad(want.sum(), z)
        torch.testing.assert_close(g_ours, g_want, rtol=1e-5, atol=1e-30)
    with torch.no_grad():  # the in-place branch
        torch.testing.assert_close(_logsumexp(z, -1), torch.logsumexp(z, -1))


# ------------------------------------------------------------------ subnormals on trained-like (peaked) costs


def subnormals(t):
    """Number of subnormal (denormal) entries of a float tensor: non-zero and below the dtype's smallest normal."""
    t = t.detach()
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def peaked_cost(b=4, q=30, k=8, seed=0):
    """Cost of a trained model: each instance has one cheap query, every other pair costs 3-16 more (float32)."""
    gen = torch.Generator().manual_seed(seed)
    cost = 3 + 13 * torch.rand(b, q, k + 1, generator=gen)
    cost[:, torch.arange(k), torch.arange(k)] = 0.1 * torch.rand(b, k, generator=gen)
    cost[..., -1] = 0.0  # no-object column
    row = torch.ones(b, q)
    col = torch.cat([torch.ones(b, k), torch.full((b, 1), float(q - k))], 1)
    return cost, row, col


def test_peaked_cost_plan_has_no_subnormals(monkeypatch):
    import influencerformer.losses.transport as transport

    cost, row, col = peaked_cost()
    plan = sinkhorn(cost, row, col, epsilon=0.1, iters=30)
    assert subnormals(plan) == 0 and (plan == 0).any()
    monkeypatch.setattr(transport, "_PLAN_FLOOR", float("-inf"))  # the plan as it was: exp of every exponent
    raw = sinkhorn(cost, row, col, epsilon=0.1, iters=30)
    assert subnormals(raw) > 0  # the case does exercise the problem
    flushed = plan != raw
    assert (plan[flushed] == 0).all() and (raw[flushed] < 1.5e-11).all()  # only tiny weights are flushed
    torch.testing.assert_close(plan.sum(-1), row, rtol=0, atol=1e-6)


def trained_like_inputs(b=2, q=24, k=6, size=32, classes=4, layers=2, scale=8.0, seed=0):
    """Confident predictions: queries 0..k-1 predict the k square instances (6-10 px a side) at logit +-``scale``
    (+ noise) with the right class; the other queries predict nothing and "no object".  Final layer plus
    ``layers`` aux layers.  An idle query's cheapest instance then costs ~9-10 more than its match: the weight
    exp(-cost / 0.1) is a float32 subnormal, and so are the gradients it weights."""
    gen = torch.Generator().manual_seed(seed)
    targets, logits, masks = [], [], []
    for _ in range(b):
        m = torch.zeros(k, size, size, dtype=torch.bool)
        for i in range(k):
            side = int(torch.randint(6, 11, (1,), generator=gen))
            y, x = torch.randint(0, size - side, (2,), generator=gen).tolist()
            m[i, y:y + side, x:x + side] = True
        labels = torch.randint(0, classes, (k,), generator=gen)
        pm = torch.full((q, size, size), -scale)
        pm[:k][m] = scale
        pl = torch.zeros(q, classes + 1)
        pl[torch.arange(k), labels] = scale
        pl[k:, classes] = scale
        targets.append({"labels": labels, "masks": m})
        logits.append(pl), masks.append(pm)
    stack = [(torch.stack(logits) + torch.randn(b, q, classes + 1, generator=gen),
              torch.stack(masks) + torch.randn(b, q, size, size, generator=gen)) for _ in range(layers + 1)]
    leaves = [(lg.requires_grad_(), mk.requires_grad_()) for lg, mk in stack]
    outputs = {"pred_logits": leaves[-1][0], "pred_masks": leaves[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in leaves[:-1]]}
    return outputs, targets, leaves


@pytest.mark.parametrize("num_points", [None, 512])
def test_trained_like_criterion_plan_and_gradients_have_no_subnormals(monkeypatch, num_points):
    """Through MaskInfluencerCriterion (transport): no subnormal plan weight, loss term or gradient."""
    import influencerformer.losses.transport as transport
    from influencerformer.losses import MaskInfluencerCriterion

    plans, flushed_plan = [], transport._flushed_plan

    def spy(*args):  # records every plan sinkhorn returns, wherever the criterion calls it from
        plans.append(flushed_plan(*args))
        return plans[-1]

    monkeypatch.setattr(transport, "_flushed_plan", spy)

    def run():
        outputs, targets, leaves = trained_like_inputs()
        torch.manual_seed(0)  # the same sampled pixels in both runs
        losses = MaskInfluencerCriterion(4, form="transport", num_points=num_points)(outputs, targets)
        losses["loss"].backward()
        return losses, leaves

    losses, leaves = run()
    assert subnormals(plans[-1]) == 0
    assert all(subnormals(v) == 0 for v in losses.values())
    for logits, masks in leaves:
        assert subnormals(masks.grad) == 0 and subnormals(logits.grad) == 0
        assert masks.grad.abs().amax() > 0
    monkeypatch.setattr(transport, "_PLAN_FLOOR", float("-inf"))  # the plan as it was
    raw_losses, raw_leaves = run()
    assert subnormals(plans[-1]) > 0 and sum(subnormals(m.grad) for _, m in raw_leaves) > 0  # exercised
    torch.testing.assert_close(losses["loss"], raw_losses["loss"], rtol=1e-6, atol=0)  # same loss
    for (_, masks), (_, raw) in zip(leaves, raw_leaves):
        torch.testing.assert_close(masks.grad, raw.grad, rtol=1e-5, atol=1e-12)


def sharp_problem(seed=0, q=32, k=20):
    """A trained-model-like cost: one clearly best query per instance (gaps of ~1-2 cost units) on a 0-10 range."""
    gen = torch.Generator().manual_seed(seed)
    cost = 5 + 5 * torch.rand(1, q, k + 1, generator=gen, dtype=torch.float64)
    best = torch.randperm(q, generator=gen)[:k]
    cost[0, best, torch.arange(k)] = torch.rand(k, generator=gen, dtype=torch.float64) * 2
    cost[..., -1] = 0.0  # the no-object column
    row = torch.ones(1, q, dtype=torch.float64)
    col = torch.cat([torch.ones(1, k, dtype=torch.float64), torch.full((1, 1), float(q - k), dtype=torch.float64)], 1)
    return cost, row, col


def test_epsilon_scaling_meets_the_marginals_where_plain_iterations_do_not():
    cost, row, col = sharp_problem()
    plain = sinkhorn(cost, row, col, epsilon=0.02, iters=50)
    scaled = sinkhorn(cost, row, col, epsilon=0.02, iters=50, epsilon_start=1.0)
    reference = sinkhorn(cost, row, col, epsilon=0.02, iters=20000)  # plain iterations, run to convergence
    assert (plain.sum(-2) - col).abs().max() > 0.1
    torch.testing.assert_close(scaled.sum(-2), col, atol=1e-3, rtol=0)
    torch.testing.assert_close(scaled, reference, atol=1e-3, rtol=0)  # the same plan at the target epsilon
    torch.testing.assert_close(scaled.sum(-1), row)


def test_epsilon_scaling_off_or_not_above_epsilon_is_the_plain_iteration():
    cost, row, col = instance_problem()
    plain = sinkhorn(cost, row, col, epsilon=0.2, iters=9)
    assert torch.equal(sinkhorn(cost, row, col, epsilon=0.2, iters=9, epsilon_start=None), plain)
    assert torch.equal(sinkhorn(cost, row, col, epsilon=0.2, iters=9, epsilon_start=0.1), plain)


def test_epsilon_scaling_is_differentiable_and_checked():
    cost, row, col = sharp_problem(q=6, k=3)
    cost.requires_grad_(True)
    plan = sinkhorn(cost, row, col, epsilon=0.05, iters=20, epsilon_start=2.0)
    (plan[..., :-1] * torch.randn_like(plan[..., :-1])).sum().backward()
    assert torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="epsilon_start must be None or a finite number > 0"):
            sinkhorn(cost.detach(), row, col, epsilon=0.05, iters=5, epsilon_start=bad)
