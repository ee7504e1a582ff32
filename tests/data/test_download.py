"""COCO download against a local HTTP server (127.0.0.1, started here): fresh download → reader-ready
layout; a second run sends no request; a dropped connection resumes with Range and ends byte-identical;
corrupt / truncated files are caught with no complete-looking tree left; server down → one-line CLI
error, non-zero status; files brought by hand need no network."""

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from influencerformer.data import COCOInstanceDataset, find_coco_files
from influencerformer.cli import main
from influencerformer.data import download as dl

VAL_ZIP, ANN_ZIP = "/zips/val2017.zip", "/annotations/annotations_trainval2017.zip"


# ------------------------------------------------------------------------------------ fixtures


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _coco_json(split: str) -> dict:
    return {"images": [{"id": 1, "file_name": "000000000001.jpg", "height": 64, "width": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 18, "iscrowd": 0,
                             "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]]}],
            "categories": [{"id": 18, "name": "dog"}], "info": {"split": split}}


def _zip(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored: the size stays ~ the payload
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def payloads():
    val = _zip({"val2017/000000000001.jpg": _jpeg(0),
                "val2017/padding.bin": np.random.default_rng(1).bytes(300_000)})  # room to cut mid-file
    ann = _zip({f"annotations/instances_{s}.json": json.dumps(_coco_json(s)) for s in ("train2017", "val2017")})
    return {VAL_ZIP: val, ANN_ZIP: ann}


@pytest.fixture
def manifest(monkeypatch, payloads):
    """The test archives' sizes and md5s in place of the real COCO table."""
    def archive(key, path, required):
        data = payloads[path]
        return dl.Archive(path.rsplit("/", 1)[1], path[1:], len(data), hashlib.md5(data).hexdigest(), required)
    table = {"val2017": archive("val2017", VAL_ZIP, ("val2017",)),
             "annotations": archive("annotations", ANN_ZIP, dl.COCO_ARCHIVES["annotations"].required)}
    monkeypatch.setattr(dl, "COCO_ARCHIVES", {**dl.COCO_ARCHIVES, **table})
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    return table


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, match = 0, re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.drop.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:  # announce the whole body, send part of it, hang up
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(payloads):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.log, httpd.drop, httpd.ranges = dict(payloads), [], {}, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _dead_url() -> str:
    """A 127.0.0.1 URL on a port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


FAST = {"timeout": 5.0, "retries": 0, "progress": False}


def _leftovers(root):
    return sorted(p.name for p in root.rglob("*") if p.name.endswith((".part", ".extracting", ".tmp")))


# -------------------------------------------------------------------------------------- tests


def test_fresh_download_is_reader_ready_and_a_second_run_sends_no_request(tmp_path, server, manifest, payloads,
                                                                          monkeypatch):
    monkeypatch.setenv(dl.MIRROR_ENV, server.url + "/")  # the env var is the mirror when --mirror is absent
    results = dl.download_coco(tmp_path, splits=["val2017"], timeout=5.0, retries=0, progress=True)
    assert [r["status"] for r in results] == ["downloaded and extracted"] * 2
    assert sum(r["bytes"] for r in results) == sum(len(p) for p in payloads.values())
    assert sorted(path for path, _ in server.log) == sorted([VAL_ZIP, ANN_ZIP])
    image_dir, ann_file = find_coco_files(tmp_path, "val2017")
    assert (image_dir, ann_file) == (tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json")
    item = COCOInstanceDataset(image_dir, ann_file)[0]
    assert item["image"].shape == (3, 64, 80) and item["masks"].shape[0] == 1
    assert (tmp_path / "val2017.zip").read_bytes() == payloads[VAL_ZIP]  # archives kept by default
    assert _leftovers(tmp_path) == []

    again = dl.download_coco(tmp_path, splits=["val2017"], **FAST)
    assert [r["status"] for r in again] == ["already extracted"] * 2 and len(server.log) == 2


def test_dropped_connection_resumes_from_the_part_file_with_a_range_request(tmp_path, server, payloads):
    data = payloads[VAL_ZIP]
    server.drop[VAL_ZIP] = 100_000
    dest = tmp_path / "val2017.zip"
    with pytest.raises(dl.DownloadError, match=r"closed after 100000 of \d+ bytes.*run again to resume"):
        dl.fetch(server.url + VAL_ZIP, dest, size=len(data), md5=hashlib.md5(data).hexdigest(), **FAST)
    part = tmp_path / "val2017.zip.part"
    assert part.stat().st_size == 100_000 and not dest.exists()

    transferred = dl.fetch(server.url + VAL_ZIP, dest, size=len(data), md5=hashlib.md5(data).hexdigest(), **FAST)
    assert server.log == [(VAL_ZIP, None), (VAL_ZIP, "bytes=100000-")]
    assert transferred == len(data) - 100_000
    assert dest.read_bytes() == data and not part.exists()


def test_one_call_retries_a_dropped_connection_by_itself(tmp_path, server, payloads):
    server.drop[VAL_ZIP] = 50_000
    dl.fetch(server.url + VAL_ZIP, tmp_path / "again.zip", size=len(payloads[VAL_ZIP]), retries=2, backoff=0,
             progress=False, timeout=5.0)
    ranges = [r for path, r in server.log if path == VAL_ZIP]
    assert ranges[:2] == [None, "bytes=50000-"]
    assert (tmp_path / "again.zip").read_bytes() == payloads[VAL_ZIP]


def test_a_server_ignoring_range_restarts_the_file_from_byte_zero(tmp_path, server, payloads):
    server.ranges = False
    (tmp_path / "val2017.zip.part").write_bytes(b"stale bytes of another attempt")
    dl.fetch(server.url + VAL_ZIP, tmp_path / "val2017.zip", size=len(payloads[VAL_ZIP]), **FAST)
    assert (tmp_path / "val2017.zip").read_bytes() == payloads[VAL_ZIP]


def test_a_corrupted_file_is_rejected_and_leaves_no_complete_looking_tree(tmp_path, server, manifest, payloads):
    bad = bytearray(payloads[VAL_ZIP])
    bad[len(bad) // 2] ^= 0xFF  # same size, one byte flipped
    server.files[VAL_ZIP] = bytes(bad)
    with pytest.raises(dl.VerificationError) as err:
        dl.download_coco(tmp_path, mirror=server.url, **FAST)
    message = str(err.value)
    assert "val2017.zip" in message and manifest["val2017"].md5 in message and hashlib.md5(bad).hexdigest() in message
    assert not (tmp_path / "val2017").exists() and not (tmp_path / "val2017.zip").exists()
    assert _leftovers(tmp_path) == [] and not dl.is_extracted(tmp_path, manifest["val2017"])
    with pytest.raises(FileNotFoundError):
        find_coco_files(tmp_path, "val2017")


def test_a_truncated_file_names_expected_and_served_sizes(tmp_path, server, manifest, payloads):
    server.files[VAL_ZIP] = payloads[VAL_ZIP][:-1000]
    size = len(payloads[VAL_ZIP])
    with pytest.raises(dl.VerificationError, match=rf"val2017\.zip of {size} bytes.* {size - 1000} bytes"):
        dl.download_coco(tmp_path, mirror=server.url, **FAST)
    assert not (tmp_path / "val2017").exists() and _leftovers(tmp_path) == []


def test_an_archive_without_the_expected_folder_is_not_installed(tmp_path, manifest):
    wrong = _zip({"images/000000000001.jpg": b"x"})
    (tmp_path / "val2017.zip").write_bytes(wrong)
    with pytest.raises(dl.VerificationError, match=r"val2017\.zip: expected the archive to contain val2017"):
        dl.extract(tmp_path / "val2017.zip", tmp_path, ("val2017",), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2017.zip"]


def test_an_interrupted_extraction_is_redone_without_the_network(tmp_path, server, manifest, monkeypatch):
    calls = []
    real_extract = zipfile.ZipFile.extract

    def dying_extract(self, member, path=None, pwd=None):
        calls.append(member)
        if getattr(member, "filename", member).startswith("val2017/") and len(calls) > 3:
            raise KeyboardInterrupt  # killed inside val2017.zip, one image out (the annotations are done)
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", dying_extract)
    with pytest.raises(KeyboardInterrupt):
        dl.download_coco(tmp_path, mirror=server.url, **FAST)
    assert not (tmp_path / "val2017").exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    requests = len(server.log)
    results = dl.download_coco(tmp_path, mirror=server.url, **FAST)
    assert [r["status"] for r in results] == ["already extracted", "verified the present archive and extracted it"]
    assert len(server.log) == requests and find_coco_files(tmp_path, "val2017")


def test_archives_brought_by_hand_need_no_network_and_can_be_deleted(tmp_path, manifest, payloads):
    (tmp_path / "val2017.zip").write_bytes(payloads[VAL_ZIP])
    (tmp_path / "annotations_trainval2017.zip").write_bytes(payloads[ANN_ZIP])
    results = dl.download_coco(tmp_path, mirror=_dead_url(), keep_archives=False, **FAST)
    assert all(r["bytes"] == 0 for r in results)
    assert not list(tmp_path.glob("*.zip")) and find_coco_files(tmp_path, "val2017")


def test_http_404_fails_at_once_with_the_url(tmp_path, server):
    with pytest.raises(dl.DownloadError, match=r"/zips/nothing\.zip: HTTP 404"):
        dl.fetch(server.url + "/zips/nothing.zip", tmp_path / "nothing.zip", timeout=5.0, retries=3, progress=False)
    assert len(server.log) == 1


def _cli(argv):
    return main(argv)


def test_cli_server_down_prints_one_line_and_exits_non_zero(tmp_path, capsys, manifest):
    url = _dead_url()
    status = _cli(["download", "coco", "--root", str(tmp_path), "--mirror", url, "--retries", "0", "--timeout", "5",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("influencerformer download coco: error: ") and url in err and "cannot reach" in err
    assert not (tmp_path / "annotations").exists()


def test_cli_download_reports_each_archive(tmp_path, capsys, server, manifest):
    assert _cli(["download", "coco", "--root", str(tmp_path), "--mirror", server.url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "val2017.zip: downloaded and extracted" in out and "COCO ready" in out


def test_cli_bad_mirror_and_full_disk_are_user_errors(tmp_path, capsys, manifest, monkeypatch):
    assert _cli(["download", "coco", "--root", str(tmp_path), "--mirror", "ftp://x", "--no-progress"]) == 2
    assert "expected an http:// or https:// URL" in capsys.readouterr().err
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert _cli(["download", "coco", "--root", str(tmp_path), "--mirror", _dead_url(), "--no-progress"]) == 1
    assert "free" in capsys.readouterr().err


def test_the_real_coco_table_and_default_host(monkeypatch):
    for key in ("train2017", "val2017", "annotations"):
        archive = dl.COCO_ARCHIVES[key]
        assert archive.size > 0 and re.fullmatch(r"[0-9a-f]{32}", archive.md5) and archive.required
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    assert dl.coco_base_url() == "http://images.cocodataset.org"
    assert dl.coco_base_url("https://mirror.example/coco/") == "https://mirror.example/coco"


@pytest.mark.parametrize("extra, words", [
    (["--retries", "-1"], "retries must be an integer ≥ 0"),
    (["--timeout", "-5"], "timeout must be a finite number of seconds > 0, got -5.0"),
    (["--timeout", "nan"], "timeout must be a finite number"),
])
def test_cli_bad_retries_and_timeout_are_one_line_before_any_request(tmp_path, capsys, extra, words):
    status = _cli(["download", "coco", "--root", str(tmp_path / "coco"), "--mirror", _dead_url(), "--no-progress",
                   *extra])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "coco").exists()  # nothing made before the arguments were checked


def test_cli_root_that_is_a_file_is_one_line_before_any_request(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for root in (tmp_path / "file", tmp_path / "file" / "coco"):
        assert _cli(["download", "coco", "--root", str(root), "--mirror", _dead_url(), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "mine"
