"""A run's folder: what a run writes there (config.yaml, metrics.jsonl, checkpoints/, tensorboard/), the guard
that a fresh run never replaces an earlier one unless asked, and the logger that writes it (rank 0 only)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .evaluate import json_safe

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard")  # what a run writes in its folder
REPLACED_PREFIX = ".replaced-"  # an overwritten run's files wait here until the new run's first checkpoint


class RunExistsError(ConfigError):
    """The run folder holds an earlier run and neither --resume nor --overwrite was given."""


def earlier_run(run_dir: str | Path) -> list[str]:
    """Names of the files of an earlier run in ``run_dir`` (empty: nothing a new run would replace)."""
    path = Path(run_dir)
    found = []
    for name in RUN_FILES:
        item = path / name
        if item.is_file() or (item.is_dir() and any(item.iterdir())):
            found.append(name + ("/" if item.is_dir() else ""))
    return found


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Before any work: the run folder can be written, and a fresh run replaces an earlier one only when asked.

    Raises ConfigError (RunExistsError for an earlier run) with one line naming the folder."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    path = Path(run_dir)
    for folder in (path, *path.parents):  # the first existing one decides
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ConfigError(f"run folder {path}: {folder} exists and is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"run folder {path}: {folder} is not writable")
            break
    found = earlier_run(path)
    if found and not resume and not overwrite:
        raise RunExistsError(f"{path} already holds a run ({', '.join(found)}): use --resume to continue it or "
                             f"--overwrite to replace it (or another --out)")


def set_aside_run(run_dir: str | Path) -> list[Path]:
    """Move an earlier run's files into ``run_dir/.replaced-N/`` (renames: nothing is deleted here) and
    return every such folder; :func:`_save` deletes them once the new run's first checkpoint exists."""
    path = Path(run_dir)
    found = [path / name.rstrip("/") for name in earlier_run(path)]
    if found:
        n = 0
        while (path / f"{REPLACED_PREFIX}{n}").exists():
            n += 1
        aside = path / f"{REPLACED_PREFIX}{n}"
        aside.mkdir()
        for item in found:
            item.rename(aside / item.name)
        ckpt.fsync_dir(path)
        print(f"--overwrite: moved the earlier run's {', '.join(p.name for p in found)} to {aside}; deleted once "
              "this run writes its first checkpoint", flush=True)
    return sorted(p for p in path.glob(f"{REPLACED_PREFIX}*") if p.is_dir())


class RunLogger:
    """``config.yaml`` + ``metrics.jsonl`` (+ TensorBoard) in the run dir; rank 0 only."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int) -> None:
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.dir = Path(cfg.train.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.dir / "config.yaml", cfg.to_yaml())
        self.path = self.dir / "metrics.jsonl"
        # A resumed run drops what was logged after its checkpoint (the replay logs those steps again) and a
        # line cut by a kill; rewritten atomically, so a kill now leaves the old file, never half of it.
        kept = [line for line in self._records() if line[1] <= start_step] if start_step else []
        _atomic_write_text(self.path, "".join(text for text, _ in kept))
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")
            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _records(self) -> list[tuple[str, int]]:
        """(line, step) of every complete, parseable line of metrics.jsonl."""
        lines = self.path.read_text(errors="replace").splitlines(keepends=True) if self.path.exists() else []
        kept = []
        for line in lines:
            try:
                kept.append((line if line.endswith("\n") else line + "\n", int(json.loads(line)["step"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill (or edited by hand): not a record
        return kept

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # one append of a whole line: a kill leaves every earlier line intact (O_APPEND, one write call)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(json_safe(record), allow_nan=False) + "\n").encode())
        finally:
            os.close(fd)
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
