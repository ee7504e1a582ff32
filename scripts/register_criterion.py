#!/usr/bin/env python
"""Check that OneFormer3D can use ``InfluencerCriterion``: registry, config, one loss call with gradients.

    python scripts/register_criterion.py                 # where InfluencerCriterion is registered (one line)
    python scripts/register_criterion.py --verify        # registry + influencer config + synthetic loss call
    python scripts/register_criterion.py --verify --full \
        --config configs/scannet/influencerformer_1xb4_scannet.py
    python scripts/register_criterion.py --stack         # only: does OneFormer3D's training stack import?

``--verify`` prints ``PASS: ...`` (exit 0) or ``FAIL: <reason>`` (exit 1). It imports the integration, loads the
influencer config with mmengine (OneFormer3D's configs are found through ``ONEFORMER3D_ROOT``), builds the config's
``model.criterion.inst_criterion`` through mmdet3d's ``MODELS`` registry, runs it on synthetic S3DIS-shaped
(voxels, ``scores``) and ScanNet-shaped (superpoint queries, ``scores=None``, ``query_masks``) inputs with two aux
layers and a scene without instances, and checks the loss is finite and its gradient reaches ``masks``,
``cls_preds`` and ``scores``.

``--full`` (run it on the training machine) also requires what OneFormer3D training needs: the ``--stack`` imports,
``MODELS.build`` itself and the config's ``custom_imports``. ``--stack`` imports, in order, mmengine, mmcv's
compiled ops, mmdet, ``mmdet3d.models`` (numba, ...) and ``oneformer3d`` (spconv, MinkowskiEngine, torch-scatter;
OneFormer3D must be on PYTHONPATH) and names what to install for the first that fails. Without ``--full``, a
registry whose ``MODELS.build`` cannot run (mmcv-lite) is checked by looking the class up in it.
``--allow-standin`` accepts mmengine's stand-in registry when mmdet3d is not installed (library tests); OneFormer3D
itself cannot use it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "s3dis" / "influencerformer_1xb2_s3dis-area-5.py"
INSTALL_REGISTRY = ("pip install mmengine==0.10.7 mmcv-lite==2.1.0 && "
                    "pip install --no-deps mmdet==3.3.0 mmdet3d==1.4.0")
INSTALL_HINT = (f"for the registry check: {INSTALL_REGISTRY}; for training, OneFormer3D's full stack (mmcv with "
                "compiled ops, spconv, MinkowskiEngine, torch-scatter): docs/integration_guide.md, 'Install'")


# (module, what to do when it does not import), in import order: the first failure is the one to fix. Versions are
# those of OneFormer3D's Dockerfile (torch 1.13.1 + CUDA 11.6), the environment its published numbers come from.
STACK = (
    ("mmengine", f"pip install mmengine (or {INSTALL_REGISTRY} for the CPU registry check)"),
    ("mmcv.ops", "install mmcv with compiled ops, not mmcv-lite (pip uninstall mmcv-lite): the build for your torch "
                 "and CUDA from https://download.openmmlab.com/mmcv/dist/<cuda>/<torch>/index.html; OneFormer3D's "
                 "Dockerfile: pip install mmcv==2.0.0 -f https://download.openmmlab.com/mmcv/dist/cu116/torch1.13.0/"
                 "index.html"),
    ("mmdet", "pip install mmdet==3.0.0 (OneFormer3D's Dockerfile)"),
    ("mmdet3d.models", "install mmdetection3d with its dependencies (numba, ...); OneFormer3D's Dockerfile: "
                       "pip install git+https://github.com/open-mmlab/mmdetection3d.git@"
                       "22aaa47fdb53ce1870ff92cb7e3f96ae38d17f61"),
    ("oneformer3d", "put OneFormer3D on PYTHONPATH (export PYTHONPATH=$ONEFORMER3D_ROOT:$PYTHONPATH) and install "
                    "its dependencies: spconv, MinkowskiEngine, torch-scatter (see its Dockerfile)"),
)


class CheckFailed(Exception):
    """A failed step; its message is the FAIL line's reason."""


def check_stack() -> str:
    """Import OneFormer3D's training stack in order; raises CheckFailed naming the first missing piece."""
    for name, fix in STACK:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 -- ImportError, or OSError from a compiled extension
            raise CheckFailed(f"OneFormer3D's stack: import {name} failed ({type(err).__name__}: {err}); {fix}"
                              ) from err
    return "OneFormer3D's training stack imports (" + ", ".join(name for name, _ in STACK) + ")"


def import_integration(allow_standin: bool) -> Any:
    """The integration module, once it sits in an acceptable registry."""
    try:
        integration = importlib.import_module("influencerformer.integrations.oneformer3d")
    except Exception as err:  # noqa: BLE001 -- any failure here is the reason to report
        raise CheckFailed(f"cannot import influencerformer.integrations.oneformer3d ({type(err).__name__}: {err}); "
                          f"install this package: pip install -e {REPO}") from err
    kind = integration.REGISTRY_KIND
    if kind is None:
        raise CheckFailed(f"no OpenMMLab registry: {integration.REGISTRY_ERROR}. Install {INSTALL_HINT}")
    if kind != "mmdet3d" and not allow_standin:
        raise CheckFailed(f"mmdet3d's registry is not available ({integration.REGISTRY_ERROR}); only mmengine's "
                          f"stand-in, which OneFormer3D cannot use. Install {INSTALL_HINT}")
    return integration


def load_criterion_cfg(config: Path, full: bool) -> dict[str, Any]:
    """``model.criterion.inst_criterion`` of ``config``; with ``full``, its ``custom_imports`` must import too."""
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(str(config), import_custom_modules=False)
    except Exception as err:  # noqa: BLE001
        raise CheckFailed(f"cannot load {config} ({type(err).__name__}: {err}); OneFormer3D's configs are read from "
                          "$ONEFORMER3D_ROOT/configs (default: a checkout named 'oneformer3d' beside this "
                          "repository): git clone https://github.com/filaPro/oneformer3d and export "
                          "ONEFORMER3D_ROOT=/path/to/oneformer3d") from err
    if full:
        for name in cfg.get("custom_imports", {}).get("imports", []):
            try:
                importlib.import_module(name)
            except Exception as err:  # noqa: BLE001
                raise CheckFailed(f"custom import {name!r} of {config.name} failed ({type(err).__name__}: {err}); "
                                  "put OneFormer3D on PYTHONPATH and install its dependencies (spconv, "
                                  "MinkowskiEngine, torch-scatter; see its Dockerfile)") from err
    try:
        return cfg.model.criterion.inst_criterion.to_dict()
    except AttributeError as err:
        raise CheckFailed(f"{config} has no model.criterion.inst_criterion") from err


def build(integration: Any, criterion_cfg: dict[str, Any], full: bool) -> tuple[Any, str]:
    """Build through the registry; ``full`` requires ``MODELS.build`` itself (OneFormer3D's own path)."""
    if criterion_cfg.get("type") != "InfluencerCriterion":
        raise CheckFailed(f"inst_criterion type is {criterion_cfg.get('type')!r}, not 'InfluencerCriterion'")
    try:
        criterion, how = integration.build_from_registry(criterion_cfg)
    except Exception as err:  # noqa: BLE001
        raise CheckFailed(f"building InfluencerCriterion through the registry failed ({type(err).__name__}: {err})"
                          ) from err
    if full and how != "MODELS.build":
        raise CheckFailed("MODELS.build cannot run: mmdet3d.models does not import (it needs numba and mmcv's "
                          f"compiled ops, absent from mmcv-lite). Install {INSTALL_HINT}")
    return criterion, how


def run_once(integration: Any, criterion: Any) -> list[str]:
    """One call per input style; returns what was checked. Raises CheckFailed on a bad loss or missing gradient."""
    checked = []
    for style in ("s3dis", "scannet"):
        pred, insts = integration.make_synthetic_inputs(criterion.num_classes, style)
        insts = wrap_instance_data(insts)
        loss = criterion(pred, insts)["inst_loss"]
        if not (loss.dim() == 0 and bool(loss.isfinite())):
            raise CheckFailed(f"{style}-shaped inputs: inst_loss is {loss}, expected a finite scalar")
        loss.backward()
        for key in ("masks", "cls_preds", "scores"):
            tensors = pred[key]
            if tensors is None:
                continue
            if any(t.grad is None or not bool(t.grad.abs().sum() > 0) for t in tensors[:1]):
                raise CheckFailed(f"{style}-shaped inputs: no gradient reaches pred['{key}']")
        checked.append(f"{style} (loss {loss.item():.3f})")
    return checked


def wrap_instance_data(insts: list[dict]) -> list[Any]:
    """mmengine's ``InstanceData``, as OneFormer3D passes it."""
    from mmengine.structures import InstanceData

    return [InstanceData(**inst) for inst in insts]


def verify(config: Path, full: bool, allow_standin: bool) -> str:
    """All checks; returns the PASS line's text."""
    if full:
        check_stack()
    integration = import_integration(allow_standin)
    criterion_cfg = load_criterion_cfg(config, full)
    criterion, how = build(integration, criterion_cfg, full)
    checked = run_once(integration, criterion)
    registry = ("mmdet3d's MODELS" if integration.REGISTRY_KIND == "mmdet3d"
                else "mmengine's stand-in registry (scope 'mmdet3d')")
    note = "" if how == "MODELS.build" else (
        "; MODELS.build itself needs mmcv's compiled ops (run --full on the training machine)"
        if integration.REGISTRY_KIND == "mmdet3d" else "")
    return (f"InfluencerCriterion(form={criterion.form!r}) built from {config.name} via {registry} ({how}); "
            f"finite inst_loss, gradients reach masks, cls_preds and scores (when given) on {', '.join(checked)}{note}")


def status() -> int:
    """One line: which registry holds InfluencerCriterion."""
    try:
        integration = import_integration(allow_standin=True)
    except CheckFailed as err:
        print(f"InfluencerCriterion is not registered: {err}")
        return 1
    registered = "InfluencerCriterion" in integration.MODELS.module_dict
    where = f"{integration.MODELS.scope}::{integration.MODELS.name} ({integration.REGISTRY_KIND})"
    print(f"InfluencerCriterion {'registered in' if registered else 'NOT registered in'} {where}"
          + (f"; note: {integration.REGISTRY_ERROR}" if integration.REGISTRY_ERROR else ""))
    return 0 if registered and integration.REGISTRY_KIND == "mmdet3d" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="build from the config and run the loss once")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="influencer config (default: S3DIS)")
    parser.add_argument("--full", action="store_true", help="also require MODELS.build and the config's imports")
    parser.add_argument("--allow-standin", action="store_true", help="accept mmengine's stand-in registry")
    parser.add_argument("--stack", action="store_true", help="only check that OneFormer3D's training stack imports")
    args = parser.parse_args(argv)
    if not (args.verify or args.stack):
        return status()
    try:
        text = check_stack() if args.stack else verify(args.config.resolve(), args.full, args.allow_standin)
        print(f"PASS: {text}")
        return 0
    except CheckFailed as err:
        print(f"FAIL: {err}")
    except Exception as err:  # noqa: BLE001 -- an unexpected error is still a FAIL line, not a traceback
        print(f"FAIL: unexpected {type(err).__name__}: {err}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
