"""Checksum-verified atomic downloads and safe archive extraction.

A download streams into a temporary file beside its destination and is renamed into place only
once complete and verified, so a half download never looks finished; an existing file is reused
only when it matches the expected hash. Extraction refuses members that would land outside the
destination (absolute paths, `..`, links pointing out, devices) and also goes through a
temporary folder.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import re
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from ad_models import __version__
from ad_models.io import atomic_dir, atomic_path

_CHUNK = 1 << 20
_USER_AGENT = f"adpipe/{__version__}"  # some hosts refuse Python's default agent
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


class DownloadError(RuntimeError):
    """A download that failed or whose content is not what was expected."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256."""


class UnsafeArchiveError(ValueError):
    """An archive member that would be written outside the extraction folder."""


def sha256sum(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Path:
    """Download `url` to `dest` atomically; verify `sha256` when given. An existing `dest` is
    returned untouched when its hash matches (or when no hash is given)."""
    dest = Path(dest)
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if dest.is_file() and (expected is None or sha256sum(dest) == expected):
        return dest

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with atomic_path(dest) as tmp:  # removes the temp file on any error, checksum mismatch included
        digest = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as f:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=dest.name, disable=not progress) as bar:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise DownloadError(f"cannot download {url}: {e}") from e
        if total is not None and received != total:
            raise DownloadError(f"download of {url} ended early: got {received} of {total} bytes")
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumError(f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}")
    return dest


def _check_member_name(name: str, archive: Path) -> None:
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: absolute path or '..' component")


def _check_link(name: str, target: str, relative_to_member: bool, archive: Path) -> None:
    # symlink targets are relative to the link's folder, hardlink targets to the archive root
    if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: link to absolute path {target!r}")
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: link {target!r} points outside")


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member_name(info.filename, archive)
            if _is_zip_symlink(info):
                _check_link(info.filename, zf.read(info).decode("utf-8", "replace"), True, archive)
        zf.extractall(dest)  # zipfile writes symlinks as small files holding the target


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            _check_member_name(m.name, archive)
            if m.isdev():
                raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: device file or fifo")
            if m.issym() or m.islnk():
                _check_link(m.name, m.linkname, m.issym(), archive)
        tf.extractall(dest, members=members, filter="data")  # a second, independent line of defence


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a .zip / .tar / .tar.gz / .tar.xz archive so that `dest` holds its contents;
    `dest` appears only once extraction is complete (it replaces an existing `dest` whole)."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    name = archive.name.lower()
    if name.endswith(".zip"):
        extract = _extract_zip
    elif name.endswith(_TAR_SUFFIXES):
        extract = _extract_tar
    else:
        raise ValueError(f"{archive}: unsupported archive type; expected .zip or one of {_TAR_SUFFIXES}")
    with atomic_dir(dest) as tmp:
        try:
            extract(archive, tmp)
        except tarfile.FilterError as e:
            raise UnsafeArchiveError(f"{archive}: refusing member: {e}") from e
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
            raise DownloadError(f"{archive} is corrupt or truncated: {e}") from e
    return dest
