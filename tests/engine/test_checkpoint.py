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
