"""The pair-term kernel: BCE and 1 - dice of every (query, instance) pair on shared locations, one autograd node.

This is the dense floor of every matching-free criterion: four ``(Q, K+1, P)`` matmuls per image (two forward,
two backward), no ``(B, Q, K, P)`` tensor, no float64, no host sync.  ``pair_terms`` is the entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["pair_terms", "gather_pixels"]

# Locations x queries handled at once by ``PairTerms`` on the CPU (8 MiB of float32 per chunk): the chunk's
# temporaries stay in cache and are reused, instead of fresh (B, Q, P) buffers (page faults: measured ~20 %
# faster at Q 400).  Other devices take all queries at once (fewer kernel launches).
_CPU_CHUNK_ELEMENTS = 2**21


class PairTerms(torch.autograd.Function):
    """``bce (B, Q, K)`` and ``1 - dice (B, Q, K)`` of every pair on the shared pixels, in one autograd node.

    Same values as ``pairwise_sigmoid_bce`` / ``pairwise_dice`` on the gathered logits (up to float rounding).
    With ``x`` the logits at the pixels, ``s = sigmoid(x)``, ``t`` the targets and ``t1 = [t; 1]`` (a row of
    ones appended, so the matmuls also give the row sums)::

        bce  = (sum_p softplus(x) - x @ t^T) / P
        dice = 1 - (2 s @ t^T + 1) / (sum_p s + sum_p t + 1)
        dL/dx = s (1 - s) ([A_d, c] @ t1) + s r - A_b @ t

    with ``A_b = g_bce / P``, ``r = sum_k A_b``, ``A_d = -2 g_dice / den``, ``c = sum_k g_dice (2 I + 1) / den^2``.
    ``softplus(x) = relu(x) - log(0.5 + |s - 0.5|)`` (one ``log``; PyTorch's CPU softplus runs ``log1p``
    unvectorised; absolute error < 1e-7 per location, no overflow for any ``x``).  Only ``s`` is kept for the
    backward, and it is kept inside the buffer that becomes the gradient of ``masks`` (allocated once, in the
    forward: on the CPU each fresh (B, Q, P) buffer costs page faults); the gradient is scattered back onto the
    grid (``index`` holds distinct pixels: a plain scatter).  A second backward through the same graph
    (``retain_graph=True``) recomputes ``s`` from the saved logits.  On the CPU queries are processed in chunks
    (``_CPU_CHUNK_ELEMENTS``).  Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, masks: Tensor, index: Tensor | None, targets1: Tensor) -> tuple[Tensor, Tensor]:
        # masks (B, Q, N) logits; index (B, P) distinct pixels or None (P = N); targets1 (B, K + 1, P) = [t; 1]
        dtype = torch.promote_types(masks.dtype, torch.float32)
        (b, q, n), k, device = masks.shape, targets1.shape[1] - 1, masks.device
        p = n if index is None else index.shape[1]
        targets1 = targets1.to(dtype)
        targets1_t = targets1.transpose(1, 2)
        step = _query_chunk(b, q, p, device)
        grad_buffer = torch.empty(masks.shape, dtype=masks.dtype, device=device)  # the backward's result
        if masks.dtype == dtype:
            probs = grad_buffer[..., :p]  # s of query row q lives in the first P slots of its gradient row
        else:  # half-precision masks: s stays float32
            probs = torch.empty(b, q, p, dtype=dtype, device=device)
        cross = torch.empty(b, q, k + 1, dtype=dtype, device=device)  # x @ t1^T
        inter = torch.empty_like(cross)  # s @ t1^T
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
            cross[:, rows] = torch.bmm(x, targets1_t)
            inter[:, rows] = torch.bmm(s, targets1_t)
            if fresh:  # x is no longer needed: its buffer holds the softplus temporaries
                relu = x.clamp_min_(0).sum(-1, keepdim=True)
                temp = torch.sub(s, 0.5, out=x)
            else:
                relu = x.clamp_min(0).sum(-1, keepdim=True)
                temp = s - 0.5
            softplus[:, rows] = relu - temp.abs_().add_(0.5).log_().sum(-1, keepdim=True)
        bce = (softplus - cross[..., :k]) / p
        den = inter[..., k:] + targets1[:, :k].sum(-1).unsqueeze(1) + 1  # sum_p s + sum_p t + 1
        inter = inter[..., :k]
        dice = 1 - (2 * inter + 1) / den
        ctx.save_for_backward(masks, targets1, index, den, inter)
        ctx.probs, ctx.grad_buffer, ctx.step = probs, grad_buffer, step  # not inputs/outputs: plain attributes
        return bce, dice

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bce: Tensor, grad_dice: Tensor) -> tuple[Tensor, None, None]:
        masks, targets1, index, den, inter = ctx.saved_tensors
        probs, full = ctx.probs, ctx.grad_buffer
        ctx.probs = ctx.grad_buffer = None  # the first backward turns the buffer holding s into the gradient
        recompute = full is None  # a second backward (retain_graph=True): s is recomputed from the logits
        if recompute:
            full = torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)
        (b, q), (k, p), dtype = masks.shape[:2], targets1.shape[1:], targets1.dtype
        k -= 1
        coef_bce = grad_bce.to(dtype) / p  # (B, Q, K)
        row_bce = coef_bce.sum(-1, keepdim=True)
        grad_dice = grad_dice.to(dtype)
        const = (grad_dice * (2 * inter + 1) / den.square()).sum(-1, keepdim=True)  # (B, Q, 1)
        coef_dice = torch.cat([-2 * grad_dice / den, const], dim=-1)  # (B, Q, K + 1): the ones row adds const
        targets = targets1[:, :k]
        work = torch.empty(b * min(q, ctx.step) * p, dtype=dtype, device=masks.device)  # reused by every chunk
        for start in range(0, q, ctx.step):  # rows of a chunk hold their own s until it is read here
            rows = slice(start, min(q, start + ctx.step))
            s = _sigmoid_at(masks[:, rows], index, dtype) if recompute else probs[:, rows]
            grad = work[:s.numel()].view(s.shape)
            torch.bmm(coef_dice[:, rows], targets1, out=grad)  # dL/ds through dice
            torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=grad)  # * s (1 - s)
            grad.addcmul_(s, row_bce[:, rows])
            grad.baddbmm_(coef_bce[:, rows], targets, alpha=-1)  # BCE cross term, accumulated by the matmul
            if index is None:
                full[:, rows] = grad
            else:
                full[:, rows].zero_().scatter_(2, index.unsqueeze(1).expand(-1, grad.shape[1], -1),
                                               grad.to(full.dtype))
        return full, None, None


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



def pair_terms(masks: Tensor, index: Tensor | None, targets1: Tensor) -> tuple[Tensor, Tensor]:
    """``bce (B, Q, K)`` and ``1 - dice (B, Q, K)`` with gradient w.r.t. ``masks`` (see ``PairTerms``).

    Args:
        masks: ``(B, Q, N)`` mask logits (flattened grid or points).
        index: ``(B, P)`` distinct locations of the grid read by every pair, or None for all (``P = N``).
        targets1: ``(B, K + 1, P)`` targets at those locations with a last row of ones.
    """
    return PairTerms.apply(masks, index, targets1)
