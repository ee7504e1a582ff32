"""The condensation form of the Influencer Loss on point clouds: an MLP per point, then greedy clustering.

    python examples/toy_pointcloud.py                                 # synthetic Rooms3D, about a minute on CPU
    python examples/toy_pointcloud.py --data-root data/s3dis_raw      # S3DIS raw release (Area_N/<room>/...)

Each point's xyz (centred on its room) and rgb go through a shared MLP; a max-pooled room feature is appended
(PointNet style) before the head that gives a ``--dim``-D embedding and a beta logit per point.  ``InfluencerLoss``
is applied to every point (-1 instances, i.e. ceiling / floor / wall, are background).  At inference the greedy
clustering of ``toy_image.greedy_cluster`` (highest beta first, radius in embedding space) gives instances, matched
to the ground truth at IoU >= 0.5 for precision / recall / F1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_image import greedy_cluster, train_condensation  # noqa: E402

from influencerformer.losses import InfluencerLoss  # noqa: E402
from influencerformer.metrics import f1_at_iou  # noqa: E402
from influencerformer.metrics.diagnostics import f1_from_counts  # noqa: E402


class PointEmbedNet(nn.Module):
    """``(N, 6)`` xyz + rgb of one room -> embeddings ``(N, D)`` and beta logits ``(N,)``."""

    def __init__(self, dim: int = 8, width: int = 128, freqs: int = 6) -> None:
        super().__init__()
        self.freqs = freqs
        in_dim = 6 + 6 * freqs  # raw xyz + rgb, sin/cos of xyz at ``freqs`` frequencies
        self.local = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                  nn.Linear(width, dim + 1))
        self.dim = dim

    def forward(self, xyz: Tensor, rgb: Tensor) -> tuple[Tensor, Tensor]:
        bands = 2.0 ** torch.arange(self.freqs, dtype=xyz.dtype, device=xyz.device) * math.pi / 4
        ang = (xyz[:, :, None] * bands).flatten(1)
        f = self.local(torch.cat([xyz, rgb - 0.5, ang.sin(), ang.cos()], dim=1))
        g = f.max(dim=0, keepdim=True).values.expand_as(f)
        out = self.head(torch.cat([f, g], dim=1))
        return out[:, :self.dim], out[:, self.dim]


def prepare(item: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(xyz centred on the room's xy centre and floor, rgb, instance ids)``."""
    xyz = item["coords"].float()
    lo, hi = xyz.min(0).values, xyz.max(0).values
    center = torch.stack([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    return xyz - center, item["colors"].float(), item["instance_labels"].long()


def load_data(args: argparse.Namespace) -> tuple[object, object]:
    if args.data_root is None:
        from influencerformer.data import Rooms3D

        pts = (args.points, args.points)
        return (Rooms3D("train", num_scenes=args.num_train, seed=args.seed, points_per_room=pts),
                Rooms3D("val", num_scenes=args.num_val, seed=args.seed, points_per_room=pts))
    from influencerformer.data import S3DISRawDataset

    return S3DISRawDataset(args.data_root, "train"), S3DISRawDataset(args.data_root, "test")


def subsample(xyz: Tensor, rgb: Tensor, ids: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    if xyz.shape[0] <= n:
        return xyz, rgb, ids
    idx = torch.randperm(xyz.shape[0], generator=gen)[:n]
    return xyz[idx], rgb[idx], ids[idx]


def evaluate(model: PointEmbedNet, scenes: list, args: argparse.Namespace) -> dict:
    model.eval()
    counts = {"tp": 0, "fp": 0, "fn": 0}
    with torch.no_grad():
        for xyz, rgb, ids in scenes:
            emb, beta = model(xyz, rgb)
            masks, scores = greedy_cluster(emb, beta, beta_threshold=args.beta_threshold, radius=args.radius,
                                           min_size=args.min_size)
            num_inst = int(ids.max()) + 1 if ids.numel() else 0
            gt = torch.stack([ids == k for k in range(num_inst)]) if num_inst else torch.zeros(0, ids.numel(),
                                                                                               dtype=torch.bool)
            gt = gt[gt.any(1)] if num_inst else gt
            r = f1_at_iou(masks, scores, gt, score_threshold=0.0)
            for k in counts:
                counts[k] += r[k]
    model.train()
    return {**counts, **f1_from_counts(**counts)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="S3DIS raw root (Area_N/<room>/Annotations); default Rooms3D")
    p.add_argument("--points", type=int, default=5000, help="points per room (Rooms3D) / subsample size (S3DIS)")
    p.add_argument("--num-train", type=int, default=32, help="Rooms3D training rooms (cycled)")
    p.add_argument("--num-val", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0, help="training wall-clock budget")
    p.add_argument("--batch-size", type=int, default=2, help="rooms per step")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bg-weight", type=float, default=1.0, help="InfluencerLoss background weight")
    p.add_argument("--beta-threshold", type=float, default=0.5)
    p.add_argument("--radius", type=float, default=0.5)
    p.add_argument("--min-size", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate; returns ``{"losses" [(step, loss)], "final_loss", "precision", "recall", "f1",
    "train_f1", ...}`` (``train_f1`` on up to ``--num-val`` training rooms)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_ds, val_ds = load_data(args)
    # Rooms are generated / parsed once and kept (small); S3DIS rooms are subsampled to --points.
    train = [subsample(*prepare(train_ds[i]), args.points, gen) for i in range(len(train_ds))]
    val = [subsample(*prepare(val_ds[i]), args.points, gen) for i in range(min(args.num_val, len(val_ds)))]
    model = PointEmbedNet(args.dim, args.width)
    criterion = InfluencerLoss(bg_weight=args.bg_weight)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def make_batch(step: int) -> tuple[list[Tensor], ...]:
        xs, bs, ids, batch = [], [], [], []
        for b in range(args.batch_size):
            xyz, rgb, inst = train[(step * args.batch_size + b) % len(train)]
            emb, beta = model(xyz, rgb)
            xs.append(emb)
            bs.append(beta)
            ids.append(inst)
            batch.append(torch.full((inst.numel(),), b, dtype=torch.long))
        return xs, bs, ids, batch

    losses, step = train_condensation(criterion, opt, make_batch, args)

    metrics = evaluate(model, val, args)
    train_metrics = evaluate(model, train[:args.num_val], args)
    final = losses[-1][1]
    print(f"{step} steps, final loss {final:.4f}; val ({len(val)} rooms): precision {metrics['precision']:.3f} "
          f"recall {metrics['recall']:.3f} F1 {metrics['f1']:.3f} (tp {metrics['tp']} fp {metrics['fp']} "
          f"fn {metrics['fn']}); train rooms F1 {train_metrics['f1']:.3f}")
    assert math.isfinite(final)
    return {"losses": losses, "final_loss": final, "steps": step, "train_f1": train_metrics["f1"], **metrics}


if __name__ == "__main__":
    main()
