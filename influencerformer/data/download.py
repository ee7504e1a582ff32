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

Checksums: COCO publishes no checksums on cocodataset.org. The sizes are those images.cocodataset.org
serves; the md5s are the values independently computed and cited by several projects (MLPerf's COCO
download script, dataset classes of torchvision-style libraries), consistent with each other. Pass
``verify_md5=False`` (``--skip-md5``) to check sizes only.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm import tqdm

from .folders import unwritable_reason

COCO_BASE_URL = "http://images.cocodataset.org"
MIRROR_ENV = "INFLUENCERFORMER_COCO_MIRROR"
MARKER_DIR = ".influencerformer"
_CHUNK = 1 << 20
_USER_AGENT = "influencerformer-download/1"


class DataSetupError(RuntimeError):
    """A download or preparation step failed; the message names the file and what was expected."""


class DownloadError(DataSetupError):
    """The transfer failed (server unreachable, HTTP error, connection dropped too often)."""


class VerificationError(DataSetupError):
    """A file's size, checksum or contents are not what was expected."""


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


class _Retryable(Exception):
    """A transient transfer failure: worth another (resumed) attempt."""


# ------------------------------------------------------------------------------------------ transfer


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return ""  # unreachable


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """The response to GET url from byte offset; None when the server says the range is past the
    end (416: the .part already holds the whole file, or more — verification decides)."""
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return None
        if err.code >= 500 or err.code in (408, 429):  # the server may recover: retry
            raise _Retryable(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _Retryable(f"cannot reach the server ({err.reason})") from None
    except (OSError, http.client.HTTPException) as err:  # timeouts, resets during the handshake
        raise _Retryable(f"cannot reach the server ({err})") from None


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _start_and_total(response: http.client.HTTPResponse, offset: int, url: str) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's total size (None if not told).
    206 continues at offset; 200 means the server ignored Range and sends the whole file."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            raise DownloadError(f"{url}: asked for bytes from {offset}, server sent Content-Range "
                                f"{response.headers.get('Content-Range')!r}")
        return offset, None if match.group(3) == "*" else int(match.group(3))
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _transfer(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> int:
    """One attempt: append to part from its current length. Returns the bytes received; raises
    _Retryable when the connection fails or closes before the end of the file."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # longer than the real file: not a prefix of it
        part.unlink()
        offset = 0
    if size is not None and offset == size:  # complete already (a run killed before renaming)
        return 0
    response = _open(url, offset, timeout)
    if response is None:
        return 0
    with response:
        start, total = _start_and_total(response, offset, url)
        if size is not None and total is not None and total != size:  # another file: do not write it
            raise VerificationError(f"{url}: expected {part.name[:-5]} of {size} bytes, the server "
                                    f"has {total} bytes (a mirror serving a different file?)")
        received = 0
        with open(part, "ab" if start else "wb") as out, tqdm(
                total=total or size, initial=start, desc=part.name[:-5], unit="B", unit_scale=True,
                unit_divisor=1024, disable=not progress, mininterval=0.5, leave=False) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead
                raise _Retryable(f"connection failed after {start + received} bytes ({err})") from None
    # http.client returns b"" (no error) when the peer closes early: compare with the announced size
    if total is not None and start + received < total:
        raise _Retryable(f"connection closed after {start + received} of {total} bytes")
    return received


def md5_of(path: Path, progress: bool = False) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"md5 {path.name}", unit="B", unit_scale=True,
                                     unit_divisor=1024, disable=not progress, mininterval=0.5, leave=False) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: Path, size: int | None, md5: str | None, *, name: str | None = None,
                progress: bool = False) -> None:
    """Raise VerificationError naming the file and expected vs got when size or md5 differ."""
    name = name or path.name
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise VerificationError(f"{name}: expected {size} bytes, got {actual} ({path})")
    if md5 is not None:
        got = md5_of(path, progress)
        if got != md5.lower():
            raise VerificationError(f"{name}: expected md5 {md5}, got {got} ({path})")


def fetch(url: str, dest: str | os.PathLike, *, size: int | None = None, md5: str | None = None,
          timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, progress: bool = True) -> int:
    """Download url to dest through dest.part: resumed across attempts and runs, verified (size,
    md5), renamed when complete. An existing dest is verified, not downloaded. Returns the bytes
    transferred. Raises DownloadError (server unreachable, HTTP error, too many dropped
    connections; the .part is kept for the next run) or VerificationError (the .part is deleted)."""
    dest = Path(dest)
    if dest.exists():  # renamed only after verification, or brought by the user: check either way
        try:
            verify_file(dest, size, md5, progress=progress)
        except VerificationError as err:
            raise VerificationError(f"{err}; delete it to download it again") from None
        return 0
    part = _part_path(dest)
    transferred = 0
    for attempt in range(retries + 1):
        try:
            transferred += _transfer(url, part, size, timeout, progress)
            break
        except _Retryable as err:
            kept = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                resume = f"; {part} keeps the {kept} bytes received, run again to resume" if kept else ""
                raise DownloadError(f"{url}: {err} (after {retries + 1} attempt(s)){resume}") from None
            time.sleep(backoff * 2 ** attempt)
    if not part.exists():
        raise DownloadError(f"{url}: the server sent no data for {dest.name}")
    try:
        verify_file(part, size, md5, name=dest.name, progress=progress)
    except VerificationError as err:
        part.unlink()
        raise VerificationError(f"{err}; the partial file was deleted, run again to download it afresh") from None
    os.replace(part, dest)
    return transferred


# ---------------------------------------------------------------------------------------- extraction


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
        part = _part_path(present)
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
