"""Where new files can go: one check shared by every command that writes (outputs, downloads)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def unwritable_reason(folders: Iterable[Path]) -> str | None:
    """Why the first existing entry of ``folders`` (a path, then its parents) cannot receive new files, or None.

    ``"<folder> is a file, not a folder"`` or ``"<folder> is not writable"``; None when it is a writable folder
    (or nothing exists, which cannot happen for a path's parents).
    """
    for folder in folders:
        if folder.exists():
            if not folder.is_dir():
                return f"{folder} is a file, not a folder"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is not writable"
            return None
    return None
