from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from ad_models.data import download
from ad_models.data.download import (
    ChecksumError,
    DownloadError,
    RawArchive,
    UnsafeArchiveError,
    archive_stem,
    download_file,
    extract_archive,
    fetch_extracted,
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


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


BIG = bytes(range(256)) * 400  # 100 KiB: several reads, cut in the middle


def test_download_cut_off_halfway_keeps_the_part_and_resumes(http_server, tmp_path):
    (http_server.root / "big.bin").write_bytes(BIG)
    url, dest = f"{http_server.url}/big.bin", tmp_path / "big.bin"
    http_server.cut["/big.bin"] = 40_000
    with pytest.raises(DownloadError, match=r"big\.bin.*interrupted at byte 40000 of 102400.*keeps 40000 bytes"):
        download_file(url, dest, sha256=_sha(BIG), progress=False)
    assert not dest.exists() and (tmp_path / "big.bin.part").read_bytes() == BIG[:40_000]

    assert download_file(url, dest, sha256=_sha(BIG), progress=False) == dest
    assert dest.read_bytes() == BIG and not (tmp_path / "big.bin.part").exists()
    assert "Range" not in http_server.headers[0] and http_server.headers[1]["Range"] == "bytes=40000-"
    assert _leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    (http_server.root / "big.bin").write_bytes(BIG)
    url, dest = f"{http_server.url}/big.bin", tmp_path / "big.bin"
    http_server.ranges = False
    http_server.cut["/big.bin"] = 30_000
    with pytest.raises(DownloadError, match="keeps 30000 bytes"):
        download_file(url, dest, sha256=_sha(BIG), progress=False)
    download_file(url, dest, sha256=_sha(BIG), progress=False)  # asks for a range, gets 200 + everything
    assert http_server.headers[1]["Range"] == "bytes=30000-"
    assert dest.read_bytes() == BIG  # not the first 30000 bytes twice


def test_unsatisfiable_range_uses_a_whole_part_or_starts_again(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(BIG)
    url, dest, part = f"{http_server.url}/f.bin", tmp_path / "f.bin", tmp_path / "f.bin.part"
    part.write_bytes(BIG)  # the last attempt received everything but stopped before the rename
    download_file(url, dest, sha256=_sha(BIG), progress=False)
    assert dest.read_bytes() == BIG and http_server.requests == ["/f.bin"]  # answered 416, nothing re-sent

    dest.unlink()
    part.write_bytes(BIG + b"junk")  # longer than the file: cannot be a prefix of it
    download_file(url, dest, sha256=_sha(BIG), progress=False)
    assert dest.read_bytes() == BIG and http_server.requests == ["/f.bin"] * 3
    assert "Range" not in http_server.headers[2]


def test_resumed_download_is_verified_over_the_whole_file(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(BIG)
    part = tmp_path / "f.bin.part"
    part.write_bytes(b"X" * 1000)  # a stale partial file from some other version of the file
    with pytest.raises(ChecksumError, match=_sha(BIG)):
        download_file(f"{http_server.url}/f.bin", tmp_path / "f.bin", sha256=_sha(BIG), progress=False)
    assert http_server.headers[0]["Range"] == "bytes=1000-"
    assert list(tmp_path.iterdir()) == [http_server.root]  # the mixed file is gone, nothing at dest


def test_md5_is_used_when_no_sha256_is_published(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(BIG)
    url, dest = f"{http_server.url}/f.bin", tmp_path / "f.bin"
    with pytest.raises(ChecksumError) as info:
        download_file(url, dest, md5="0" * 32, progress=False)
    assert "md5" in str(info.value) and _md5(BIG) in str(info.value) and not dest.exists()
    assert download_file(url, dest, md5=_md5(BIG).upper(), progress=False).read_bytes() == BIG
    with pytest.raises(ValueError, match="md5 must be 32 hex"):
        download_file(url, dest, md5="0" * 64, progress=False)


def test_existing_dest_with_wrong_md5_is_not_trusted(http_server, tmp_path, caplog):
    (http_server.root / "f.bin").write_bytes(BIG)
    dest = tmp_path / "f.bin"
    dest.write_bytes(BIG[:-1] + b"!")  # same size, one byte off
    with caplog.at_level(logging.WARNING, logger=download.__name__):
        download_file(f"{http_server.url}/f.bin", dest, md5=_md5(BIG), progress=False)
    assert dest.read_bytes() == BIG and "does not match" in caplog.text and str(dest) in caplog.text


def test_concurrent_downloads_of_one_file_fetch_it_once(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(BIG)
    dest, errors = tmp_path / "f.bin", []

    def fetch():
        try:
            download_file(f"{http_server.url}/f.bin", dest, sha256=_sha(BIG), progress=False)
        except Exception as e:  # reported below: an exception in a thread would pass unnoticed
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and dest.read_bytes() == BIG and http_server.requests == ["/f.bin"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name,mode", [
    ("a.zip", None), ("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tgz", "w:gz"), ("a.tar.xz", "w:xz"), ("a.tar.bz2", "w:bz2"),
])
def test_download_then_extract_formats(http_server, tmp_path, name, mode):
    served = http_server.root / name
    _zip(served, PAYLOAD) if mode is None else _tar(served, list(PAYLOAD.items()), mode)
    archive = download_file(f"{http_server.url}/{name}", tmp_path / name, sha256=_sha(served.read_bytes()), progress=False)
    dest = tmp_path / "out"
    (dest / "stale").mkdir(parents=True)  # an older extraction is replaced whole
    assert extract_archive(archive, dest) == dest
    files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert files == PAYLOAD
    assert _leftovers(tmp_path) == [] and not (tmp_path / f"{name}.part").exists()


def _zip_symlink(path: Path, name: str, target: str) -> Path:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # how zip tools mark a symlink; the target is the content
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/ok.txt", b"fine")
        zf.writestr(info, target)
    return path


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
        # each link looks harmless on its own: l1 is the archive root, l2 is "top" by its text but
        # the parent of the root once l1 exists, and evil would be written through it
        "tar-symlink-chain": (_tar(folder / "chain.tar", [
            ok, _link("top/l1", ".."), _link("top/l2", "l1/.."), ("top/l2/evil.txt", b"pwned")]), "top/l2"),
        "zip-symlink-out": (_zip_symlink(folder / "symout.zip", "top/link", "../../outside"), "top/link"),
    }


@pytest.mark.parametrize("case", [
    "zip-dotdot", "zip-absolute", "tar-dotdot", "tar-absolute", "tar-symlink-out", "tar-symlink-abs",
    "tar-hardlink-out", "tar-device", "tar-fifo", "tar-symlink-chain", "zip-symlink-out",
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
    assert not (tmp_path / "out").exists()


def test_archive_stem():
    assert archive_stem("VisA_20220922.tar") == "VisA_20220922"
    assert archive_stem("mvtec_anomaly_detection.tar.xz") == "mvtec_anomaly_detection"
    assert archive_stem(Path("raw/DAGM.Class1.ZIP")) == "DAGM.Class1"
    assert archive_stem("a.tgz") == "a" and archive_stem("a.tar.bz2") == "a"
    with pytest.raises(ValueError, match="unsupported"):
        archive_stem("notes.txt")


def test_raw_archive_is_validated(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        RawArchive("http://x/a.zip", "sub/a.zip")
    with pytest.raises(ValueError, match="sha256 must be 64 hex"):
        RawArchive("http://x/a.zip", "a.zip", sha256="abc")
    with pytest.raises(ValueError, match="a.rar: unsupported"):  # before anything is downloaded
        fetch_extracted(RawArchive("http://x/a.rar", "a.rar"), tmp_path)
    assert fetch_extracted(RawArchive("", "local"), tmp_path, source_dir=tmp_path) == tmp_path  # a label only


# -- fetch_extracted -------------------------------------------------------------------------------

DATASET = {"dataset/bottle/train/good/000.png": b"png" * 100, "dataset/bottle/license.txt": b"CC BY-NC-SA"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".adpipe-archive.json"}


@pytest.fixture
def served_dataset(http_server) -> RawArchive:
    archive = _tar(http_server.root / "data_v1.tar.gz", list(DATASET.items()), "w:gz")
    return RawArchive(f"{http_server.url}/data_v1.tar.gz", "data_v1.tar.gz", sha256=_sha(archive.read_bytes()))


def test_fetch_extracted_downloads_once_and_reuses_the_folder(http_server, served_dataset, tmp_path):
    raw_dir = tmp_path / "raw"
    folder = fetch_extracted(served_dataset, raw_dir, progress=False)
    assert folder == raw_dir / "data_v1" and _files(folder) == DATASET
    assert sorted(p.name for p in raw_dir.iterdir()) == ["data_v1", "data_v1.tar.gz"]

    assert fetch_extracted(served_dataset, raw_dir, progress=False) == folder
    (raw_dir / "data_v1.tar.gz").unlink()  # the marker alone proves the folder, so the archive may go
    assert fetch_extracted(served_dataset, raw_dir, progress=False) == folder
    assert http_server.requests == ["/data_v1.tar.gz"]


def test_fetch_extracted_replaces_a_folder_from_another_archive(http_server, served_dataset, tmp_path):
    raw_dir = tmp_path / "raw"
    fetch_extracted(served_dataset, raw_dir, progress=False)
    newer = {"dataset/bottle/train/good/001.png": b"new"}
    archive = _tar(http_server.root / "data_v1.tar.gz", list(newer.items()), "w:gz")
    (raw_dir / "data_v1.tar.gz").unlink()
    republished = RawArchive(served_dataset.url, served_dataset.filename, sha256=_sha(archive.read_bytes()))
    assert _files(fetch_extracted(republished, raw_dir, progress=False)) == newer


def test_fetch_extracted_without_a_hash_tracks_the_archive_itself(http_server, tmp_path):
    archive = _zip(http_server.root / "d.zip", DATASET)
    raw = RawArchive(f"{http_server.url}/d.zip", "d.zip")
    raw_dir = tmp_path / "raw"
    folder = fetch_extracted(raw, raw_dir, progress=False)
    assert fetch_extracted(raw, raw_dir, progress=False) == folder and _files(folder) == DATASET
    assert http_server.requests == ["/d.zip"]  # the archive is trusted, hashed and matches the marker

    _zip(raw_dir / "d.zip", {"other.txt": b"changed"})  # the user swapped the archive
    assert _files(fetch_extracted(raw, raw_dir, progress=False)) == {"other.txt": b"changed"}
    assert http_server.requests == ["/d.zip"] and archive.exists()


def test_fetch_extracted_from_the_users_folder_or_archive(http_server, served_dataset, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    assert fetch_extracted(served_dataset, tmp_path / "raw", source_dir=mine) == mine
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fetch_extracted(served_dataset, tmp_path / "raw", source_dir=tmp_path / "nowhere")

    copy = tmp_path / "downloads" / "my-copy.tar.gz"  # any name: the folder is named after raw.filename
    copy.parent.mkdir()
    copy.write_bytes((http_server.root / "data_v1.tar.gz").read_bytes())
    folder = fetch_extracted(served_dataset, tmp_path / "raw", archive=copy, progress=False)
    assert folder == tmp_path / "raw" / "data_v1" and _files(folder) == DATASET
    assert http_server.requests == [] and sorted(p.name for p in folder.parent.iterdir()) == ["data_v1"]


def test_fetch_extracted_refuses_a_users_archive_with_the_wrong_hash(served_dataset, tmp_path):
    copy = _tar(tmp_path / "data_v1.tar.gz", [("evil.txt", b"not the dataset")], "w:gz")
    with pytest.raises(ChecksumError) as info:
        fetch_extracted(served_dataset, tmp_path / "raw", archive=copy, progress=False)
    message = str(info.value)
    assert str(copy) in message and served_dataset.sha256 in message and _sha(copy.read_bytes()) in message
    assert copy.exists() and not (tmp_path / "raw" / "data_v1").exists()  # the user's file is left alone
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        fetch_extracted(served_dataset, tmp_path / "raw", archive=tmp_path / "missing.tar.gz")
    with pytest.raises(ValueError, match="no URL"):
        fetch_extracted(RawArchive("", "dagm.zip"), tmp_path / "raw")


def test_interrupted_extraction_never_looks_finished(http_server, served_dataset, tmp_path, monkeypatch):
    raw_dir = tmp_path / "raw"

    def extract_then_die(archive, folder):  # everything written, then the process is stopped
        download._extract_tar(archive, folder)
        raise KeyboardInterrupt

    monkeypatch.setitem(download._EXTRACTORS, ".tar.gz", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch_extracted(served_dataset, raw_dir, progress=False)
    assert sorted(p.name for p in raw_dir.iterdir()) == ["data_v1.tar.gz"]  # no folder, no temporaries

    killed = raw_dir / ".data_v1.k1ll3d_x.tmp"  # what a SIGKILL mid-extraction leaves
    (killed / "dataset").mkdir(parents=True)
    monkeypatch.undo()
    assert _files(fetch_extracted(served_dataset, raw_dir, progress=False)) == DATASET
    assert not killed.exists() and http_server.requests == ["/data_v1.tar.gz"]


@pytest.mark.parametrize("tar_filter", [download._TAR_FILTER, {}], ids=["data-filter", "no-filter"])
def test_chained_links_pointing_out_are_refused_with_or_without_tarfiles_filter(tmp_path, monkeypatch, tar_filter):
    monkeypatch.setattr(download, "_TAR_FILTER", tar_filter)  # {}: Python < 3.10.12 / 3.11.4
    archive = _tar(tmp_path / "chain.tar", [("top/ok.txt", b"fine"), _link("top/l1", ".."), _link("top/l2", "l1/..")])
    with pytest.raises(UnsafeArchiveError, match="top/l2"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
