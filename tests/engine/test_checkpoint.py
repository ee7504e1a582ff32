"""Checkpoint files: atomic writes, latest/rotation, RNG state round trip."""
import os
import random

import numpy as np
import pytest
import torch

from influencerformer.engine import checkpoint as ckpt


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, path)

    def broken_replace(src, dst):  # a kill between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"a": torch.zeros(2)}, path)
    assert list(tmp_path.iterdir()) == [path]  # temp file removed, old file intact
    assert torch.equal(torch.load(path)["a"], torch.ones(2))


def test_latest_and_rotation(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (5, 10, 15):
        ckpt.save_checkpoint(tmp_path, step, {"x": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 15]
    assert ckpt.load_checkpoint(tmp_path)["step"] == 15  # a run dir resolves to its latest
    (tmp_path / "checkpoints" / ".step_0000020.pt.abc.tmp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000015.pt"  # temp files are never "latest"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="not found"):
        ckpt.resolve_checkpoint(tmp_path / "nope.pt")


def test_rng_states_round_trip():
    gen = torch.Generator().manual_seed(3)
    states = ckpt.rng_states(gen)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    ckpt.set_rng_states(states, gen)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert first == again


def test_damaged_files_raise_checkpoint_errors_naming_them(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"model": {}}, keep=0)
    good = tmp_path / "checkpoints" / "step_0000001.pt"
    cases = {"empty": b"", "random": os.urandom(256), "truncated": good.read_bytes()[:200]}
    for name, data in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(ckpt.CheckpointError, match=rf"damaged checkpoint {path}"):
            ckpt.load_checkpoint(path)
    torch.save({"step": 1}, tmp_path / "keys.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing model"):
        ckpt.load_checkpoint(tmp_path / "keys.pt", require=("model",))
    torch.save({"step": 7, "model": {}}, tmp_path / "checkpoints" / "step_0000003.pt")  # renamed by hand
    with pytest.raises(ckpt.CheckpointError, match="holds step 7, its name says 3"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000003.pt")


def test_load_latest_falls_back_and_strays_do_not_count(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"model": {}}, keep=0)
    folder = tmp_path / "checkpoints"
    (folder / "step_0000003.pt").write_bytes(b"garbage")
    (folder / "step_99.pt").write_bytes(b"x")  # too short a number: not ours
    (folder / "step_0000050.pt").mkdir()  # a folder is not a checkpoint
    warnings = []
    path, state = ckpt.load_latest(tmp_path, warn=warnings.append)
    assert path.name == "step_0000002.pt" and state["step"] == 2
    assert len(warnings) == 1 and "step_0000003.pt" in warnings[0]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3]


def test_orphan_temps_are_removed_and_the_folder_is_fsynced(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".step_0000001.pt.abcd.tmp").write_bytes(b"half")
    (folder / "notes.tmp").write_bytes(b"mine")  # not a checkpoint temp: kept
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ckpt.save_checkpoint(tmp_path, 2, {"model": {}})
    assert sorted(p.name for p in folder.iterdir()) == ["notes.tmp", "step_0000002.pt"]
    assert synced[-1] == str(folder.resolve())  # the rename is flushed with the folder's entry
