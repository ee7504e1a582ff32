"""Mask2Former's transformer decoder with learned queries, shared by the 2D and point-cloud models.

Per layer: masked cross-attention to one memory level (round-robin), self-attention among queries,
FFN (post-norm, dropout 0 by default, as Mask2Former). Class and mask heads run after the query
initialisation and after every layer, so a decoder with L layers yields L + 1 predictions: the last
is the output, the first L are ``aux_outputs`` (deep supervision).

Modality-agnostic: memories are token sequences ``(B, P_l, D)``; mask features are ``(B, D_m, H, W)``
(pixels) or ``(B, D_m, P)`` (points / voxels / superpoints), and masks come out with the same
trailing shape. Masked attention resizes the previous prediction to each image memory's grid;
point memories must share the mask features' locations (an attention mask over P).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between: ``(..., in_dim) -> (..., out_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class CrossAttentionLayer(nn.Module):
    """Queries ``(B, Q, D)`` attend to memory ``(B, P, D)``; post-norm residual. ``attn_mask``:
    bool ``(B * nheads, Q, P)``, True = blocked (PyTorch convention)."""

    def __init__(self, dim: int, nheads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, *, attn_mask=None, pos=None, query_pos=None) -> torch.Tensor:
        out = self.attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory,
                        attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))

    def attention_weights(self, tgt, memory, *, attn_mask=None, pos=None, query_pos=None) -> torch.Tensor:
        """The attention probabilities ``(B, nheads, Q, P)`` ``forward`` uses (for tests and diagnostics)."""
        return self.attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory, attn_mask=attn_mask,
                         need_weights=True, average_attn_weights=False)[1]


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries ``(B, Q, D) -> (B, Q, D)``; positions on queries and keys only."""

    def __init__(self, dim: int, nheads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        q = k = _with_pos(tgt, query_pos)
        return self.norm(tgt + self.dropout(self.attn(q, k, tgt, need_weights=False)[0]))


class FFNLayer(nn.Module):
    """Position-wise feed-forward ``(B, Q, D) -> (B, Q, D)``, post-norm residual."""

    def __init__(self, dim: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, dim))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.dropout(self.net(tgt)))


def attention_mask_from_masks(mask_logits: torch.Tensor, nheads: int, memory_shape: Sequence[int] | None = None,
                              threshold: float = 0.5) -> torch.Tensor:
    """Mask2Former's masked-attention mask from the previous layer's mask logits.

    Args:
        mask_logits: ``(B, Q, H, W)`` (then ``memory_shape=(h, w)`` is required and the logits are
            resized bilinearly to it) or ``(B, Q, P)`` (used as is: memory has the same P locations).
        nheads: attention heads; the mask is repeated per head, batch-major as PyTorch expects.
    Returns:
        bool ``(B * nheads, Q, P_mem)``: True where ``sigmoid(logit) < threshold`` (attention blocked).
        Rows blocked everywhere are fully un-blocked: a query with an empty mask attends globally
        instead of producing NaNs. Detached: the mask is a routing decision, not a gradient path.
    """
    with torch.no_grad():
        if mask_logits.dim() == 4:
            if memory_shape is None:
                raise ValueError("memory_shape (h, w) is required to resize (B, Q, H, W) masks for masked attention")
            mask_logits = F.interpolate(mask_logits, size=tuple(memory_shape), mode="bilinear",
                                        align_corners=False).flatten(2)
        elif mask_logits.dim() != 3:
            raise ValueError(f"mask_logits must be (B, Q, H, W) or (B, Q, P), got {tuple(mask_logits.shape)}")
        blocked = mask_logits.sigmoid() < threshold
        blocked &= ~blocked.all(dim=-1, keepdim=True)
        b, q, p = blocked.shape
        return blocked.unsqueeze(1).expand(b, nheads, q, p).reshape(b * nheads, q, p)


class QueryDecoder(nn.Module):
    """Learned queries refined by ``num_layers`` (masked cross-attn, self-attn, FFN) layers.

    ``forward(memory, mask_features, memory_pos=None, memory_shapes=None)``:
        memory: list of ``L_mem`` tensors ``(B, P_l, hidden_dim)``, visited round-robin by layer.
        mask_features: ``(B, mask_dim, H, W)`` or ``(B, mask_dim, P)``.
        memory_pos: optional list (same length) of ``(B, P_l, hidden_dim)`` positional embeddings.
        memory_shapes: list of ``(h_l, w_l)`` with ``h_l * w_l == P_l``; required with image mask
            features and masked attention (to resize masks to each memory grid).
    Returns ``{"pred_logits": (B, Q, C+1), "pred_masks": (B, Q, *spatial), "aux_outputs": [...]}``
    with ``num_layers`` aux dicts (the query-init prediction and all layers but the last).
    """

    def __init__(self, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 100, num_layers: int = 9,
                 nheads: int = 8, dim_feedforward: int = 2048, mask_dim: int = 256, dropout: float = 0.0,
                 masked_attention: bool = True):
        super().__init__()
        self.num_classes, self.hidden_dim, self.mask_dim = num_classes, hidden_dim, mask_dim
        self.nheads, self.masked_attention = nheads, masked_attention
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # content of each query
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # its positional (identity) embedding
        self.cross = nn.ModuleList(CrossAttentionLayer(hidden_dim, nheads, dropout) for _ in range(num_layers))
        self.self_attn = nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads, dropout) for _ in range(num_layers))
        self.ffn = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward, dropout) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        for layers in (self.cross, self.self_attn, self.ffn):  # Mask2Former's per-layer xavier init
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def predict(self, queries: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads: queries ``(B, Q, D)`` -> class logits ``(B, Q, C+1)``, mask logits ``(B, Q, *spatial)``."""
        x = self.decoder_norm(queries)
        # One einsum for all queries and locations; '...' covers (H, W) and (P,) alike.
        masks = torch.einsum("bqc,bc...->bq...", self.mask_embed(x), mask_features)
        return self.class_embed(x), masks

    def forward(self, memory: Sequence[torch.Tensor], mask_features: torch.Tensor,
                memory_pos: Sequence[torch.Tensor] | None = None,
                memory_shapes: Sequence[Sequence[int]] | None = None) -> dict:
        self._check_inputs(memory, mask_features, memory_pos, memory_shapes)
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        queries = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        preds = [self.predict(queries, mask_features)]
        for i, (cross, self_attn, ffn) in enumerate(zip(self.cross, self.self_attn, self.ffn)):
            level = i % len(memory)
            attn_mask = None
            if self.masked_attention:
                shape = memory_shapes[level] if memory_shapes is not None else None
                attn_mask = attention_mask_from_masks(preds[-1][1], self.nheads, shape)
            pos = memory_pos[level] if memory_pos is not None else None
            queries = cross(queries, memory[level], attn_mask=attn_mask, pos=pos, query_pos=query_pos)
            queries = ffn(self_attn(queries, query_pos))
            preds.append(self.predict(queries, mask_features))
        return {"pred_logits": preds[-1][0], "pred_masks": preds[-1][1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in preds[:-1]]}

    def _check_inputs(self, memory, mask_features, memory_pos, memory_shapes) -> None:
        if mask_features.dim() not in (3, 4) or mask_features.shape[1] != self.mask_dim:
            raise ValueError(f"mask_features must be (B, {self.mask_dim}, H, W) or (B, {self.mask_dim}, P), "
                             f"got {tuple(mask_features.shape)}")
        if len(memory) == 0:
            raise ValueError("memory must be a non-empty list of (B, P_l, D) tensors")
        b = mask_features.shape[0]
        for i, m in enumerate(memory):
            if m.dim() != 3 or m.shape[0] != b or m.shape[2] != self.hidden_dim:
                raise ValueError(f"memory[{i}] must be ({b}, P, {self.hidden_dim}), got {tuple(m.shape)}")
            if memory_pos is not None and memory_pos[i].shape != m.shape:
                raise ValueError(f"memory_pos[{i}] must match memory[{i}] {tuple(m.shape)}, "
                                 f"got {tuple(memory_pos[i].shape)}")
        if memory_pos is not None and len(memory_pos) != len(memory):
            raise ValueError(f"memory_pos has {len(memory_pos)} levels, memory has {len(memory)}")
        if self.masked_attention:
            self._check_mask_geometry(memory, mask_features, memory_shapes)

    def _check_mask_geometry(self, memory, mask_features, memory_shapes) -> None:
        """Masked attention needs to map mask locations onto each memory level."""
        if mask_features.dim() == 3:
            bad = [i for i, m in enumerate(memory) if m.shape[1] != mask_features.shape[2]]
            if bad:
                raise ValueError(f"masked attention over point memories needs P_l == P = {mask_features.shape[2]}; "
                                 f"memory levels {bad} have {[memory[i].shape[1] for i in bad]}")
            return
        if memory_shapes is None or len(memory_shapes) != len(memory):
            raise ValueError("memory_shapes (one (h, w) per memory level) is required for masked attention with "
                             f"(B, D, H, W) mask features, got {memory_shapes}")
        for i, (m, (h, w)) in enumerate(zip(memory, memory_shapes)):
            if h * w != m.shape[1]:
                raise ValueError(f"memory_shapes[{i}] = ({h}, {w}) has {h * w} cells, memory[{i}] has {m.shape[1]}")
