"""Fetch one file over HTTP: resumable across attempts and runs, verified (size, md5), renamed when complete.

``fetch(url, dest)`` writes ``dest.part`` (:func:`part_path`); a later attempt or run resumes it with an HTTP
``Range`` request (a server that ignores Range answers 200 and the file restarts from byte 0). A size or md5
mismatch deletes the ``.part`` (resuming a corrupt file would only corrupt it further) and raises
:class:`VerificationError`; a complete, verified ``.part`` is renamed to ``dest``, so a file without ``.part`` is
always complete and verified (or was brought by the user, and is verified before use).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .setup_errors import DownloadError, VerificationError

_CHUNK = 1 << 20
_USER_AGENT = "influencerformer-download/1"


class _Retryable(Exception):
    """A transient transfer failure: worth another (resumed) attempt."""


def part_path(dest: Path) -> Path:
    """Where ``dest`` is written until it is complete and verified: ``dest.part``."""
    return dest.with_name(dest.name + ".part")


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
    part = part_path(dest)
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
