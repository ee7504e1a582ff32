"""The condensation form of the Influencer Loss on images: per-pixel embeddings + beta, then greedy clustering.

    python examples/toy_image.py                                     # shapes2d, about a minute and a half on CPU
    python examples/toy_image.py --coco-root data/coco --ann-file data/coco/annotations/instances_val2017.json

A small CNN written here (a stride-2 stem, dilated 3x3 convs, coordinate channels so instances of equal colour
can be told apart) maps an image to a ``--dim``-D embedding and a beta logit per pixel.  ``InfluencerLoss`` is
applied to ``--points`` randomly sampled pixels per image (background = pixels of no instance).  At inference
``greedy_cluster`` takes the highest-beta unassigned pixel above ``--beta-threshold`` as an influencer, gives it
every unassigned pixel within ``--radius`` in embedding space, and repeats.  Clusters are matched to the ground
truth one-to-one at IoU >= 0.5 (``f1_at_iou``) for precision / recall / F1.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influencerformer.losses import InfluencerLoss
from influencerformer.metrics import f1_at_iou
from influencerformer.metrics.diagnostics import f1_from_counts


class PixelEmbedNet(nn.Module):
    """``(B, 3, H, W)`` in [0, 1] -> embeddings ``(B, D, H, W)`` and beta logits ``(B, H, W)`` (H, W even)."""

    def __init__(self, dim: int = 8, width: int = 32, dilations: tuple[int, ...] = (1, 2, 4, 8, 1)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(5, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU())
        layers = []
        for d in dilations:
            layers += [nn.Conv2d(width, width, 3, padding=d, dilation=d), nn.GroupNorm(4, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width + 2, dim + 1, 1)
        self.dim = dim

    @staticmethod
    def _coords(x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([ys, xs], dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([images - 0.5, self._coords(images)], dim=1)
        f = self.body(self.stem(x))
        f = F.interpolate(f, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(torch.cat([f, self._coords(f)], dim=1))
        return out[:, :self.dim], out[:, self.dim]


def instance_id_map(masks: Tensor) -> Tensor:
    """Disjoint-or-not bool masks ``(K, H, W)`` -> ids ``(H, W)`` long, -1 = background (later masks win)."""
    ids = torch.full(masks.shape[1:], -1, dtype=torch.long)
    for k, m in enumerate(masks):
        ids[m] = k
    return ids


@torch.no_grad()
def greedy_cluster(emb: Tensor, beta: Tensor, *, beta_threshold: float = 0.5, radius: float = 0.5,
                   min_size: int = 1, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Greedy influencer clustering of ``N`` points: embeddings ``(N, D)``, beta logits ``(N,)``.

    Repeatedly take the unassigned point of highest beta with ``sigmoid(beta) > beta_threshold``, assign to it
    every unassigned point within ``radius`` of its embedding; clusters smaller than ``min_size`` are dropped
    (their points stay assigned).  Returns ``masks`` bool ``(M, N)`` and ``scores`` ``(M,)`` (the seeds' sigmoid
    beta), in seed order.
    """
    n = emb.shape[0]
    prob = beta.sigmoid()
    free = torch.ones(n, dtype=torch.bool) if valid is None else valid.clone()
    order = torch.argsort(prob, descending=True)
    order = order[prob[order] > beta_threshold]
    masks, scores = [], []
    for i in order.tolist():
        if not free[i]:
            continue
        members = free & ((emb - emb[i]).pow(2).sum(1) <= radius * radius)
        members[i] = True
        free &= ~members
        if int(members.sum()) >= min_size:
            masks.append(members)
            scores.append(prob[i])
    if not masks:
        return torch.zeros(0, n, dtype=torch.bool), torch.zeros(0)
    return torch.stack(masks), torch.stack(scores)


def sample_points(ids: Tensor, num_points: int, generator: torch.Generator) -> Tensor:
    """Indices of ``num_points`` random pixels (with replacement only if the image is smaller)."""
    n = ids.numel()
    if num_points >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:num_points]


def load_data(args: argparse.Namespace) -> tuple[object, object]:
    if args.coco_root is None:
        from influencerformer.data import Shapes2D

        return (Shapes2D("train", preset=args.preset, num_images=args.num_train, seed=args.seed),
                Shapes2D("val", preset=args.preset, num_images=args.num_val, seed=args.seed))
    from influencerformer.data import COCOInstanceDataset, find_coco_files

    if args.ann_file is not None:  # one annotation file: train and evaluate on it
        ds = COCOInstanceDataset(args.coco_root, args.ann_file, image_size=args.image_size, pad_to=args.image_size)
        return ds, ds
    train = COCOInstanceDataset(*find_coco_files(args.coco_root, "train"), image_size=args.image_size,
                                pad_to=args.image_size)
    val = COCOInstanceDataset(*find_coco_files(args.coco_root, "val"), image_size=args.image_size,
                              pad_to=args.image_size)
    return train, val


def evaluate(model: PixelEmbedNet, dataset, num: int, args: argparse.Namespace) -> dict:
    model.eval()
    counts = {"tp": 0, "fp": 0, "fn": 0}
    with torch.no_grad():
        for i in range(min(num, len(dataset))):
            item = dataset[i]
            emb, beta = model(item["image"][None])
            d = emb.shape[1]
            h, w = item["image"].shape[1:]
            valid = torch.zeros(h, w, dtype=torch.bool)
            vh, vw = item.get("image_size", (h, w))
            valid[:vh, :vw] = True
            masks, scores = greedy_cluster(emb[0].reshape(d, -1).T, beta[0].reshape(-1),
                                           beta_threshold=args.beta_threshold, radius=args.radius,
                                           min_size=args.min_size, valid=valid.reshape(-1))
            r = f1_at_iou(masks.reshape(-1, h, w), scores, item["masks"], score_threshold=0.0)
            for k in counts:
                counts[k] += r[k]
    model.train()
    return {**counts, **f1_from_counts(**counts)}


def condensation_step(criterion: InfluencerLoss, opt: torch.optim.Optimizer, xs: list[Tensor], bs: list[Tensor],
                      ids: list[Tensor], batch: list[Tensor]) -> dict[str, Tensor]:
    """One optimiser step of the condensation loss on per-item point lists (embeddings, beta, instance ids, item)."""
    terms = criterion(torch.cat(xs), torch.cat(bs), torch.cat(ids), torch.cat(batch))
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    return terms


def log_terms(step: int, terms: dict[str, Tensor], start: float) -> None:
    print(f"step {step:4d}  loss {terms['loss'].item():.4f}  "
          + "  ".join(f"{k} {terms[k].item():.3f}" for k in ("attractive", "repulsive", "beta", "background"))
          + f"  ({time.perf_counter() - start:.0f}s)", flush=True)


def train_condensation(criterion: InfluencerLoss, opt: torch.optim.Optimizer,
                       make_batch: Callable[[int], tuple[list[Tensor], ...]],
                       args: argparse.Namespace) -> tuple[list[tuple[int, float]], int]:
    """Condensation steps until ``args.steps`` or ``args.seconds``; ``make_batch(step)`` gives the per-item lists
    (embeddings, beta, instance ids, item index). Returns the logged (step, loss) pairs, last step included,
    and the number of steps done."""
    losses: list[tuple[int, float]] = []
    start, step = time.perf_counter(), 0
    while step < args.steps and time.perf_counter() - start < args.seconds:
        terms = condensation_step(criterion, opt, *make_batch(step))
        step += 1
        if step == 1 or step % args.log_every == 0:
            losses.append((step, terms["loss"].item()))
            log_terms(step, terms, start)
    if not losses or losses[-1][0] != step:
        losses.append((step, terms["loss"].item()))
    return losses, step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", help="Shapes2D preset (default, medium, crowded)")
    p.add_argument("--coco-root", default=None, help="COCO-format root (or image folder with --ann-file)")
    p.add_argument("--ann-file", default=None, help="COCO instances json; images are read from --coco-root")
    p.add_argument("--image-size", type=int, default=128, help="COCO: resize longest side and pad to this")
    p.add_argument("--num-train", type=int, default=500)
    p.add_argument("--num-val", type=int, default=20)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seconds", type=float, default=90.0, help="training wall-clock budget")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--points", type=int, default=2048, help="sampled pixels per image")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bg-weight", type=float, default=1.0, help="InfluencerLoss background weight")
    p.add_argument("--beta-threshold", type=float, default=0.5)
    p.add_argument("--radius", type=float, default=0.5, help="cluster radius in embedding space (margin is 1)")
    p.add_argument("--min-size", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate; returns ``{"losses" [(step, loss)], "final_loss", "precision", "recall", "f1", ...}``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train, val = load_data(args)
    model = PixelEmbedNet(args.dim, args.width)
    criterion = InfluencerLoss(bg_weight=args.bg_weight)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def make_batch(step: int) -> tuple[list[Tensor], ...]:
        items = [train[(step * args.batch_size + i) % len(train)] for i in range(args.batch_size)]
        images = torch.stack([it["image"] for it in items])
        emb, beta = model(images)
        d = emb.shape[1]
        xs, bs, ids, batch = [], [], [], []
        for b, it in enumerate(items):
            idx = sample_points(it["image"][0], args.points, gen)
            xs.append(emb[b].reshape(d, -1).T[idx])
            bs.append(beta[b].reshape(-1)[idx])
            ids.append(instance_id_map(it["masks"]).reshape(-1)[idx])
            batch.append(torch.full((idx.numel(),), b, dtype=torch.long))
        return xs, bs, ids, batch

    losses, step = train_condensation(criterion, opt, make_batch, args)

    metrics = evaluate(model, val, args.num_val, args)
    final = losses[-1][1]
    print(f"{step} steps, final loss {final:.4f}; val ({min(args.num_val, len(val))} images): "
          f"precision {metrics['precision']:.3f} recall {metrics['recall']:.3f} F1 {metrics['f1']:.3f} "
          f"(tp {metrics['tp']} fp {metrics['fp']} fn {metrics['fn']})")
    assert math.isfinite(final)
    return {"losses": losses, "final_loss": final, "steps": step, **metrics}


if __name__ == "__main__":
    main()
