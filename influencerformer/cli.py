"""``influencerformer {train,evaluate,predict,compare,bench}`` — the command line.

This file only turns arguments into a :class:`Config` (or paths) and calls the engine; library code
never sees the argparse namespace. Bad input (unknown criterion, missing data root, bad override key)
prints one line and exits with status 2; a diverging run (non-finite loss) exits with status 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from influencerformer.data.download import COCO_BASE_URL, COCO_SPLITS, MIRROR_ENV, DataSetupError
from influencerformer.engine.config import CHOICES, ConfigError

DATASETS = CHOICES[("data", "name")]
BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "loss_speed.py"


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


# ------------------------------------------------------------------------------------------- commands


def _overrides(args: argparse.Namespace, **extra: Any) -> list[str]:
    """Dedicated options as ``section.key=value`` overrides; --set items last so they win."""
    mapping = {"data": "data.name", "data_root": "data.root", "criterion": "criterion.name", "steps": "train.steps",
               "device": "train.device", "seed": "train.seed", "out": "train.out_dir", "eval_every": "train.eval_every"}
    values = {**{k: getattr(args, k, None) for k in mapping}, **extra}
    items = [f"{mapping[k]}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items() if v is not None]
    return items + list(args.overrides)


def _data_overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    """evaluate/predict: only the data may change (the model is what the checkpoint holds); --set last."""
    items = [f"data.name={args.data}"] if args.data else []
    items += [f"data.root={json.dumps(args.data_root)}"] if args.data_root else []
    return items + list(extra) + list(args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from influencerformer.engine.config import load_config
    from influencerformer.engine.train import train

    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at must be ≥ 1, got {args.stop_at}")
    config, stored = args.config, None
    if args.resume and config is None:  # a resumed run continues with the config it started with
        config, stored = _resumed_config(args)
    cfg = load_config(config, _overrides(args), stored=stored)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary (rank 0 holds the evaluation)
        from influencerformer.engine.evaluate import json_safe

        print(json.dumps(json_safe({k: v for k, v in result.items() if k != "curve"}), indent=1, allow_nan=False))
    return 0


def check_output_file(path: str | Path) -> None:
    """ConfigError (one line) unless a file can be written at ``path``: not a folder, no file on its way,
    its first existing folder writable. Checked before the work whose result it will hold."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; give a file name, e.g. {path / 'metrics.json'}")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"output {path}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"output {path}: {folder} is not writable")
            return


def check_output_folder(path: str | Path) -> None:
    """ConfigError (one line) unless ``path`` is or can become a writable folder."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"output folder {path}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"output folder {path}: {folder} is not writable")
            return


def _resumed_config(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    """(config file, stored config) of the run --resume continues: its config.yaml, else the config inside
    its newest intact checkpoint, else neither (the defaults and options start it from scratch)."""
    from influencerformer.engine.checkpoint import list_checkpoints, load_latest
    from influencerformer.engine.config import TrainConfig, parse_override

    out_dirs = [value for path, value in map(parse_override, args.overrides) if path == "train.out_dir"]
    run_dir = Path(out_dirs[-1] if out_dirs else args.out or TrainConfig().out_dir)
    if (run_dir / "config.yaml").is_file():
        return run_dir / "config.yaml", None
    if not list_checkpoints(run_dir):
        return None, None
    warn = lambda line: print(line, file=sys.stderr)  # noqa: E731
    path, state = load_latest(run_dir, require=("config",), warn=warn)
    print(f"{run_dir / 'config.yaml'} is missing: resuming with the config stored in {path}", file=sys.stderr)
    return None, state["config"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from influencerformer.engine.build import evaluate_checkpoint
    from influencerformer.engine.checkpoint import resolve_checkpoint

    if args.num_images is not None and args.num_images < 1:
        raise ConfigError(f"--num-images must be ≥ 1, got {args.num_images}")
    run_dir = resolve_checkpoint(args.checkpoint).parent.parent
    if args.output:
        check_output_file(args.output)  # before the evaluation, not after it
    else:
        check_output_file(run_dir / "eval.json")
    extra = [f"data.num_val={args.num_images}"] if args.num_images is not None else []
    metrics = evaluate_checkpoint(args.checkpoint, _data_overrides(args, *extra), device=args.device)
    output = Path(args.output) if args.output else run_dir / f"eval_step{metrics['step']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=1, allow_nan=False))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {output}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    from influencerformer.engine.build import build_dataset, load_trained, modality
    from influencerformer.engine.checkpoint import resolve_checkpoint
    from influencerformer.engine.distributed import pick_device

    ckpt_path = resolve_checkpoint(args.checkpoint)
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be ≥ 1, got {args.num_images}")
    check_output_folder(args.out or ckpt_path.parent.parent / "predictions")
    model, cfg, info, _ = load_trained(ckpt_path, pick_device(args.device), _data_overrides(args))
    data = modality(cfg.data)
    if args.images is None:
        val_set, _ = build_dataset(cfg.data, "val")
        items = [val_set[i] for i in range(min(args.num_images, len(val_set)))]
        named = [(data.item_name(item), item) for item in items]
    else:
        named = data.load_items(args.images, cfg.data, args.image_size)
    out = Path(args.out) if args.out else ckpt_path.parent.parent / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    preds = data.predict(model, [item for _, item in named], score_threshold=args.score_threshold)
    for (name, item), pred in zip(named, preds):
        fig = Figure(figsize=(5, 5), layout="constrained")
        data.draw(fig.subplots(), item, pred, info.class_names, title=f"{name}: {len(pred['labels'])} instances")
        fig.savefig(out / f"{name}.png", dpi=120)
    print(f"wrote {len(named)} overlays to {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from influencerformer.engine.compare import SeedSpread, compare, parse_variant
    from influencerformer.engine.config import load_config

    if args.num_images < 1:
        raise ConfigError(f"--num-images must be ≥ 1, got {args.num_images}")
    variants = [parse_variant(text) for text in args.variants]
    spread = None
    if args.seed_spread is not None:
        sd, _, source = args.seed_spread.partition(":")
        try:
            spread = SeedSpread(float(sd), source.strip() or "given with --seed-spread")
        except ValueError:
            raise ConfigError(f"--seed-spread must be SD[:SOURCE] with SD a number, got {args.seed_spread!r}") from None
    criteria = list(args.criteria) + [v.criterion for v in variants]  # criterion.* keys valid for any of them
    cfg = load_config(args.config, _overrides(args, out=None), criteria=criteria)
    check_output_folder(args.out)  # a file or a read-only folder is found before any run trains
    results = compare(cfg, list(args.criteria) + variants, args.seeds, args.out, num_images=args.num_images,
                      resume=args.resume, overwrite=args.overwrite, seed_spread=spread)
    report = (Path(args.out) / "report.md").read_text()
    print(report.split("\n## Columns")[0].rstrip())  # the column glossary stays in the file
    print(f"wrote {args.out}/report.md, results.json, curves.png, masks.png ({len(results['runs'])} runs)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if not BENCH_SCRIPT.is_file():
        raise ConfigError(f"benchmark script not found: {BENCH_SCRIPT} (bench needs a source checkout)")
    spec = importlib.util.spec_from_file_location("influencerformer_loss_speed", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.PROG = "influencerformer bench --"  # its --help names this command, not the top-level program
    argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    try:
        module.main(argv)  # returns the measured rows, not a status: having printed the table is success
    except SystemExit as exc:  # the script's own argparse (--help, bad usage)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """One line per problem on stdout and a count on stderr; exit 2 when anything is wrong."""
    from influencerformer.data.coco import check_coco, find_coco_files
    from influencerformer.data.pointcloud import check_preprocessed
    from influencerformer.data.s3dis import check_s3dis_raw

    if args.data in ("shapes2d", "rooms3d"):
        print(f"{args.data} is generated by the library: nothing to check")
        return 0
    if not args.data_root:
        raise ConfigError(f"--data {args.data} needs --data-root PATH")
    root = Path(args.data_root)
    if not root.is_dir():
        raise ConfigError(f"data root not found: {root}")
    problems, counts = [], []
    for split in args.splits:
        if args.data == "coco":
            try:
                image_dir, ann_file = find_coco_files(root, split)
            except FileNotFoundError as exc:
                count, found = 0, [str(exc)]
            else:
                count, found = check_coco(image_dir, ann_file)
            unit = "images"
        elif args.data == "s3dis" and not (root / "points").is_dir():
            count, found = check_s3dis_raw(root, split)
            unit = "rooms"
        else:
            count, found = check_preprocessed(root, args.data, split)
            unit = "scenes"
        counts.append(f"{split}: {count} {unit}, {len(found)} problem(s)")
        problems += found
    for line in problems:
        print(" ".join(line.split()))
    print(f"check-data {args.data} {root}: {'; '.join(counts)}", file=sys.stderr)
    return 2 if problems else 0


def _run_data(command: str, action: Any) -> int:
    """download / prepare: a failed transfer or conversion is one line and exit 1, bad arguments or input files
    exit 2; an interrupted one says that the same command resumes it."""
    try:
        action()
    except DataSetupError as err:
        print(f"influencerformer {command}: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"influencerformer {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"influencerformer {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from influencerformer.data.download import download_coco, human_size

    def action() -> None:
        results = download_coco(args.root, splits=args.splits, annotations_only=args.annotations_only,
                                mirror=args.mirror, keep_archives=not args.delete_archives,
                                verify_md5=not args.skip_md5, timeout=args.timeout, retries=args.retries,
                                progress=not args.no_progress)
        for r in results:
            print(f"{r['archive']}: {r['status']} ({human_size(r['bytes'])} transferred)")
        print(f"COCO ready under {args.root}")

    return _run_data(f"download {args.dataset}", action)


def cmd_prepare(args: argparse.Namespace) -> int:
    from influencerformer.data import prepare

    def action() -> None:
        if args.dataset == "s3dis":
            summary = prepare.prepare_s3dis(args.zip, args.root, progress=not args.no_progress)
        else:
            summary = prepare.prepare_scannet(args.root, args.out, check_only=args.check_only,
                                              progress=not args.no_progress)
        print(prepare.describe_summary(summary))

    return _run_data(f"prepare {args.dataset}", action)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "compare": cmd_compare,
            "bench": cmd_bench, "check-data": cmd_check_data,
            "download": cmd_download, "prepare": cmd_prepare}


def _one_line(exc: BaseException) -> str:
    """The message of a user error on one line (OSError: "<file>: <reason>" when it names a file)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if "Original Traceback" in text:  # raised in a DataLoader worker: keep the original message, not its traceback
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].split(".")[-1].endswith(
            ("Error", "Exception")) else last
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``influencerformer`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2): return it instead
        return int(exc.code or 0)
    from influencerformer.data.errors import DataError
    from influencerformer.engine.train import NonFiniteLossError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, OSError) as exc:  # bad input: config, data, paths, files (PIL's image errors included)
        print(f"influencerformer {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"influencerformer {args.command}: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"influencerformer {args.command}: interrupted", file=sys.stderr)
        return 130
