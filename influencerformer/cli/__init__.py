"""``influencerformer {train,evaluate,predict,compare,bench,check-data,download,prepare}`` — the command line.

This package only turns arguments into a :class:`Config` (or paths) and calls the engine or the data tools;
library code never sees the argparse namespace (``parsers.py`` says what each command accepts). Bad input
(unknown criterion, missing data root, bad override key) prints one line and exits with status 2; a diverging
run (non-finite loss) exits with status 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from influencerformer.data.download import DataSetupError
from influencerformer.data.folders import unwritable_reason
from influencerformer.engine.config import ConfigError

from .parsers import build_parser

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_speed.py"


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
    reason = unwritable_reason(path.parents)
    if reason:
        raise ConfigError(f"output {path}: {reason}")


def check_output_folder(path: str | Path) -> None:
    """ConfigError (one line) unless ``path`` is or can become a writable folder."""
    path = Path(path)
    reason = unwritable_reason((path, *path.parents))
    if reason:
        raise ConfigError(f"output folder {path}: {reason}")


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
