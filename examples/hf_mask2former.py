"""Train transformers' Mask2Former on shapes2d with our criteria swapped in, once per loss, and compare COCO AP.

    python examples/hf_mask2former.py                                   # hungarian vs influencer, a few CPU minutes
    python examples/hf_mask2former.py --losses hungarian influencer seed --steps 50 --preset medium

Everything is local: a small randomly initialised Swin + Mask2Former built from configs (no hub download), data
from ``Shapes2D`` through ``collate_batch``, predictions from ``Mask2FormerImageProcessor``'s
``post_process_instance_segmentation`` (constructed here, not loaded) and AP from ``influencerformer.metrics``.
Every loss starts from the same initial weights and sees the same batches: only the criterion differs.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: configs and processor are built locally

import torch  # noqa: E402
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig  # noqa: E402

from influencerformer.data import Shapes2D, collate_batch  # noqa: E402
from influencerformer.integrations.transformers import use_criterion  # noqa: E402
from influencerformer.losses.registry import CRITERIA  # noqa: E402
from influencerformer.metrics import build_coco_gt, coco_mask_ap, masks_to_coco_results  # noqa: E402


def build_model(num_labels: int, image_size: int, num_queries: int, seed: int) -> Mask2FormerForUniversalSegmentation:
    """A small Mask2Former (1.65 M parameters): 4-stage Swin (embed 32), 1 pixel-decoder encoder layer,
    3 decoder layers (2 of them supervised as aux layers), hidden size 64. Seeded, so every loss starts equal."""
    backbone = SwinConfig(image_size=image_size, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 4],
                          window_size=4, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, num_queries=num_queries,
                               feature_size=64, mask_feature_size=64, hidden_dim=64, encoder_feedforward_dim=128,
                               encoder_layers=1, decoder_layers=3, num_attention_heads=4, dim_feedforward=128,
                               train_num_points=1024)  # 12544 points would exceed the 16x16 mask grid 50 times
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config)


def make_processor() -> Any:
    """transformers' Mask2Former image processor, built locally; the PIL backend when torchvision is absent
    (``Mask2FormerImageProcessor`` falls back to it anyway, with a warning)."""
    try:
        import torchvision  # noqa: F401
        from transformers import Mask2FormerImageProcessor as Processor
    except ImportError:
        from transformers import Mask2FormerImageProcessorPil as Processor
    return Processor(do_resize=False, do_rescale=False)


def normalize(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> normalised with the processor's mean / std (as its preprocessing would)."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


def batches(dataset: Shapes2D, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches from ``collate_batch``; the same order for every loss (seeded generator)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate_batch([dataset[i] for i in order[start:start + batch_size]])


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero (the crowded recipe of docs/background.md, shortened)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: Mask2FormerForUniversalSegmentation, data: Iterator[dict[str, Any]], processor: Any,
          args: argparse.Namespace) -> list[float]:
    """``args.steps`` AdamW steps on ``model(pixels, mask_labels=..., class_labels=...).loss``; returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args.steps, warmup))
    losses = []
    for step in range(args.steps):
        batch = next(data)
        targets = batch["targets"]
        # transformers' label format: float 0/1 masks (K_i, H, W) and long labels (K_i,) per image
        loss = model(normalize(batch["images"], processor), mask_labels=[t["masks"].float() for t in targets],
                     class_labels=[t["labels"] for t in targets]).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  step {step + 1:5d}  loss {sum(losses[-args.log_every:]) / args.log_every:8.3f}", flush=True)
    return losses


@torch.no_grad()
def evaluate(model: Mask2FormerForUniversalSegmentation, processor: Any, val: Shapes2D, batch_size: int,
             score_threshold: float) -> dict[str, Any]:
    """COCO mask AP of ``post_process_instance_segmentation`` (binary maps: instances may overlap) on ``val``."""
    model.eval()
    items = [val[i] for i in range(len(val))]
    predictions = []
    for start in range(0, len(items), batch_size):
        batch = collate_batch(items[start:start + batch_size])
        outputs = model(normalize(batch["images"], processor))
        results = processor.post_process_instance_segmentation(
            outputs, threshold=score_threshold, target_sizes=batch["image_sizes"], return_binary_maps=True)
        for image_id, result in zip(batch["image_ids"], results):
            segments = result["segments_info"]
            if not segments:  # nothing above the threshold: the segmentation is an all -1 map, not binary maps
                continue
            predictions += masks_to_coco_results(
                image_id, result["segmentation"].bool(), [s["label_id"] for s in segments],
                [s["score"] for s in segments], val.category_ids)
    coco_gt = build_coco_gt(items, val.category_ids, val.class_names)
    return coco_mask_ap(coco_gt, predictions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="+", default=["hungarian", "influencer"], choices=sorted(CRITERIA),
                        help="registered criteria to compare, one training run each")
    parser.add_argument("--steps", type=int, default=1000,
                        help="optimiser steps per loss (about 0.1 s each on 2 idle CPU cores)")
    parser.add_argument("--preset", default="medium", help="shapes2d preset (medium = 64x64, ~10 shapes)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--score-threshold", type=float, default=0.0,
                        help="post-processing score threshold; AP ranks by score, so keep every query by default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-every", type=int, default=50, help="print the mean loss every N steps (0: never)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.num_val < 1 or args.num_train < args.batch_size:
        parser.error("need --steps >= 1, --batch-size >= 1, --num-val >= 1 and --num-train >= --batch-size")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set = Shapes2D("train", preset=args.preset, num_images=args.num_train, seed=args.seed)
    val_set = Shapes2D("val", preset=args.preset, num_images=args.num_val, seed=args.seed)
    image_size = train_set.config.image_size
    processor = make_processor()
    rows = []
    for name in args.losses:
        model = build_model(train_set.num_classes, image_size, args.queries, args.seed)
        use_criterion(model, name)  # the only line that differs from training with transformers' own loss
        print(f"[{name}] {args.steps} steps, batch {args.batch_size}, {args.preset} {image_size}x{image_size}",
              flush=True)
        start = time.perf_counter()
        torch.manual_seed(args.seed)  # same point-sampling stream for every loss
        losses = train(model, batches(train_set, args.batch_size, args.seed), processor, args)
        seconds = time.perf_counter() - start
        metrics = evaluate(model, processor, val_set, args.batch_size, args.score_threshold)
        rows.append({"loss": name, "steps": args.steps, "train_s": seconds, "first_loss": losses[0],
                     "last_loss": sum(losses[-10:]) / len(losses[-10:]), **metrics})
    print_table(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per loss: training time, loss at the start and end (mean of the last 10 steps), AP."""
    print(f"\n| {'loss':<11} | steps | train s | loss first -> last |   AP  |  AP50 |  AP75 |")
    print(f"|{'-' * 13}|-------|---------|-------------------|-------|-------|-------|")
    for r in rows:
        print(f"| {r['loss']:<11} | {r['steps']:5d} | {r['train_s']:7.1f} | {r['first_loss']:7.2f} -> "
              f"{r['last_loss']:7.2f} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} |")


if __name__ == "__main__":
    main()
