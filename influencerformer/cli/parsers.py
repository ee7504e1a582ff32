"""The command line's parsers: what every ``influencerformer`` command accepts, with its help text
(the commands themselves are in ``cli/__init__.py``)."""
from __future__ import annotations

import argparse
from typing import Any

from influencerformer.data.download import COCO_BASE_URL, COCO_SPLITS, MIRROR_ENV
from influencerformer.engine.config import CHOICES

DATASETS = CHOICES[("data", "name")]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default in --help, keep the descriptions' line breaks."""


# --------------------------------------------------------------------------------------------- parsers


def _add_config_options(p: argparse.ArgumentParser, *, with_criterion: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML config (sections data, model, criterion, optim, train); none = built-in defaults "
                        "(shapes2d medium preset, tiny model)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config value, repeatable: train.steps=200, model.num_queries=50, "
                        "criterion.epsilon=0.05 (values parsed as YAML; applied after every other option)")
    p.add_argument("--data", choices=DATASETS, default=None,
                   help="dataset (data.name): images shapes2d (built in) or coco; point clouds rooms3d (built in), "
                        "s3dis or scannet; none = the config's (shapes2d by default)")
    p.add_argument("--data-root", metavar="PATH", default=None,
                   help="data root (data.root): COCO's annotations/ + image folders; S3DIS's raw Area_N/ folders or "
                        "the mmdet3d layout (points/, instance_mask/, semantic_mask/); ScanNet's mmdet3d layout")
    if with_criterion:
        p.add_argument("--criterion", metavar="NAME", default=None,
                       help="loss: hungarian, influencer, transport, ownership or seed (criterion.name); "
                            "none = the config's (hungarian by default)")
    p.add_argument("--steps", type=int, metavar="N", default=None, help="training steps (train.steps)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (train.device); none = the config's")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train one model", formatter_class=_Formatter,
                       description="Train one model. Multi-process: torchrun --nproc_per_node N -m influencerformer "
                                   "train ...")
    _add_config_options(p)
    p.add_argument("--seed", type=int, default=None, help="seed of init, data order and sampling (train.seed)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for config.yaml, metrics.jsonl, checkpoints/ (train.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in the run directory; without --config the "
                        "run's saved config.yaml is used (or, when it is missing, the config inside the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, and without --resume, train refuses); the "
                        "earlier run's files are kept aside until the new run writes its first checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP", default=None,
                   help="stop after STEP with a checkpoint, as if killed (the schedule still spans --steps)")


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that start from a trained run (evaluate, predict)."""
    p.add_argument("checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a value of the checkpoint's config (e.g. data.num_val=100), repeatable")
    p.add_argument("--data", choices=DATASETS, default=None, help="dataset; none = the training one")
    p.add_argument("--data-root", metavar="PATH", default=None, help="data root; none = the training one")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the val split", formatter_class=_Formatter,
                       description="Evaluate a checkpoint: images: COCO mask AP/AP50/AP75, F1, duplicate rate, PQ; "
                                   "point clouds: ScanNet-protocol AP/AP50/AP25 on whole val scenes, F1, duplicate rate.")
    _add_checkpoint_options(p)
    p.add_argument("--output", metavar="FILE", default=None,
                   help="metrics JSON to write; none = eval_step<N>.json next to the run's checkpoints/")
    p.add_argument("--num-images", type=int, metavar="N", default=None,
                   help="evaluate the first N val images; none = the training config's data.num_val")


def _predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="draw predicted instances as PNG overlays", formatter_class=_Formatter,
                       description="Draw each predicted instance over its item: images get each mask, class name "
                                   "and score; point clouds a top-down view, one colour per instance.")
    _add_checkpoint_options(p)
    p.add_argument("--images", metavar="DIR", default=None,
                   help="folder of .png/.jpg images to predict (image runs); none = the first --num-images val items")
    p.add_argument("--num-images", type=int, metavar="N", default=8,
                   help="val images (scenes) to draw (without --images)")
    p.add_argument("--image-size", type=int, metavar="PX", default=None,
                   help="resize folder images so the longer side is PX; none = the training image size")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw instances scoring above this")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder; none = <run dir>/predictions")


def _compare_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="train the same model once per criterion and write a report",
                       formatter_class=_Formatter,
                       description="Same model, data, data order and seed; only the loss differs. Writes "
                                   "report.md (table, verdict, machine load, setup), results.json, curves.png, "
                                   "masks.png and runs/ into --out.\n\n"
                                   "Variants put one criterion with different options side by side, e.g.\n"
                                   "  influencerformer compare --criteria hungarian transport \\\n"
                                   "      --variant eps05=transport,epsilon=0.05 \\\n"
                                   "      --variant top3=transport,topk=3,detach_plan=false --seeds 0 1 2\n"
                                   "--set criterion.KEY=VALUE applies to every compared criterion that accepts KEY; "
                                   "a variant's own KEY=VALUE wins over it. The first criterion is the verdict's "
                                   "baseline.")
    _add_config_options(p, with_criterion=False)
    p.add_argument("--criteria", nargs="+", metavar="NAME", default=["hungarian", "influencer"],
                   help="registered criteria to compare, each with the config's criterion kwargs; the first is the "
                        "baseline of the verdict")
    p.add_argument("--variant", dest="variants", metavar="NAME=CRITERION[,KEY=VALUE...]", action="append", default=[],
                   help="repeatable: one more compared loss, run after --criteria: registered CRITERION with keyword "
                        "arguments (values parsed as YAML), reported as NAME, e.g. eps05=transport,epsilon=0.05")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", default=[0], help="one run per seed and criterion")
    p.add_argument("--seed-spread", metavar="SD[:SOURCE]", default=None,
                   help="with one seed, a committed multi-seed AP standard deviation for the verdict to quote, e.g. "
                        "'0.011:docs/results.md §1, 3 seeds'; none = the verdict says the spread is unknown")
    p.add_argument("--eval-every", type=int, metavar="N", default=None,
                   help="evaluate every N steps (train.eval_every); none = the config's")
    p.add_argument("--num-images", type=int, metavar="N", default=4, help="val images shown in masks.png")
    p.add_argument("--out", metavar="DIR", default="runs/compare", help="report folder")
    p.add_argument("--resume", action="store_true",
                   help="continue each run from its latest checkpoint in --out/runs (finished runs are reused)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs already in --out/runs (without it, and without --resume, compare refuses "
                        "before training anything)")


def _bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="loss speed benchmark (benchmarks/loss_speed.py)", formatter_class=_Formatter,
                       description="Runs benchmarks/loss_speed.py with the remaining arguments; "
                                   "see `influencerformer bench -- --help` for its options. "
                                   "Example: influencerformer bench -- --quick")
    p.add_argument("args", nargs=argparse.REMAINDER, default=[],
                   help="arguments passed to benchmarks/loss_speed.py (after an optional --)")


def _check_data_parser(sub: Any) -> None:
    p = sub.add_parser("check-data", help="check a dataset's files and list every problem", formatter_class=_Formatter,
                       description="Reads every annotation, image and point file of a dataset (as training would, "
                                   "but all of them, up front) and prints one line per problem with the file (and "
                                   "line, annotation id or point). Exit status 0: no problem; 2: problems found.")
    p.add_argument("--data", choices=DATASETS, required=True, help="dataset: coco, s3dis or scannet (rooms3d and "
                                                                    "shapes2d are built in: nothing to check)")
    p.add_argument("--data-root", metavar="PATH", default=None, help="the dataset's root folder (as for train)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT", default=["train", "val"], help="splits to check")


def _download_parser(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    download = sub.add_parser("download", help="download a dataset (COCO 2017)", formatter_class=fmt,
                              description="Download and extract a dataset; resumable and verified. S3DIS and ScanNet "
                                          "need their terms accepted: bring them and use `prepare` (docs/data.md).")
    dsub = download.add_subparsers(dest="dataset", required=True, metavar="{coco}")
    coco = dsub.add_parser("coco", help="COCO 2017 images and instance annotations", formatter_class=fmt)
    coco.add_argument("--root", required=True, metavar="PATH",
                      help="COCO root to create (train2017/, val2017/, annotations/)")
    coco.add_argument("--splits", nargs="+", default=["val2017"], choices=COCO_SPLITS, help="image archives to fetch")
    coco.add_argument("--annotations-only", action="store_true", help="fetch only annotations_trainval2017.zip")
    coco.add_argument("--mirror", metavar="URL", default=None,
                      help=f"base URL with zips/ and annotations/ as on the official host (else ${MIRROR_ENV}, "
                           f"else {COCO_BASE_URL})")
    coco.add_argument("--delete-archives", action="store_true", help="delete each zip once extracted")
    coco.add_argument("--skip-md5", action="store_true", help="check sizes only")
    coco.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds without data before retrying")
    coco.add_argument("--retries", type=int, default=3, metavar="N", help="resumed attempts per file after the first")
    coco.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prepare_parser(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    prepare = sub.add_parser("prepare", help="convert a user-downloaded S3DIS / ScanNet to the mmdet3d layout",
                             formatter_class=fmt,
                             description="Convert a dataset you downloaded (after accepting its terms) into "
                                         "points/, instance_mask/, semantic_mask/ (.bin); resumable.")
    psub = prepare.add_subparsers(dest="dataset", required=True, metavar="{s3dis,scannet}")
    s3dis = psub.add_parser("s3dis", help="from Stanford3dDataset_v1.2_Aligned_Version.zip", formatter_class=fmt)
    s3dis.add_argument("--zip", required=True, metavar="PATH", help="Stanford3dDataset_v1.2_Aligned_Version.zip")
    s3dis.add_argument("--root", required=True, metavar="PATH", help="output folder (mmdet3d layout)")
    s3dis.add_argument("--no-progress", action="store_true", help="no progress bar")
    scannet = psub.add_parser("scannet", help="from a ScanNet v2 tree (scans/<scene>/...)", formatter_class=fmt)
    scannet.add_argument("--root", required=True, metavar="PATH", help="ScanNet folder holding scans/")
    scannet.add_argument("--out", metavar="PATH", default=None, help="output folder; none = ROOT/preprocessed")
    scannet.add_argument("--check-only", action="store_true", help="only report missing files")
    scannet.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influencerformer", formatter_class=_Formatter,
                                     description="Query segmentation trained with and without Hungarian matching.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict,compare,bench,check-data,download,prepare}")
    for add in (_train_parser, _evaluate_parser, _predict_parser, _compare_parser, _bench_parser, _check_data_parser):
        add(sub)
    _download_parser(sub)
    _prepare_parser(sub)
    return parser
