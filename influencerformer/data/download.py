"""Download COCO 2017 — resumable, verified, with progress (the ``download`` command is in ``cli.py``).

One archive goes through four steps, each safe to interrupt:

1. transfer to ``root/NAME.part``; a later run resumes it with an HTTP ``Range`` request (a server
   that ignores Range answers 200 and the file restarts from byte 0);
2. verify size and md5 against :data:`COCO_ARCHIVES`; a mismatch deletes the ``.part`` (resuming a
   corrupt file would only corrupt it further) and raises :class:`VerificationError`;
3. rename ``NAME.part`` → ``NAME`` (a file without ``.part`` is always complete and verified, or
   was brought by the user and is verified before use);
4. extract into ``root/.NAME.extracting/``, check the entries the reader needs, move them into
   ``root``, then write ``root/.influencerformer/NAME.done.json``. Without that marker an archive
   counts as not extracted, so a killed extraction is redone, never taken for complete.

A run finding every marker (and the entries it lists) transfers nothing.

Steps 1-3 are :func:`transfer.fetch` (any file over HTTP), the extraction of step 4 is
:func:`extraction.extract` (any zip); this module holds what is COCO's: the archive table, the done-markers
and :func:`download_coco`, which runs the steps for each archive.

Checksums: COCO publishes no checksums on cocodataset.org. The sizes are those images.cocodataset.org
serves; the md5s are the values independently computed and cited by several projects (MLPerf's COCO
download script, dataset classes of torchvision-style libraries), consistent with each other. Pass
``verify_md5=False`` (``--skip-md5``) to check sizes only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .extraction import extract
from .folders import unwritable_reason
from .setup_errors import DataSetupError, DownloadError, VerificationError
from .transfer import fetch, md5_of, part_path, verify_file

__all__ = [  # with the setup errors and the transfer / extraction functions, imported from here by their callers
    "COCO_ARCHIVES", "COCO_BASE_URL", "COCO_SPLITS", "MARKER_DIR", "MIRROR_ENV", "Archive", "DataSetupError",
    "DownloadError", "VerificationError", "coco_base_url", "download_coco", "extract", "fetch", "human_size",
    "is_extracted", "md5_of", "verify_file", "write_json_atomic",
]

COCO_BASE_URL = "http://images.cocodataset.org"
MIRROR_ENV = "INFLUENCERFORMER_COCO_MIRROR"
MARKER_DIR = ".influencerformer"


@dataclass(frozen=True)
class Archive:
    """One downloadable archive.

    name: file name under root; url_path: path under the base URL (a mirror keeps the same paths);
    size / md5: expected values (None = not checked); required: paths (relative to root) the
    extracted archive must provide.
    """

    name: str
    url_path: str
    size: int | None
    md5: str | None
    required: tuple[str, ...]


COCO_ARCHIVES: dict[str, Archive] = {
    "train2017": Archive("train2017.zip", "zips/train2017.zip", 19_336_861_798,
                         "cced6f7f71b7629ddf16f17bbcfab6b2", ("train2017",)),
    "val2017": Archive("val2017.zip", "zips/val2017.zip", 815_585_330,
                       "442b8da7639aecaf257c1dceb8ba8c80", ("val2017",)),
    "annotations": Archive("annotations_trainval2017.zip", "annotations/annotations_trainval2017.zip", 252_907_541,
                           "f4bbac642086de4f52a3fdda2de5fa2c",
                           ("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
}
COCO_SPLITS = ("train2017", "val2017")


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return ""  # unreachable


# ------------------------------------------------------------------------------------------ markers


def write_json_atomic(path: Path, data: dict) -> None:
    """Write json through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _marker(root: Path, archive: Archive) -> Path:
    return root / MARKER_DIR / f"{archive.name}.done.json"


def is_extracted(root: Path, archive: Archive) -> bool:
    """True when the archive's marker exists and what it lists (and what is required) is present."""
    try:
        entries = json.loads(_marker(root, archive).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((root / p).exists() for p in [*entries, *archive.required])


# -------------------------------------------------------------------------------------------- COCO


def coco_base_url(mirror: str | None = None) -> str:
    """The base URL: mirror, else $INFLUENCERFORMER_COCO_MIRROR, else the official host."""
    base = mirror or os.environ.get(MIRROR_ENV) or COCO_BASE_URL
    if not re.match(r"https?://", base):
        source = "--mirror" if mirror else MIRROR_ENV
        raise ValueError(f"{source}: expected an http:// or https:// URL, got {base!r} (offline: copy the zips "
                         "into --root instead, see docs/data.md)")
    return base.rstrip("/")


def _coco_archives(splits: Sequence[str], annotations_only: bool) -> list[Archive]:
    unknown = [s for s in splits if s not in COCO_SPLITS]
    if unknown:
        raise ValueError(f"COCO splits: expected some of {list(COCO_SPLITS)}, got {unknown}")
    images = [] if annotations_only else [COCO_ARCHIVES[s] for s in dict.fromkeys(splits)]
    return [COCO_ARCHIVES["annotations"], *images]


def _check_free_space(root: Path, archives: Sequence[Archive]) -> None:
    """Fail before transferring when the disk cannot hold the rest of the downloads plus their
    extraction (COCO's JPEGs do not compress: extracted ≈ archive size)."""
    needed = 0
    for a in archives:
        if a.size is None:
            continue
        present = root / a.name
        have = present.stat().st_size if present.exists() else 0
        part = part_path(present)
        have = have or (part.stat().st_size if part.exists() else 0)
        needed += (a.size - min(have, a.size)) + a.size
    free = shutil.disk_usage(root).free
    if needed > free:
        raise DataSetupError(f"{root}: expected at least {human_size(needed)} free for "
                             f"{', '.join(a.name for a in archives)} and their extraction, got {human_size(free)} free")


def _install(archive: Archive, root: Path, base: str, *, keep_archive: bool, verify_md5: bool, timeout: float,
             retries: int, progress: bool) -> dict:
    """Fetch (or verify a present file), extract and mark one archive; a summary dict."""
    if is_extracted(root, archive):
        return {"archive": archive.name, "status": "already extracted", "bytes": 0}
    path = root / archive.name
    brought = path.exists()
    try:
        transferred = fetch(f"{base}/{archive.url_path}", path, size=archive.size,
                            md5=archive.md5 if verify_md5 else None, timeout=timeout, retries=retries,
                            progress=progress)
    except DownloadError as err:
        raise DownloadError(f"{err}. Offline: copy {archive.name} into {root}, or use --mirror URL "
                            "(docs/data.md)") from None
    entries = extract(path, root, archive.required, progress=progress)
    write_json_atomic(_marker(root, archive), {"archive": archive.name, "size": path.stat().st_size,
                                                "md5_checked": bool(verify_md5 and archive.md5), "entries": entries})
    if not keep_archive:
        path.unlink()
    status = "verified the present archive and extracted it" if brought else "downloaded and extracted"
    return {"archive": archive.name, "status": status, "bytes": transferred}


def _check_folder(root: Path) -> None:
    """ValueError (one line) unless ``root`` is or can become a writable folder: checked before any transfer."""
    reason = unwritable_reason((root, *root.parents))
    if reason:
        raise ValueError(f"--root {root}: {reason}")


def download_coco(root: str | os.PathLike, *, splits: Sequence[str] = ("val2017",), annotations_only: bool = False,
                  mirror: str | None = None, keep_archives: bool = True, verify_md5: bool = True,
                  timeout: float = 60.0, retries: int = 3, progress: bool = True) -> list[dict]:
    """Download and extract COCO 2017 into the layout `find_coco_files` reads:
    root/{split}/*.jpg and root/annotations/instances_{split}.json.

    Args:
        splits: image archives to fetch ("train2017", "val2017"); the annotations always come.
        annotations_only: fetch only annotations_trainval2017.zip.
        mirror: base URL holding zips/<split>.zip and annotations/annotations_trainval2017.zip
            (default $INFLUENCERFORMER_COCO_MIRROR, else http://images.cocodataset.org).
        keep_archives: keep the zips after extraction (False frees their space).
        verify_md5: check md5s as well as sizes (see the module docstring on where they come from).
        timeout: seconds without data before a connection counts as failed; retries: resumed
            attempts per file after the first.

    Zips already in root (brought by hand) are verified and used without the network. Returns one
    dict per archive: {"archive", "status", "bytes"} (bytes transferred in this call).
    """
    root = Path(root)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)  # "val2017" is one split, not 7 letters
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer ≥ 0 (resumed attempts after the first), got {retries!r}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    _check_folder(root)
    archives = _coco_archives(splits, annotations_only)
    base = coco_base_url(mirror)
    root.mkdir(parents=True, exist_ok=True)
    _check_free_space(root, [a for a in archives if not is_extracted(root, a)])
    results = [_install(a, root, base, keep_archive=keep_archives, verify_md5=verify_md5, timeout=timeout,
                        retries=retries, progress=progress) for a in archives]
    _check_coco_layout(root, splits, annotations_only)
    return results


def _check_coco_layout(root: Path, splits: Sequence[str], annotations_only: bool) -> None:
    """The reader's view of the result: the files it looks for must now be there."""
    from influencerformer.data.coco import find_coco_files

    for split in splits:
        if annotations_only:
            ann = root / "annotations" / f"instances_{split}.json"
            if not ann.is_file():
                raise VerificationError(f"{ann}: expected after extracting annotations_trainval2017.zip, not found")
        else:
            try:
                find_coco_files(root, split)
            except FileNotFoundError as err:
                raise VerificationError(f"after extraction: {err}") from None
