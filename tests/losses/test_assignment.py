"""Batched assignment: equals scipy per item on lists and padded tensors; rejects NaN/Inf clearly."""
import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from influencerformer.losses.assignment import gpu_solver_available, linear_sum_assignment_batched


def _brute_force_min(cost):
    q, k = cost.shape
    if q >= k:
        return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), k))
    return min(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(k), q))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (6, 1)])
def test_optimal_on_small_problems(shape):
    cost = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    (rows, cols), = linear_sum_assignment_batched([cost])
    assert len(rows) == min(shape) and rows.dtype == torch.int64
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert torch.all(rows[1:] > rows[:-1])  # rows ascending, as scipy and Mask2Former's gather expect
    assert cost[rows, cols].sum().item() == pytest.approx(_brute_force_min(cost).item(), abs=1e-6)


def test_list_equals_scipy_per_item():
    g = torch.Generator().manual_seed(0)
    costs = [torch.rand(10, k, generator=g) for k in (0, 3, 10, 12)]
    for cost, (rows, cols) in zip(costs, linear_sum_assignment_batched(costs)):
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()


def test_padded_tensor_uses_only_the_valid_block():
    g = torch.Generator().manual_seed(1)
    padded = torch.rand(3, 8, 6, generator=g)
    padded[0, :, 2:] = -100.0  # padding that would attract the solver if it were read
    sizes = [(8, 2), (8, 6), (8, 0)]
    out = linear_sum_assignment_batched(padded, sizes)
    assert out[0][1].max() < 2 and len(out[2][0]) == 0
    for (rows, cols), (q, k), cost in zip(out, sizes, padded):
        ref_rows, ref_cols = linear_sum_assignment(cost[:q, :k].numpy())
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()


def test_padded_tensor_default_sizes_are_full():
    padded = torch.rand(2, 4, 3)
    assert [len(r) for r, _ in linear_sum_assignment_batched(padded)] == [3, 3]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_costs_raise(bad):
    costs = [torch.rand(3, 2), torch.rand(4, 4)]
    costs[1][2, 1] = bad
    with pytest.raises(ValueError, match=r"costs\[1\]: cost matrix of shape \(4, 4\) contains NaN or Inf"):
        linear_sum_assignment_batched(costs)


def test_non_finite_padding_is_ignored():
    padded = torch.rand(1, 3, 3)
    padded[0, :, 2] = float("nan")
    assert len(linear_sum_assignment_batched(padded, [(3, 2)])[0][0]) == 2


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"expected a 2-D \(Q_i, K_i\) matrix, got shape \(3,\)"):
        linear_sum_assignment_batched([torch.rand(3)])
    with pytest.raises(ValueError, match=r"expected a padded tensor \(N, Q, K\)"):
        linear_sum_assignment_batched(torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"sizes\[0\] = \(4, 2\) exceeds the padded shape \(3, 3\)"):
        linear_sum_assignment_batched(torch.rand(1, 3, 3), [(4, 2)])
    with pytest.raises(ValueError, match=r"backend: expected 'auto', 'scipy' or 'gpu'"):
        linear_sum_assignment_batched([torch.rand(2, 2)], backend="lapx")


@pytest.mark.skipif(not (torch.cuda.is_available() and gpu_solver_available()),
                    reason="needs CUDA and torch_linear_assignment")
def test_gpu_solver_equals_scipy_cost():
    g = torch.Generator().manual_seed(2)
    padded = torch.rand(4, 20, 7, generator=g).cuda()
    sizes = [(20, 7), (20, 3), (20, 0), (20, 5)]
    gpu = linear_sum_assignment_batched(padded, sizes, backend="gpu")
    ref = linear_sum_assignment_batched(padded, sizes, backend="scipy")
    for (r1, c1), (r2, c2), cost in zip(gpu, ref, padded.cpu()):
        assert cost[r1, c1].sum().item() == pytest.approx(cost[r2, c2].sum().item(), abs=1e-5)
