"""Test-wide settings.

Tests use small tensors: on a loaded 2-core machine, intra-op threading makes tiny ops ~1000x slower
(thread wake-ups dominate), so every test runs single-threaded.
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
