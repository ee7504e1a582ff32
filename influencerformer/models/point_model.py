"""A pure-PyTorch point-cloud query model: voxel backbone + the shared QueryDecoder.

Points are voxelised on a grid (5 cm by default) with one `torch.unique` over integer keys; a
point MLP is averaged into its voxel. The backbone is a small U-shaped stack over voxel grids of
1, 2, 4, ... times the voxel size: on each grid, residual blocks mix every voxel with the mean of
its existing 3×3×3 neighbours (found by hashing: `searchsorted` of neighbour keys among the
sorted voxel keys), grids are pooled by scatter-mean and added back coarse-to-fine. The finest
voxels are the decoder's memory and its mask locations (so masked attention works as in
Mask2Former); the voxel masks are then gathered back to the points. No compiled extensions.

Scenes in a batch have the same number of points N (sample them to a fixed count) but any
number of voxels: the backbone works on all voxels of the batch at once, the decoder per scene.

Two options, both off by default (each changes training, so existing results stay as they were):
- ``query_init="sampled"`` (OneFormer3D's ScanNet setting): the queries start from the features and
  positions of Q points sampled in each scene instead of learned embeddings; ``outputs["query_seeds"]``
  gives each query's seed point, which the ``seeded`` criterion turns into its target.
- ``semantic_head``: a linear layer on the finest voxel features gives per-point semantic logits
  ``outputs["sem_logits"]`` (OneFormer3D reports semantic mIoU next to instance AP).
Their modules are created after every other one, so turning them on leaves the other weights' init unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .query_decoder import MLP, QueryDecoder, attention_mask_from_masks

QUERY_INITS = ("learned", "sampled")


@dataclass
class PointModelConfig:
    """Hyper-parameters of `PointQueryModel` (defaults: a small model for one GPU).

    num_classes: C classes (class head C + 1, last = no object). num_queries: Q.
    hidden_dim: width of voxel features, memory, queries and mask features.
    num_decoder_layers / nheads / dim_feedforward: the QueryDecoder's.
    voxel_size: finest grid in metres. num_levels: grids of voxel_size · 2^l, l < num_levels.
    blocks_per_level: neighbourhood blocks on each grid. masked_attention: Mask2Former's.
    query_init: "learned" (Mask2Former's embeddings) or "sampled" (each query starts at a sampled point).
    semantic_head: per-point semantic logits over num_semantic_classes (None = num_classes; ScanNet has 20
    semantic classes but 18 instance classes), trained with weight semantic_weight (OneFormer3D: 0.2).
    """

    num_classes: int = 13
    num_queries: int = 100
    hidden_dim: int = 128
    num_decoder_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 512
    voxel_size: float = 0.05
    num_levels: int = 4
    blocks_per_level: int = 2
    masked_attention: bool = True
    query_init: str = "learned"
    semantic_head: bool = False
    num_semantic_classes: int | None = None
    semantic_weight: float = 0.2

    def __post_init__(self) -> None:
        for name in (
            "num_classes",
            "num_queries",
            "hidden_dim",
            "num_decoder_layers",
            "nheads",
            "dim_feedforward",
            "num_levels",
            "blocks_per_level",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PointModelConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.nheads:
            raise ValueError(
                f"PointModelConfig.hidden_dim: expected a multiple of nheads ({self.nheads}), got {self.hidden_dim}"
            )
        if not self.voxel_size > 0:
            raise ValueError(f"PointModelConfig.voxel_size: expected > 0, got {self.voxel_size}")
        if self.query_init not in QUERY_INITS:
            raise ValueError(f"PointModelConfig.query_init: expected one of {', '.join(QUERY_INITS)}, "
                             f"got {self.query_init!r}")
        if self.num_semantic_classes is not None and int(self.num_semantic_classes) < 1:
            raise ValueError(f"PointModelConfig.num_semantic_classes: expected >= 1 or None, "
                             f"got {self.num_semantic_classes}")
        if not (self.semantic_weight >= 0 and self.semantic_weight < float("inf")):
            raise ValueError(f"PointModelConfig.semantic_weight: expected a finite number >= 0, "
                             f"got {self.semantic_weight}")

    @property
    def semantic_classes(self) -> int:
        """Classes of the semantic head (num_semantic_classes, or num_classes when it is None)."""
        return int(self.num_semantic_classes or self.num_classes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PointModelConfig":
        """A named preset (``tiny`` for 2 CPU cores, ``default`` for one GPU) with keyword overrides."""
        if name not in POINT_PRESETS:
            raise ValueError(f"unknown PointModelConfig preset {name!r}; valid presets: {sorted(POINT_PRESETS)}")
        values = {**POINT_PRESETS[name], **overrides}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown PointModelConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**values)


POINT_PRESETS: dict[str, dict] = {
    # rooms3d on 2 CPU cores: 10 cm voxels, 3 grids, 32 queries, 3 decoder layers (0.3 M parameters)
    "tiny": dict(num_queries=32, hidden_dim=64, num_decoder_layers=3, nheads=4, dim_feedforward=256,
                 voxel_size=0.1, num_levels=3, blocks_per_level=1),
    # the dataclass defaults: 5 cm voxels, 4 grids, 100 queries, 6 decoder layers (one GPU)
    "default": {},
}


_FOURIER_DIM = 3 + 6 * 6  # fourier_features with its default 6 bands
# 3×3×3 neighbourhood offsets, the centre included
_OFFSETS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)


@dataclass
class VoxelLevel:
    """One grid: voxel batch index (V_l,), integer cell (V_l, 3), neighbours (V_l, 27) (-1 = empty),
    and `parent` (V_{l-1},): index of each finer voxel's cell on this grid (None on the finest)."""

    batch: torch.Tensor
    cell: torch.Tensor
    neighbours: torch.Tensor
    parent: torch.Tensor | None


def _keys(batch: torch.Tensor, cell: torch.Tensor, size: int) -> torch.Tensor:
    """One int64 key per (batch, cell), cells in [-1, size - 1): ordered by batch first."""
    c = cell + 1
    return ((batch * size + c[..., 0]) * size + c[..., 1]) * size + c[..., 2]


def _neighbours(keys: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor, size: int) -> torch.Tensor:
    """(V, 27) index of each voxel's 3×3×3 neighbours among sorted `keys`, -1 where the cell is empty."""
    want = _keys(batch[:, None], cell[:, None, :] + _OFFSETS.to(cell.device), size)  # (V, 27)
    idx = torch.searchsorted(keys, want).clamp(max=len(keys) - 1)
    return torch.where(keys[idx] == want, idx, -1)


def voxelize(coords: torch.Tensor, voxel_size: float, num_levels: int) -> tuple[torch.Tensor, list[VoxelLevel]]:
    """Voxel grids of a batch of scenes coords (B, N, 3).

    Returns point_to_voxel (B, N): index of each point's voxel among the finest grid's V_0 voxels
    (flat over the batch, sorted by scene), and the grids finest first."""
    b, n, _ = coords.shape
    cell = ((coords - coords.amin(1, keepdim=True)) / voxel_size).floor().long()  # per-scene origin
    size = int(cell.max()) + 3 if cell.numel() else 3  # room for the -1 / +1 neighbour offsets
    batch = torch.arange(b, device=coords.device)[:, None].expand(b, n)
    keys, point_to_voxel = torch.unique(_keys(batch, cell, size).reshape(-1), return_inverse=True)
    v_batch = torch.zeros_like(keys).scatter_(0, point_to_voxel, batch.reshape(-1))
    v_cell = torch.zeros(len(keys), 3, dtype=torch.long, device=coords.device)
    v_cell.index_copy_(0, point_to_voxel, cell.reshape(-1, 3))  # every point of a voxel has its cell
    levels = [VoxelLevel(v_batch, v_cell, _neighbours(keys, v_batch, v_cell, size), None)]
    for _ in range(1, num_levels):
        fine = levels[-1]
        coarse_cell = torch.div(fine.cell, 2, rounding_mode="floor")
        keys, parent = torch.unique(_keys(fine.batch, coarse_cell, size), return_inverse=True)
        batch_l = torch.zeros_like(keys).scatter_(0, parent, fine.batch)
        cell_l = torch.zeros(len(keys), 3, dtype=torch.long, device=coords.device).index_copy_(0, parent, coarse_cell)
        levels.append(VoxelLevel(batch_l, cell_l, _neighbours(keys, batch_l, cell_l, size), parent))
    return point_to_voxel.reshape(b, n), levels


def fourier_features(xyz: torch.Tensor, num_bands: int = 6, min_wavelength: float = 0.2) -> torch.Tensor:
    """xyz (..., 3) metres → (..., 3 + 6·num_bands): xyz, then sin and cos at wavelengths
    min_wavelength · 2^k. Plain coordinates through an MLP only give smooth functions of position;
    masks need sharp ones (the usual NeRF / Fourier-feature argument)."""
    freq = 2 * torch.pi / (min_wavelength * 2.0 ** torch.arange(num_bands, device=xyz.device, dtype=xyz.dtype))
    angles = (xyz[..., None] * freq).flatten(-2)
    return torch.cat([xyz, angles.sin(), angles.cos()], -1)


def scatter_mean(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of rows x (M, D) grouped by index (M,) into (size, D)."""
    total = x.new_zeros(size, x.shape[1]).index_add_(0, index, x)
    count = torch.bincount(index, minlength=size).clamp(min=1).to(x.dtype)
    return total / count[:, None]


class NeighbourBlock(nn.Module):
    """Residual block on one voxel grid: x (V, D) → x + MLP([x, mean of non-empty 3×3×3 neighbours])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        found = neighbours >= 0
        total = torch.zeros_like(h)
        # 27 gathers of (V, D) instead of one (V, 27, D) tensor: memory stays O(V·D) on big rooms
        for k in range(neighbours.shape[1]):
            total = total + h[neighbours[:, k].clamp(min=0)] * found[:, k, None]
        mean = total / found.sum(1, keepdim=True).clamp(min=1)
        return x + self.mlp(torch.cat([h, mean], 1))


class VoxelBackbone(nn.Module):
    """Point MLP averaged into voxels, then a U-shaped stack of NeighbourBlocks over the grids:
    down (pool by scatter-mean, blocks on each grid), then up (each coarse grid's features added
    to its finer children through a linear layer). Returns finest-voxel features (V_0, D)."""

    def __init__(self, cfg: PointModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        # inputs: rgb, Fourier features of the position in the scene (centred), offset inside the voxel
        self.point_mlp = MLP(3 + _FOURIER_DIM + 3, d, d, 2)
        self.down = nn.ModuleList(
            nn.ModuleList(NeighbourBlock(d) for _ in range(cfg.blocks_per_level)) for _ in range(cfg.num_levels)
        )
        self.up = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.num_levels - 1))
        self.norm = nn.LayerNorm(d)
        self.voxel_size = cfg.voxel_size

    def forward(
        self, coords: torch.Tensor, colors: torch.Tensor, point_to_voxel: torch.Tensor, levels: list[VoxelLevel]
    ) -> torch.Tensor:
        centred = coords - coords.mean(1, keepdim=True)
        inside = torch.remainder(coords - coords.amin(1, keepdim=True), self.voxel_size) / self.voxel_size - 0.5
        x = self.point_mlp(torch.cat([colors, fourier_features(centred), inside], -1)).reshape(
            -1, self.point_mlp.layers[-1].out_features
        )
        x = scatter_mean(x, point_to_voxel.reshape(-1), len(levels[0].batch))
        skips = []
        for level, blocks in zip(levels, self.down):
            if level.parent is not None:
                x = scatter_mean(x, level.parent, len(level.batch))
            for block in blocks:
                x = block(x, level.neighbours)
            skips.append(x)
        for lvl in range(len(levels) - 1, 0, -1):  # coarse to fine
            x = skips[lvl - 1] + self.up[lvl - 1](x)[levels[lvl].parent]
        return self.norm(x)


def _superpoint_index(super_points: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B·N,) index of each point's superpoint among all superpoints of the batch, and their number."""
    b = super_points.shape[0]
    scene = torch.arange(b, device=super_points.device)[:, None].expand_as(super_points)
    keys = torch.stack([scene.reshape(-1), super_points.reshape(-1).long()], 1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return inverse, len(unique)


def superpoint_mean(masks: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mask logits (B, Q, N) averaged over superpoints (``index`` from `_superpoint_index`), read back per point."""
    b, q, n = masks.shape
    flat = masks.permute(1, 0, 2).reshape(q, b * n).T  # (B·N, Q)
    return scatter_mean(flat, index, size)[index].T.reshape(q, b, n).permute(1, 0, 2)


def sample_seeds(num_scenes: int, num_points: int, num_queries: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, Q) seed point indices: Q distinct points per scene, uniform (a scene of fewer points repeats some)."""
    seeds = torch.rand(num_scenes, num_points, generator=generator).argsort(1)[:, :num_queries]
    if num_points < num_queries:
        extra = torch.randint(num_points, (num_scenes, num_queries - num_points), generator=generator)
        seeds = torch.cat([seeds, extra], 1)
    return seeds


def decode_from(decoder: QueryDecoder, memory: torch.Tensor, mask_features: torch.Tensor, pos: torch.Tensor,
                queries: torch.Tensor, query_pos: torch.Tensor) -> dict:
    """``decoder``'s layers and heads run from given initial queries ``(B, Q, D)`` and their positions instead of its
    learned embeddings; one point memory ``(B, P, D)`` with mask features ``(B, D_m, P)``. Same output as
    ``QueryDecoder.forward`` (whose loop this repeats: it takes no initial queries)."""
    preds = [decoder.predict(queries, mask_features)]
    for cross, self_attn, ffn in zip(decoder.cross, decoder.self_attn, decoder.ffn):
        attn_mask = attention_mask_from_masks(preds[-1][1], decoder.nheads) if decoder.masked_attention else None
        queries = cross(queries, memory, attn_mask=attn_mask, pos=pos, query_pos=query_pos)
        queries = ffn(self_attn(queries, query_pos))
        preds.append(decoder.predict(queries, mask_features))
    return {"pred_logits": preds[-1][0], "pred_masks": preds[-1][1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in preds[:-1]]}


class PointQueryModel(nn.Module):
    """``forward(coords (B, N, 3) metres, colors (B, N, 3) in [0, 1], super_points (B, N) or None)`` →
    ``{"pred_logits": (B, Q, C+1), "pred_masks": (B, Q, N) point mask logits,
    "aux_outputs": [num_decoder_layers dicts of the same], "point_to_voxel": (B, N)}``, plus
    ``"query_seeds": (B, Q) long`` (query_init "sampled") and ``"sem_logits": (B, N, S)`` (semantic_head).

    Masks are predicted per finest voxel and read at each point's voxel, so every point of a voxel
    shares its logit; with ``super_points`` (e.g. ScanNet's segments) they are then averaged over each
    superpoint (semantic logits too). The backbone runs on the whole batch; the decoder once per scene.

    Sampled queries: query q of a scene starts from its seed point's voxel, content ``query_proj(feature)`` and
    position the memory's positional embedding there. Seeds are uniform random points in training (the global
    RNG) and a fixed draw (generator seeded 0) in eval mode, so evaluation is repeatable.
    """

    def __init__(self, cfg: PointModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.backbone = VoxelBackbone(cfg)
        self.pos_mlp = MLP(_FOURIER_DIM, d, d, 2)
        self.mask_proj = nn.Linear(d, d)
        self.decoder = QueryDecoder(
            num_classes=cfg.num_classes,
            hidden_dim=d,
            num_queries=cfg.num_queries,
            num_layers=cfg.num_decoder_layers,
            nheads=cfg.nheads,
            dim_feedforward=cfg.dim_feedforward,
            mask_dim=d,
            masked_attention=cfg.masked_attention,
        )
        # optional modules last: the weights above get the same init whether or not they exist
        self.query_proj = self.sem_head = None
        if cfg.query_init == "sampled":
            self.decoder.query_feat = self.decoder.query_embed = None  # unused: no parameter without a gradient
            self.query_proj = nn.Linear(d, d)
        if cfg.semantic_head:
            self.sem_head = nn.Linear(d, cfg.semantic_classes)

    def forward(self, coords: torch.Tensor, colors: torch.Tensor, super_points: torch.Tensor | None = None) -> dict:
        """super_points: optional (B, N) integer id of each point's superpoint (any ids, per scene); when
        given, every mask logit is averaged over its superpoint, so masks are predicted per superpoint."""
        self._check(coords, colors, super_points)
        b, n = coords.shape[:2]
        with torch.no_grad():  # the grids are integer bookkeeping, not a gradient path
            point_to_voxel, levels = voxelize(coords, self.cfg.voxel_size, self.cfg.num_levels)
        feats = self.backbone(coords, colors, point_to_voxel, levels)
        batch = levels[0].batch
        centres = (levels[0].cell.float() + 0.5) * self.cfg.voxel_size
        centres = centres - scatter_mean(centres, batch, b)[batch]  # positions relative to the scene's middle
        counts = torch.bincount(batch, minlength=b)
        first = counts.cumsum(0) - counts
        local = point_to_voxel - first[:, None]  # (B, N): each point's voxel within its scene
        seeds = None
        if self.query_proj is not None:
            generator = None if self.training else torch.Generator().manual_seed(0)
            seeds = sample_seeds(b, n, self.cfg.num_queries, generator).to(coords.device)
        per_scene = zip(
            feats.split(counts.tolist()),
            self.mask_proj(feats).split(counts.tolist()),
            self.pos_mlp(fourier_features(centres)).split(counts.tolist()),
        )
        # the decoder runs per scene (as OneFormer3D's does): scenes have different voxel counts,
        # and padding would leak into cross-attention through masked attention's empty-mask fallback
        outs = []
        for i, (mem, mf, pos) in enumerate(per_scene):
            if seeds is None:
                outs.append(self.decoder([mem[None]], mf.T[None], [pos[None]]))
            else:
                voxel = local[i, seeds[i]]  # (Q,) each seed's voxel
                outs.append(decode_from(self.decoder, mem[None], mf.T[None], pos[None],
                                        self.query_proj(mem[voxel])[None], pos[voxel][None]))

        pool = None if super_points is None else _superpoint_index(super_points)

        def to_points(masks: list[torch.Tensor]) -> torch.Tensor:
            out = torch.cat([m.gather(2, local[i][None, None].expand(1, m.shape[1], -1)) for i, m in enumerate(masks)])
            return out if pool is None else superpoint_mean(out, *pool)

        def layer(get) -> dict:
            return {
                "pred_logits": torch.cat([get(o)["pred_logits"] for o in outs]),
                "pred_masks": to_points([get(o)["pred_masks"] for o in outs]),
            }

        result = layer(lambda o: o)
        result["aux_outputs"] = [layer(lambda o, i=i: o["aux_outputs"][i]) for i in range(self.cfg.num_decoder_layers)]
        result["point_to_voxel"] = point_to_voxel
        if seeds is not None:
            result["query_seeds"] = seeds
        if self.sem_head is not None:
            sem = self.sem_head(feats)[point_to_voxel]  # (B, N, S): each point reads its voxel
            result["sem_logits"] = sem if pool is None else superpoint_mean(sem.transpose(1, 2), *pool).transpose(1, 2)
        return result

    @staticmethod
    def _check(coords: torch.Tensor, colors: torch.Tensor, super_points: torch.Tensor | None) -> None:
        if coords.dim() != 3 or coords.shape[-1] != 3 or colors.shape != coords.shape:
            raise ValueError(
                f"PointQueryModel: expected coords and colors (B, N, 3), got {tuple(coords.shape)} "
                f"and {tuple(colors.shape)}"
            )
        if super_points is not None and (super_points.shape != coords.shape[:2] or super_points.is_floating_point()):
            raise ValueError(
                f"PointQueryModel: expected integer super_points (B, N) = {tuple(coords.shape[:2])}, "
                f"got {super_points.dtype} {tuple(super_points.shape)}"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
