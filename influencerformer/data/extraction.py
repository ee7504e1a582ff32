"""Extract a zip archive safely: through a scratch folder, checked, then moved into place.

``extract`` unpacks into ``root/.NAME.extracting/`` (refusing members that would land outside it and skipping
macOS metadata), checks there that the archive holds the paths the reader needs, then moves its top-level entries
into ``root`` (merging into folders another archive already brought). A bad archive never reaches ``root``; a
killed extraction leaves only the scratch folder, which the next one removes.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm import tqdm

from .setup_errors import VerificationError


def _members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    """The archive's members minus macOS metadata; refuses paths that would leave the target."""
    members = []
    for info in zf.infolist():
        path = PurePosixPath(info.filename)
        if path.parts[:1] == ("__MACOSX",) or path.name == ".DS_Store":
            continue
        if path.is_absolute() or ".." in path.parts:
            raise VerificationError(f"{archive}: member {info.filename!r} would be written outside the target folder")
        members.append(info)
    return members


def _move_into(src: Path, dst: Path) -> None:
    """Move src to dst; where dst is an existing folder (another archive's, or a killed run's
    partial move) merge into it, files from src replacing files of the same name."""
    if dst.is_dir() and src.is_dir():
        for child in src.iterdir():
            _move_into(child, dst / child.name)
        src.rmdir()
    else:
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)


def extract(archive: Path, root: Path, required: Sequence[str] = (), *, progress: bool = True) -> list[str]:
    """Extract archive into root through root/.NAME.extracting/ and return its top-level entries.
    The required paths are checked in the scratch folder, so a bad archive never reaches root."""
    scratch = root / f".{archive.name}.extracting"
    shutil.rmtree(scratch, ignore_errors=True)  # what a killed run left
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = _members(zf, archive)
                with tqdm(total=sum(m.file_size for m in members), desc=f"extract {archive.name}", unit="B",
                          unit_scale=True, unit_divisor=1024, disable=not progress, mininterval=0.5,
                          leave=False) as bar:
                    for member in members:
                        zf.extract(member, scratch)
                        bar.update(member.file_size)
        except (zipfile.BadZipFile, EOFError) as err:  # also raised on a CRC mismatch inside a member
            raise VerificationError(f"{archive}: not a readable zip archive ({err}); delete it and run again") from None
        missing = [r for r in required if not (scratch / r).exists()]
        if missing:
            raise VerificationError(f"{archive}: expected the archive to contain {', '.join(missing)}; it has "
                                    f"{sorted({PurePosixPath(m.filename).parts[0] for m in members})}")
        entries = sorted({PurePosixPath(m.filename).parts[0] for m in members})
        for entry in entries:
            _move_into(scratch / entry, root / entry)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entries
