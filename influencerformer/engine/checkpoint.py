"""Checkpoints: atomic writes, everything needed to resume bit-for-bit, and finding the latest one.

A checkpoint holds the model, optimiser and scheduler states, the step, every RNG state (python,
numpy, torch CPU/CUDA, the data-loader generator) and the resolved config as a plain dict, so
``evaluate``/``predict`` can rebuild the model from the file alone.

Only ``checkpoints/step_NNNNNNN.pt`` regular files count as checkpoints. A file that cannot be read
(truncated, empty, random bytes, missing keys, a step that disagrees with its name) raises
:class:`CheckpointError` naming it; :func:`load_latest` then falls back to the newest intact one.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import ConfigError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")
_TMP = re.compile(r"^\.step_\d+\.pt\..+\.tmp$")  # atomic_save's temp files of checkpoints
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "stream", "rng", "config", "dataset", "history")
MODEL_KEYS = ("model", "config", "dataset")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used (damaged, incomplete, not a checkpoint); names the file."""


def rng_states(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a training step can consume."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if loader_generator is not None:
        states["loader"] = loader_generator.get_state()
    return states


def set_rng_states(states: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if loader_generator is not None and states.get("loader") is not None:
        loader_generator.set_state(states["loader"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same directory, then os.replace: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself must survive a power loss, not only the file's data
    return path


def fsync_dir(folder: str | Path) -> None:
    """Flush a directory entry (a rename, a new file) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_orphan_temps(run_dir: str | Path) -> list[Path]:
    """Delete temp files a killed ``atomic_save`` left in ``run_dir/checkpoints`` (never complete checkpoints)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    orphans = [p for p in folder.iterdir() if _TMP.match(p.name) and p.is_file()] if folder.is_dir() else []
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``run_dir``, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint file by name (not opened: see :func:`load_latest` for the newest intact one)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the ``keep`` newest ones."""
    remove_orphan_temps(run_dir)  # a killed earlier save may have left one
    path = atomic_save({**state, "step": step}, checkpoint_path(run_dir, step))
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path / CHECKPOINT_DIR}")
        return latest
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    require: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state stored in a checkpoint file (or in the latest checkpoint of a run directory).

    Raises CheckpointError naming the file when it cannot be read, is not a checkpoint dict, lacks a key
    of ``require``, or holds a step other than its name's.
    """
    path = resolve_checkpoint(path)
    try:
        # weights_only=False: the file holds RNG states (numpy tuples) written by this code, not untrusted data.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch/pickle/zip raise many types for truncated, empty or foreign bytes
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"damaged checkpoint {path} ({size} bytes): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else 'unreadable'}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"damaged checkpoint {path}: not a checkpoint of this library (no 'step')")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"damaged checkpoint {path}: missing {', '.join(missing)}")
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != state["step"]:
        raise CheckpointError(f"damaged checkpoint {path}: it holds step {state['step']}, its name says "
                              f"{int(named.group(1))}")
    return state


def load_latest(path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = (),
                warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """(file, state) of a checkpoint file, or of the newest *intact* checkpoint of a run directory.

    A damaged newer checkpoint is reported through ``warn`` (one line naming it) and skipped; when every
    checkpoint of the run is damaged, CheckpointError names them all.
    """
    path = Path(path)
    if not path.is_dir():
        file = resolve_checkpoint(path)
        return file, load_checkpoint(file, map_location, require)
    found = list_checkpoints(path)
    if not found:
        resolve_checkpoint(path)  # raises "no checkpoint in ..."
    problems = []
    for _, file in reversed(found):
        try:
            return file, load_checkpoint(file, map_location, require)
        except CheckpointError as exc:
            problems.append(str(exc))
            if warn is not None:
                warn(f"warning: {exc}; trying an older checkpoint")
    raise CheckpointError(f"no intact checkpoint in {path / CHECKPOINT_DIR}: " + "; ".join(problems))
