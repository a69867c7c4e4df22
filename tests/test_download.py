from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from ad_models.data.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download_file,
    extract_archive,
)

PAYLOAD = {"top/a.txt": b"alpha\n", "top/sub/b.bin": bytes(range(256)) * 40}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_download_verifies_and_lands_atomically(http_server, tmp_path):
    data = PAYLOAD["top/sub/b.bin"]
    (http_server.root / "file.bin").write_bytes(data)
    dest = tmp_path / "cache" / "file.bin"
    assert download_file(f"{http_server.url}/file.bin", dest, sha256=_sha(data).upper(), progress=False) == dest
    assert dest.read_bytes() == data
    assert _leftovers(dest.parent) == []


def test_existing_file_with_matching_hash_is_not_downloaded_again(http_server, tmp_path):
    data = b"cached"
    (http_server.root / "f").write_bytes(data)
    dest = tmp_path / "f"
    download_file(f"{http_server.url}/f", dest, sha256=_sha(data), progress=False)
    download_file(f"{http_server.url}/f", dest, sha256=_sha(data), progress=False)
    download_file(f"{http_server.url}/f", dest, progress=False)  # no hash given: an existing file is kept
    assert http_server.requests == ["/f"]


def test_existing_file_with_wrong_hash_is_replaced(http_server, tmp_path):
    data = b"the real thing"
    (http_server.root / "f").write_bytes(data)
    dest = tmp_path / "f"
    dest.write_bytes(b"half a downl")
    download_file(f"{http_server.url}/f", dest, sha256=_sha(data), progress=False)
    assert dest.read_bytes() == data and http_server.requests == ["/f"]


def test_checksum_mismatch_names_url_and_both_hashes_and_leaves_nothing(http_server, tmp_path):
    data = b"tampered"
    (http_server.root / "f.zip").write_bytes(data)
    dest = tmp_path / "f.zip"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download_file(f"{http_server.url}/f.zip", dest, sha256=wrong, progress=False)
    message = str(info.value)
    assert f"{http_server.url}/f.zip" in message and wrong in message and _sha(data) in message
    assert list(tmp_path.iterdir()) == [http_server.root]  # neither dest nor a temp file


def test_http_error_names_url(http_server, tmp_path):
    with pytest.raises(DownloadError, match="/missing.zip"):
        download_file(f"{http_server.url}/missing.zip", tmp_path / "m.zip", progress=False)
    assert not (tmp_path / "m.zip").exists() and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="64 hex"):
        download_file(f"{http_server.url}/x", tmp_path / "x", sha256="abc", progress=False)


def test_connection_dropped_midway_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    class Short(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)  # then the connection closes

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="f.bin"):
            download_file(f"http://127.0.0.1:{server.server_address[1]}/f.bin", tmp_path / "f.bin", progress=False)
    finally:
        server.server_close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,mode", [("a.zip", None), ("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tar.xz", "w:xz")])
def test_download_then_extract_formats(http_server, tmp_path, name, mode):
    served = http_server.root / name
    _zip(served, PAYLOAD) if mode is None else _tar(served, list(PAYLOAD.items()), mode)
    archive = download_file(f"{http_server.url}/{name}", tmp_path / name, sha256=_sha(served.read_bytes()), progress=False)
    dest = tmp_path / "out"
    (dest / "stale").mkdir(parents=True)  # an older extraction is replaced whole
    assert extract_archive(archive, dest) == dest
    files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert files == PAYLOAD
    assert _leftovers(tmp_path) == []


def _malicious_archives(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (archive, the offending member)"""
    dev = tarfile.TarInfo("top/dev")
    dev.type = tarfile.CHRTYPE
    fifo = tarfile.TarInfo("top/fifo")
    fifo.type = tarfile.FIFOTYPE
    ok = ("top/ok.txt", b"fine")
    return {
        "zip-dotdot": (_zip(folder / "dotdot.zip", {"top/ok.txt": b"x", "top/../../escape.txt": b"pwned"}), "escape.txt"),
        "zip-absolute": (_zip(folder / "abs.zip", {"/tmp/abs-escape.txt": b"pwned"}), "abs-escape.txt"),
        "tar-dotdot": (_tar(folder / "dotdot.tar.gz", [ok, ("../escape.txt", b"pwned")], "w:gz"), "../escape.txt"),
        "tar-absolute": (_tar(folder / "abs.tar", [ok, ("/tmp/abs-escape.txt", b"pwned")]), "abs-escape.txt"),
        "tar-symlink-out": (_tar(folder / "sym.tar", [ok, _link("top/link", "../../outside")]), "top/link"),
        "tar-symlink-abs": (_tar(folder / "symabs.tar", [ok, _link("top/passwd", "/etc/passwd")]), "top/passwd"),
        "tar-hardlink-out": (_tar(folder / "hard.tar", [ok, _link("top/h", "../outside", tarfile.LNKTYPE)]), "top/h"),
        "tar-device": (_tar(folder / "dev.tar", [ok, dev]), "top/dev"),
        "tar-fifo": (_tar(folder / "fifo.tar", [ok, fifo]), "top/fifo"),
    }


@pytest.mark.parametrize("case", [
    "zip-dotdot", "zip-absolute", "tar-dotdot", "tar-absolute", "tar-symlink-out", "tar-symlink-abs",
    "tar-hardlink-out", "tar-device", "tar-fifo",
])
def test_malicious_members_are_refused(http_server, tmp_path, case):
    served, member = _malicious_archives(http_server.root)[case]
    archive = download_file(f"{http_server.url}/{served.name}", tmp_path / "dl" / served.name, progress=False)
    dest = tmp_path / "x" / "out"
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive, dest)
    assert str(archive) in str(info.value) and member in str(info.value)
    assert not dest.exists() and _leftovers(dest.parent) == []
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "x" / "escape.txt").exists()


def test_symlink_inside_the_archive_is_allowed(tmp_path):
    archive = _tar(tmp_path / "ok.tar", [("top/a.txt", b"alpha"), _link("top/alias", "a.txt")])
    dest = extract_archive(archive, tmp_path / "out")
    assert (dest / "top" / "alias").is_symlink() and (dest / "top" / "alias").read_bytes() == b"alpha"


def test_truncated_archive_leaves_no_half_extraction(tmp_path):
    full = _tar(tmp_path / "full.tar.gz", [(f"top/{i}.bin", bytes(5000)) for i in range(20)], "w:gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full[: len(full) // 2])
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match="cut.tar.gz"):
        extract_archive(cut, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_unsupported_archive_type(tmp_path):
    rar = tmp_path / "a.rar"
    rar.write_bytes(b"Rar!")
    with pytest.raises(ValueError, match="unsupported"):
        extract_archive(rar, tmp_path / "out")
