"""The classic toy: a tiny MaskFormer learns to segment axis-aligned squares on noise, without Hungarian matching.

    python examples/squares.py                               # influencer criterion, about a minute on CPU
    python examples/squares.py --criterion hungarian --seconds 30 --out hungarian.png

Images are ``--size`` x ``--size`` noise with 1..``--max-squares`` non-overlapping squares of one class.  The model is
``MaskFormerConfig.preset("tiny")`` with ``--queries`` queries, trained with any registered criterion for
``--seconds`` (or ``--steps``).  Prints the final loss and the fraction of validation squares whose best query
mask (sigmoid > 0.5 at full resolution) has IoU > 0.5, and saves a PNG of ground truth vs every query's mask.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from influencerformer.losses import build_criterion
from influencerformer.losses.registry import CRITERIA
from influencerformer.models import MaskFormer, MaskFormerConfig


def make_squares(num_images: int, size: int = 64, max_squares: int = 3, seed: int = 0) -> list[dict]:
    """``num_images`` items ``{"image" (3, S, S) in [0, 1], "masks" bool (K, S, S), "labels" zeros (K,)}``:
    bright squares (side size/8..size/3, pairwise disjoint) on uniform noise."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(num_images):
        image = rng.uniform(0.0, 0.5, size=(3, size, size)).astype(np.float32)
        occupied = np.zeros((size, size), dtype=bool)
        masks = []
        for _ in range(int(rng.integers(1, max_squares + 1))):
            for _attempt in range(20):
                side = int(rng.integers(size // 8, size // 3 + 1))
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if not occupied[max(y - 1, 0):y + side + 1, max(x - 1, 0):x + side + 1].any():
                    break
            else:
                continue
            mask = np.zeros((size, size), dtype=bool)
            mask[y:y + side, x:x + side] = True
            occupied |= mask
            image[:, mask] = rng.uniform(0.6, 1.0, size=(3, 1)).astype(np.float32) + \
                rng.uniform(-0.05, 0.05, size=(3, side * side)).astype(np.float32)
            masks.append(mask)
        items.append({"image": torch.from_numpy(np.clip(image, 0.0, 1.0)),
                      "masks": torch.from_numpy(np.stack(masks)),
                      "labels": torch.zeros(len(masks), dtype=torch.long)})
    return items


def _batch(items: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    return (torch.stack([it["image"] for it in items]),
            [{"labels": it["labels"], "masks": it["masks"]} for it in items])


@torch.no_grad()
def query_masks(model: MaskFormer, images: torch.Tensor) -> torch.Tensor:
    """Per-query probabilities at full image resolution, ``(B, Q, H, W)``."""
    model.eval()
    masks = model(images)["pred_masks"]
    model.train()
    return F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=False).sigmoid()


def best_query_iou(probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """For each gt mask ``(K, H, W)``, the best IoU over the query masks ``probs (Q, H, W) > 0.5``; ``(K,)``."""
    pred = (probs > 0.5).flatten(1).float()
    tgt = gt.flatten(1).float()
    inter = tgt @ pred.T
    union = tgt.sum(1, keepdim=True) + pred.sum(1)[None] - inter
    return (inter / union.clamp_min(1)).max(dim=1).values


def save_figure(path: str, items: list[dict], probs: torch.Tensor) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, q = len(items), probs.shape[1]
    fig, axes = plt.subplots(rows, q + 2, figsize=(1.3 * (q + 2), 1.4 * rows), squeeze=False)
    for r, item in enumerate(items):
        gt = torch.zeros(item["masks"].shape[1:])
        for k, m in enumerate(item["masks"]):
            gt[m] = k + 1
        axes[r, 0].imshow(item["image"].permute(1, 2, 0).numpy())
        axes[r, 1].imshow(gt.numpy(), cmap="tab10", vmin=0, vmax=10, interpolation="nearest")
        for j in range(q):
            axes[r, j + 2].imshow(probs[r, j].numpy(), cmap="gray", vmin=0, vmax=1)
        if r == 0:
            for j, title in enumerate(["image", "ground truth"] + [f"query {j}" for j in range(q)]):
                axes[0, j].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criterion", default="influencer", choices=sorted(CRITERIA))
    p.add_argument("--seconds", type=float, default=60.0, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (whichever comes first)")
    p.add_argument("--size", type=int, default=64, help="image side (multiple of 32)")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--max-squares", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-train", type=int, default=256, help="training images (a fixed set, cycled)")
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="squares.png")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate; returns ``{"losses" [(step, loss)], "final_loss", "found_fraction", "steps", "out"}``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train = make_squares(args.num_train, args.size, args.max_squares, seed=args.seed)
    val = make_squares(args.num_val, args.size, args.max_squares, seed=args.seed + 1)
    cfg = MaskFormerConfig.preset("tiny", num_classes=1, num_queries=args.queries)
    model = MaskFormer(cfg)
    criterion = build_criterion(args.criterion, num_classes=1, num_points=None)  # 16x16 masks: use every location
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)

    losses: list[tuple[int, float]] = []
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds and (args.steps is None or step < args.steps):
        idx = [(step * args.batch_size + i) % len(train) for i in range(args.batch_size)]
        images, targets = _batch([train[i] for i in idx])
        loss = criterion(model(images), targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 1 or step % args.log_every == 0:
            losses.append((step, loss.item()))
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f}s)", flush=True)
    if not losses or losses[-1][0] != step:
        losses.append((step, loss.item()))

    images, _ = _batch(val)
    probs = query_masks(model, images)
    ious = torch.cat([best_query_iou(probs[i], it["masks"]) for i, it in enumerate(val)])
    found = float((ious > 0.5).float().mean())
    save_figure(args.out, val[:4], probs[:4])
    final = losses[-1][1]
    print(f"criterion {args.criterion}: {step} steps, final loss {final:.4f}, "
          f"squares with a query IoU>0.5: {found:.3f} ({int((ious > 0.5).sum())}/{len(ious)}), "
          f"mean best IoU {float(ious.mean()):.3f}; figure -> {args.out}")
    assert math.isfinite(final)
    return {"losses": losses, "final_loss": final, "found_fraction": found, "mean_best_iou": float(ious.mean()),
            "steps": step, "out": args.out}


if __name__ == "__main__":
    main()
