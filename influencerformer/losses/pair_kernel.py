"""The pair-term kernel: BCE and 1 - dice of every (query, instance) pair on shared locations, one autograd node.

Two paths with the same values (tested equal in float64, gradients included):

- dense: four ``(Q, K+1, P)`` matmuls per image against the target masks (two forward, two backward); any
  targets, overlapping or fractional (bilinear reads of a mask at an even resolution ratio give 0.25/0.5/0.75);
- sparse: when the targets are disjoint and binary (every point cloud, synthetic images, most COCO images) a
  target is an instance id per location.  The sums over an instance's locations are segment sums (scatter-add
  by id, the background its own segment) and the backward gathers each location's coefficient by its id:
  O(B Q P) with no K factor.

``pair_terms`` is the entry point and takes the sparse path by itself on the CPU (``instance_ids``, read once
per targets tensor); on other devices acting on that test would be a host sync, so there it stays dense unless
given ``ids``.  No ``(B, Q, K, P)`` tensor, no float64, no host sync.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["pair_terms", "instance_ids", "dense_pair_terms", "gather_pixels"]

# Locations x queries handled at once by ``PairTerms`` on the CPU (8 MiB of float32 per chunk): the chunk's
# temporaries stay in cache and are reused, instead of fresh (B, Q, P) buffers (page faults: measured ~20 %
# faster at Q 400).  Other devices take all queries at once (fewer kernel launches).
_CPU_CHUNK_ELEMENTS = 2**21

# Sparse path: consecutive locations add into different copies ("lanes") of each instance's sum, so that runs of
# one instance (sorted pixels of a compact mask) are not one chain of dependent adds (measured 5x slower).
_LANES = 8
_SPARSE = True  # False inside ``dense_pair_terms()``
_LAST_IDS: tuple[weakref.ref, int, Tensor | None] | None = None  # (targets1, its version, its ids): one batch


class PairTerms(torch.autograd.Function):
    """``bce (B, Q, K)`` and ``1 - dice (B, Q, K)`` of every pair on the shared pixels, in one autograd node.

    Same values as ``pairwise_sigmoid_bce`` / ``pairwise_dice`` on the gathered logits (up to float rounding).
    With ``x`` the logits at the pixels, ``s = sigmoid(x)``, ``t`` the targets and ``t1 = [t; 1]`` (a row of
    ones appended, so the matmuls also give the row sums)::

        bce  = (sum_p softplus(x) - x @ t^T) / P
        dice = 1 - (2 s @ t^T + 1) / (sum_p s + sum_p t + 1)
        dL/dx = s (1 - s) ([A_d, c] @ t1) + s r - A_b @ t

    with ``A_b = g_bce / P``, ``r = sum_k A_b``, ``A_d = -2 g_dice / den``, ``c = sum_k g_dice (2 I + 1) / den^2``.
    Sparse path (``ids (B, P)``: the instance of each location, ``K`` for none): ``x @ t^T`` and ``s @ t^T`` are
    segment sums of ``x`` and ``s`` by id (segment ``K`` is the background; all segments together give the row
    sums), ``sum_p t`` counts the ids, and ``[A_d, 0] + c`` and ``[A_b, 0]`` are read at each location's id.
    ``softplus(x) = relu(x) - log(0.5 + |s - 0.5|)``, its sum over locations with one ``log`` per 64 of them
    (``_log_sum``; PyTorch's CPU softplus runs ``log1p`` unvectorised; absolute error ~1e-7 per location, no
    overflow for any ``x``).  Only ``s`` is kept for the
    backward, and it is kept inside the buffer that becomes the gradient of ``masks`` (allocated once, in the
    forward: on the CPU each fresh (B, Q, P) buffer costs page faults); the gradient is scattered back onto the
    grid (``index`` holds distinct pixels: a plain scatter).  A second backward through the same graph
    (``retain_graph=True``) recomputes ``s`` from the saved logits.  On the CPU queries are processed in chunks
    (``_CPU_CHUNK_ELEMENTS``).  Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, masks: Tensor, index: Tensor | None, targets1: Tensor,
                ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # masks (B, Q, N) logits; index (B, P) distinct pixels or None (P = N); targets1 (B, K + 1, P) = [t; 1];
        # ids (B, P) instance per location (K: none) or None (dense: matmuls against targets1)
        dtype = torch.promote_types(masks.dtype, torch.float32)
        (b, q, n), k, device = masks.shape, targets1.shape[1] - 1, masks.device
        p = n if index is None else index.shape[1]
        if ids is None:  # the sparse path never reads the targets themselves
            targets1 = targets1.to(dtype)
            lanes = None
        else:  # location p adds into lane p mod _LANES of its instance's sum
            lanes = ids * _LANES + torch.arange(p, device=device) % _LANES
        step = _query_chunk(b, q, p, device)
        grad_buffer = torch.empty(masks.shape, dtype=masks.dtype, device=device)  # the backward's result
        if masks.dtype == dtype:
            probs = grad_buffer[..., :p]  # s of query row q lives in the first P slots of its gradient row
        else:  # half-precision masks: s stays float32
            probs = torch.empty(b, q, p, dtype=dtype, device=device)
        cross = torch.empty(b, q, k + 1, dtype=dtype, device=device)  # x @ t1^T, or x's segment sums
        inter = torch.empty_like(cross)  # s @ t1^T, or s's segment sums
        softplus = torch.empty(b, q, 1, dtype=dtype, device=device)
        work = None
        for start in range(0, q, step):
            rows = slice(start, min(q, start + step))
            chunk = masks[:, rows]
            if index is None:
                x = chunk.to(dtype)
                fresh = x.data_ptr() != chunk.data_ptr()  # a converted copy may be overwritten
            else:
                if work is None:
                    work = torch.empty(b, step, p, dtype=masks.dtype, device=device)
                x = gather_pixels(chunk, index, out=work[:, :chunk.shape[1]]).to(dtype)
                fresh = True
            s = torch.sigmoid(x, out=probs[:, rows])
            cross[:, rows] = _pair_sums(x, targets1, lanes)
            inter[:, rows] = _pair_sums(s, targets1, lanes)
            if fresh:  # x is no longer needed: its buffer holds the softplus temporaries
                relu = x.clamp_min_(0).sum(-1, keepdim=True)
                temp = torch.sub(s, 0.5, out=x)
            else:
                relu = x.clamp_min(0).sum(-1, keepdim=True)
                temp = s - 0.5
            softplus[:, rows] = relu - _log_sum(temp.abs_().add_(0.5))
        if ids is None:
            prob_sums, sizes = inter[..., k:], targets1[:, :k].sum(-1)
        else:  # the background segment completes the row sums; an instance's size counts its ids
            prob_sums = inter.sum(-1, keepdim=True)
            sizes = torch.zeros(b, k + 1, dtype=dtype, device=device).scatter_add_(
                1, ids, torch.ones(ids.shape, dtype=dtype, device=device))[:, :k]
        bce = (softplus - cross[..., :k]) / p
        den = prob_sums + sizes.unsqueeze(1) + 1  # sum_p s + sum_p t + 1
        inter = inter[..., :k]
        dice = 1 - (2 * inter + 1) / den
        ctx.save_for_backward(masks, targets1 if ids is None else None, index, den, inter, ids)
        ctx.probs, ctx.grad_buffer, ctx.step, ctx.k_p = probs, grad_buffer, step, (k, p)  # plain attributes
        return bce, dice

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bce: Tensor, grad_dice: Tensor) -> tuple[Tensor, None, None, None]:
        masks, targets1, index, den, inter, ids = ctx.saved_tensors
        probs, full = ctx.probs, ctx.grad_buffer
        ctx.probs = ctx.grad_buffer = None  # the first backward turns the buffer holding s into the gradient
        recompute = full is None  # a second backward (retain_graph=True): s is recomputed from the logits
        if recompute:
            full = torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)
        (b, q), (k, p), dtype = masks.shape[:2], ctx.k_p, den.dtype
        coef_bce = grad_bce.to(dtype) / p  # (B, Q, K)
        row_bce = coef_bce.sum(-1, keepdim=True)
        grad_dice = grad_dice.to(dtype)
        const = (grad_dice * (2 * inter + 1) / den.square()).sum(-1, keepdim=True)  # (B, Q, 1)
        if ids is None:  # (B, Q, K + 1): the ones row adds const
            coef_dice = torch.cat([-2 * grad_dice / den, const], dim=-1)
            targets = targets1[:, :k]
        else:  # per id: the background (id K) gets only const and no BCE cross term
            coef_dice = F.pad(-2 * grad_dice / den, (0, 1)) + const
            coef_bce, targets = F.pad(coef_bce, (0, 1)), None
        rows_max = min(q, ctx.step)
        work = torch.empty(b * rows_max * p, dtype=dtype, device=masks.device)  # reused by every chunk
        read = None if ids is None else torch.empty_like(work)  # the BCE coefficients read by id
        for start in range(0, q, ctx.step):  # rows of a chunk hold their own s until it is read here
            rows = slice(start, min(q, start + ctx.step))
            s = _sigmoid_at(masks[:, rows], index, dtype) if recompute else probs[:, rows]
            grad = work[:s.numel()].view(s.shape)
            _coefficients_at(coef_dice[:, rows], targets1, ids, out=grad)  # dL/ds through dice
            torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=grad)  # * s (1 - s)
            grad.addcmul_(s, row_bce[:, rows])
            if ids is None:
                grad.baddbmm_(coef_bce[:, rows], targets, alpha=-1)  # BCE cross term, accumulated by the matmul
            else:
                grad.sub_(_coefficients_at(coef_bce[:, rows], None, ids, out=read[:s.numel()].view(s.shape)))
            if index is None:
                full[:, rows] = grad
            else:
                full[:, rows].zero_().scatter_(2, index.unsqueeze(1).expand(-1, grad.shape[1], -1),
                                               grad.to(full.dtype))
        return full, None, None, None


def _pair_sums(values: Tensor, targets1: Tensor, lanes: Tensor | None) -> Tensor:
    """``values (B, Q', P)`` summed over each instance -> ``(B, Q', K + 1)``.

    Dense: ``values @ targets1^T`` (column ``K``: the row sums).  Sparse: segment sums by ``lanes (B, P)``
    (``id * _LANES + lane``; id ``K``, the last column: the background's locations).
    """
    if lanes is None:
        return torch.bmm(values, targets1.transpose(1, 2))
    (b, q, _), k1 = values.shape, targets1.shape[1]
    sums = torch.zeros(b, q, k1 * _LANES, dtype=values.dtype, device=values.device)
    sums.scatter_add_(2, lanes.unsqueeze(1).expand(-1, q, -1), values)
    return sums.view(b, q, k1, _LANES).sum(-1)


def _log_sum(values: Tensor, group: int = 64) -> Tensor:
    """``sum_p log(values)`` over the last dim -> ``(..., 1)``, for ``values`` in [0.5, 1] (overwritten).

    Groups of ``group`` values are multiplied first (in place, by halving; a product of 64 values in [0.5, 1] is
    >= 2^-64, a normal float32), so only one ``log`` per group is taken: ``log`` is the costliest operation of
    the forward.  Rounding: at most ``group - 1`` products per group, i.e. ~6e-8 relative per location in float32.
    """
    width = values.shape[-1] - values.shape[-1] % group
    rest = values[..., width:].log().sum(-1, keepdim=True)
    head = values[..., :width]
    while head.shape[-1] > width // group:
        half = head.shape[-1] // 2
        head[..., :half].mul_(head[..., half:])
        head = head[..., :half]
    return head.log().sum(-1, keepdim=True) + rest


def _coefficients_at(coef: Tensor, targets1: Tensor | None, ids: Tensor | None, out: Tensor) -> Tensor:
    """Per-(query, instance) coefficients ``coef (B, Q', K')`` at every location -> ``out (B, Q', P)``.

    Dense: ``coef @ targets`` (``K'`` rows of ``targets1``).  Sparse: ``coef`` read at each location's id.
    """
    if ids is None:
        return torch.bmm(coef, targets1[:, :coef.shape[-1]], out=out)
    if coef.device.type == "cpu":  # one index_select per image: ~15 % faster than gather there
        for b in range(coef.shape[0]):
            torch.index_select(coef[b], 1, ids[b], out=out[b])
        return out
    return torch.gather(coef, 2, ids.unsqueeze(1).expand(-1, coef.shape[1], -1), out=out)


def gather_pixels(masks: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """``masks (B, Q, N)`` at the pixels ``index (B, P)`` -> ``(B, Q, P)`` (into ``out`` when given).

    On the CPU one ``index_select`` per image (~40 % faster than ``gather`` with an expanded index there).
    """
    if out is None:
        out = masks.new_empty(*masks.shape[:2], index.shape[1])
    if masks.device.type == "cpu":
        for b in range(masks.shape[0]):
            torch.index_select(masks[b], 1, index[b], out=out[b])
        return out
    return torch.gather(masks, 2, index.unsqueeze(1).expand(-1, masks.shape[1], -1), out=out)


def _sigmoid_at(masks: Tensor, index: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``sigmoid`` of logits ``(B, Q', N)`` at the pixels ``index`` (``(B, P)`` or None: all) in ``dtype``."""
    x = masks if index is None else gather_pixels(masks, index)
    return torch.sigmoid(x.to(dtype))


def _query_chunk(batch: int, queries: int, points: int, device: torch.device) -> int:
    """Queries per chunk in ``PairTerms``: all of them off the CPU, else about ``_CPU_CHUNK_ELEMENTS`` values."""
    if device.type != "cpu":
        return max(queries, 1)
    return max(1, min(queries, _CPU_CHUNK_ELEMENTS // max(1, batch * points)))


@torch.no_grad()
def instance_ids(targets: Tensor) -> Tensor | None:
    """The instance at each location, ``(B, P)`` long (``K`` where there is none), of disjoint binary targets.

    ``targets (B, K, P)``.  None when a value is not exactly 0 or 1, when a location lies in two instances (then
    only the dense path is exact), inside ``dense_pair_terms()``, and off the CPU, where acting on the answer would be a host sync (there the
    dense matmuls run on tensor cores; a caller who knows its targets are disjoint passes ids itself).  Four
    passes over the targets: ``min``; the positive values per location (``ceil`` of values in [0, 1]); and one
    ``(2, K)`` matmul giving ``sum_k t_k`` and ``sum_k k t_k``, which with at most one positive value per
    location are exactly that value and its instance.
    """
    (b, k, p), device = targets.shape, targets.device
    if not _SPARSE or device.type != "cpu" or not targets.is_floating_point():
        return None
    if k == 0:
        return torch.zeros(b, p, dtype=torch.int64, device=device)
    t = targets.to(torch.promote_types(targets.dtype, torch.float32))
    weights = torch.stack([torch.ones(k, dtype=t.dtype), torch.arange(k, dtype=t.dtype)])  # (2, K)
    total, weighted = torch.matmul(weights, t).unbind(1)  # (B, P) each
    single = torch.ceil(t).sum(1) <= 1  # at most one value in (0, 1] (when none is below 0)
    if not bool((t.amin() >= 0) & single.all() & ((total == 0) | (total == 1)).all()):
        return None
    return torch.where(total == 1, weighted, k).long()


def _detected_ids(targets1: Tensor) -> Tensor | None:
    """``instance_ids`` of ``targets1 (B, K + 1, P)`` without its ones row, computed once per tensor and version
    (every decoder layer of a batch reads the same targets)."""
    global _LAST_IDS
    if _LAST_IDS is not None:
        ref, version, ids = _LAST_IDS
        if ref() is targets1 and version == targets1._version:
            return ids
    ids = instance_ids(targets1[:, :-1])
    _LAST_IDS = (weakref.ref(targets1), targets1._version, ids)
    return ids


@contextlib.contextmanager
def dense_pair_terms() -> Iterator[None]:
    """Inside the block ``instance_ids`` is None: ``pair_terms`` and the Hungarian matching costs take the dense
    path (``pair_terms`` given ``ids`` still takes the sparse one).  To compare the two paths."""
    global _SPARSE
    previous, _SPARSE = _SPARSE, False
    try:
        yield
    finally:
        _SPARSE = previous


def pair_terms(masks: Tensor, index: Tensor | None, targets1: Tensor,
               ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``bce (B, Q, K)`` and ``1 - dice (B, Q, K)`` with gradient w.r.t. ``masks`` (see ``PairTerms``).

    Args:
        masks: ``(B, Q, N)`` mask logits (flattened grid or points).
        index: ``(B, P)`` distinct locations of the grid read by every pair, or None for all (``P = N``).
        targets1: ``(B, K + 1, P)`` targets at those locations with a last row of ones.
        ids: ``(B, P)`` long, the instance at each location (``K``: none) of disjoint binary targets: the sparse
            path (the targets are then not read).  None: ``instance_ids`` of ``targets1`` decides (sparse when
            the targets are disjoint and binary, on the CPU, outside ``dense_pair_terms``).
    """
    if ids is None and _SPARSE:
        ids = _detected_ids(targets1)
    elif ids is not None and (ids.dtype != torch.int64 or ids.shape != (targets1.shape[0], targets1.shape[2])):
        raise ValueError(f"ids: expected int64 (B, P) = {(targets1.shape[0], targets1.shape[2])}, "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    return PairTerms.apply(masks, index, targets1, ids)
