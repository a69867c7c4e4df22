"""Resumable, checksum-verified, atomic downloads and safe archive extraction.

A download streams into `<dest>.part`, which survives an interruption so that the next call resumes
it with an HTTP Range request; it is renamed onto `dest` only once complete and verified, so a half
or wrong download never looks finished. Extraction refuses members that would land outside the
destination (absolute paths, `..`, links pointing out, devices) and goes through a temporary
folder. `fetch_extracted` combines both for the dataset sources, and lets a user who already has the
archive or the extracted folder skip the download.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from ad_models import __version__
from ad_models.io import atomic_dir, read_json, write_json

try:
    import fcntl
except ImportError:  # Windows: no flock, so concurrent runs on one raw folder are not serialised
    fcntl = None

__all__ = [
    "fetch_source",
    "raw_folder",
    "resolve_archive",
    "ChecksumError",
    "DownloadError",
    "RawArchive",
    "UnsafeArchiveError",
    "archive_stem",
    "download_file",
    "extract_archive",
    "fetch_extracted",
    "sha256sum",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = f"adpipe/{__version__}"  # some hosts refuse Python's default agent
_HASH_DIGITS = {"sha256": 64, "md5": 32}
_MARKER = ".adpipe-archive.json"  # inside an extracted folder: which archive (by hash) it came from
# tarfile's own "data" filter (Python >= 3.10.12 / 3.11.4) resolves real paths while extracting: a
# second, independent line of defence behind our explicit checks
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class DownloadError(RuntimeError):
    """A download that failed or whose content is not what was expected."""


class ChecksumError(DownloadError):
    """A file whose sha256 (or md5) is not the published one."""


class UnsafeArchiveError(ValueError):
    """An archive member that would be written outside the extraction folder, or a device file."""


@dataclass(frozen=True)
class RawArchive:
    """Where a dataset's archive comes from and its published hash (sha256 preferred, else md5)."""

    url: str
    filename: str  # name of the archive file under raw_dir
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self):
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValueError(f"RawArchive.filename must be a plain file name, got {self.filename!r}")
        _expected_hash(self.sha256, self.md5)


# -- hashing and locking ----------------------------------------------------------------------------

def _expected_hash(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    """(algorithm, lower-case hex digest) to verify against: sha256 when given, else md5, else None."""
    given = []
    for algo, value in (("sha256", sha256), ("md5", md5)):
        if value:
            digest = value.strip().lower()
            digits = _HASH_DIGITS[algo]
            if not re.fullmatch(f"[0-9a-f]{{{digits}}}", digest):
                raise ValueError(f"{algo} must be {digits} hex digits, got {value!r}")
            given.append((algo, digest))
    return given[0] if given else None


def _file_hash(path: Path, algo: str, progress: bool = False) -> str:
    digest = hashlib.new(algo, usedforsecurity=False)  # integrity, not security: md5 must work under FIPS
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"verifying {path.name}", disable=not progress, leave=False) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def sha256sum(path: str | os.PathLike) -> str:
    return _file_hash(Path(path), "sha256")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on `path` (a hidden `.<name>.lock` beside it, removed
    afterwards), so that two runs, e.g. two Dagster partitions of one dataset, never write the same
    download or extraction at once."""
    if fcntl is None:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(lock), os.fstat(fd)):
                break
        os.close(fd)  # the previous holder removed this lock file after we opened it: lock the new one
    try:
        yield
    finally:
        os.unlink(lock)  # before unlocking, so that a waiter can tell that the file it locks is stale
        os.close(fd)


# -- download ---------------------------------------------------------------------------------------

def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
                  *, md5: str | None = None) -> Path:
    """Download `url` to `dest`, resuming an interrupted attempt; verify sha256 (else md5) when given.

    An existing `dest` is re-verified on every call when a hash is known: one that does not match is
    deleted, with a warning, and downloaded again. Without a hash an existing `dest` is kept as is.
    Raises DownloadError (the `.part` file is kept for resuming) or ChecksumError (it is deleted)."""
    dest = Path(dest)
    expected = _expected_hash(sha256, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _locked(dest):
        if dest.is_file():
            if expected is None:
                return dest
            actual = _file_hash(dest, expected[0], progress)
            if actual == expected[1]:
                return dest
            log.warning("%s does not match its published %s %s (it has %s): deleting it and downloading "
                        "it again from %s", dest, expected[0], expected[1], actual, url)
            dest.unlink()
        _download(url, part, dest.name, progress)
        if expected is not None:
            actual = _file_hash(part, expected[0], progress)
            if actual != expected[1]:
                part.unlink()
                raise ChecksumError(f"checksum mismatch for {url}: expected {expected[0]} {expected[1]}, "
                                    f"got {actual}; the download was deleted")
        os.replace(part, dest)
    return dest


def _request(url: str, offset: int):
    # identity encoding: Range offsets must count the file's own bytes, not a compressed stream's
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) of a Content-Range header; None for what it does not say."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _download(url: str, part: Path, name: str, progress: bool) -> None:
    """Bring `part` to the full content of `url`, resuming from its current size."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        response = _request(url, offset)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # nothing to send from `offset` on
            if _content_range(e.headers.get("Content-Range"))[1] == offset:
                return  # the partial file is already whole; the caller verifies it
            log.warning("%s: the server cannot resume %s at byte %d; starting again", url, part, offset)
            part.unlink()
            return _download(url, part, name, progress)
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(f"cannot download {url}: {e}") from e

    with response:
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                raise DownloadError(f"{url}: asked to resume at byte {offset}, the server answered with "
                                    f"Content-Range {response.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the server ignores Range and sends the whole file, so start again from zero
            if offset:
                log.info("%s ignores Range requests: downloading %s from the start", url, name)
            length = response.headers.get("Content-Length")
            offset, mode, total = 0, "wb", int(length) if length and length.isdigit() else None
        received = offset
        try:
            with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=name, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the rename makes them official
        except (http.client.HTTPException, OSError) as e:
            raise _interrupted(url, part, received, total, e) from e
    if total is not None and received < total:
        raise _interrupted(url, part, received, total, "connection closed")


def _interrupted(url: str, part: Path, received: int, total: int | None, why) -> DownloadError:
    kept = part.stat().st_size if part.is_file() else 0
    return DownloadError(f"download of {url} was interrupted at byte {received} of {total or 'unknown'} "
                         f"({why}); {part} keeps {kept} bytes and the next call resumes from there")


# -- extraction -------------------------------------------------------------------------------------

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


def _checked_tar_members(tf: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    symlinks: set[str] = set()
    for m in tf:  # one pass: a compressed archive is decompressed once, not once to check and once to extract
        _check_member_name(m.name, archive)
        if m.isdev():
            raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: device file or fifo")
        name = posixpath.normpath(m.name)
        # writing through a link could land anywhere its (possibly chained) target leads
        parent = posixpath.dirname(name)
        while parent:
            if parent in symlinks:
                raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: its path goes through "
                                         f"the symlink {parent!r}")
            parent = posixpath.dirname(parent)
        if m.issym() or m.islnk():
            _check_link(m.name, m.linkname, m.issym(), archive)
        if m.issym():
            symlinks.add(name)
        yield m


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        tf.extractall(dest, members=_checked_tar_members(tf, archive), **_TAR_FILTER)


_EXTRACTORS: dict[str, Callable[[Path, Path], None]] = {
    ".zip": _extract_zip,
    **dict.fromkeys((".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2"), _extract_tar),
}


def _archive_suffix(name: str) -> str:
    for suffix in _EXTRACTORS:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ValueError(f"{name}: unsupported archive type; expected one of {', '.join(_EXTRACTORS)}")


def archive_stem(filename: str | os.PathLike) -> str:
    """The archive's name without its archive suffix: `VisA_20220922.tar` -> `VisA_20220922`."""
    name = Path(filename).name
    return name[: -len(_archive_suffix(name))]


def _check_links_inside(folder: Path, archive: Path) -> None:
    """After extraction, every symlink must resolve inside `folder`: this also catches chains of
    links that each look harmless on their own, whatever their order in the archive."""
    root = folder.resolve()
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(here, name)
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
                member = path.relative_to(folder).as_posix()
                raise UnsafeArchiveError(f"{archive}: refusing member {member!r}: link {os.readlink(path)!r} "
                                         f"resolves outside the extraction folder")


def _extract(archive: Path, folder: Path) -> None:
    """Extract `archive` into the (temporary) `folder`, translating failures into our errors."""
    try:
        _EXTRACTORS[_archive_suffix(archive.name)](archive, folder)
    except tarfile.FilterError as e:
        raise UnsafeArchiveError(f"{archive}: refusing member: {e}") from e
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DownloadError(f"{archive} is corrupt or truncated: {e}") from e
    _check_links_inside(folder, archive)


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a .zip / .tar / .tar.gz / .tar.xz / .tar.bz2 archive so that `dest` holds its contents.

    `dest` appears only once extraction is complete and replaces an existing `dest` whole; on any
    error (an unsafe member included) nothing is left behind."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    _archive_suffix(archive.name)  # an unsupported type fails before any folder is made
    with atomic_dir(dest) as tmp:
        _extract(archive, tmp)
    return dest


# -- the one call the dataset sources make ----------------------------------------------------------

def _marker_matches(folder: Path, algo: str, digest: str) -> bool:
    try:
        marker = read_json(folder / _MARKER)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get(algo) == digest


def _remove_stale_temporaries(target: Path) -> None:
    """Delete what a killed extraction of `target` left behind (`atomic_dir`'s hidden temporary and
    moved-aside folders); called under `target`'s lock, so no live extraction owns them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:[^.]+\.tmp|old-\d+)")
    for path in target.parent.iterdir():
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            log.info("removing %s, left by an interrupted extraction", path)
            shutil.rmtree(path, ignore_errors=True)


def fetch_extracted(raw: RawArchive, raw_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                    archive: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Folder holding the extracted dataset.

    - `source_dir` given: the user's already-extracted folder, returned as is; nothing downloaded.
    - `archive` given: the user's own copy of the archive, verified against `raw.sha256`/`raw.md5`
      when known (a mismatch raises ChecksumError; the file is left alone), then extracted.
    - otherwise: `raw.url` is downloaded to `raw_dir/raw.filename` (resumable, verified), then extracted.

    Extraction goes to `raw_dir/archive_stem(raw.filename)/`, atomically, with a marker file recording
    the archive's hash; it is skipped when that folder exists with the marker of the same hash. With a
    published hash that check needs neither the archive nor the network, so the archive may be deleted
    once extracted; without one the archive is hashed (sha256) on every call."""
    if source_dir is not None:
        source_dir = Path(source_dir)
        if not source_dir.is_dir():
            raise FileNotFoundError(f"source_dir {source_dir} (the extracted {raw.filename}) does not exist")
        return source_dir
    target = Path(raw_dir) / archive_stem(raw.filename)  # an unsupported type fails before any download
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = _expected_hash(raw.sha256, raw.md5)
    with _locked(target):
        _remove_stale_temporaries(target)
        if expected is not None and _marker_matches(target, *expected):
            return target
        if archive is not None:
            archive = Path(archive)
            if not archive.is_file():
                raise FileNotFoundError(f"archive {archive} (a copy of {raw.filename}) does not exist")
            if expected is not None and (actual := _file_hash(archive, expected[0], progress)) != expected[1]:
                raise ChecksumError(f"{archive} is not the published {raw.filename}: expected "
                                    f"{expected[0]} {expected[1]}, got {actual}")
        elif not raw.url:
            raise ValueError(f"no URL is known for {raw.filename}: give the extracted folder (source_dir) "
                             f"or your copy of the archive (archive)")
        else:
            archive = download_file(raw.url, target.parent / raw.filename, sha256=raw.sha256, progress=progress,
                                    md5=raw.md5)
        identity = expected or ("sha256", _file_hash(archive, "sha256", progress))
        if expected is None and _marker_matches(target, *identity):
            return target
        with atomic_dir(target) as tmp:
            _extract(archive, tmp)
            write_json(tmp / _MARKER, {"archive": archive.name, identity[0]: identity[1]})
    return target


def fetch_for_category(official: RawArchive | None, out_dir: str | os.PathLike, *,
                       raw_dir: str | os.PathLike | None = None, **options) -> Path:
    """`fetch_source` for a source's `prepare(category, out_dir, ...)`: raw data in `raw_dir`, by
    default the `_raw` folder beside the category folder. `options`: source_dir, archive, url,
    sha256, md5, archive_name, progress (an unknown one is a TypeError naming it)."""
    return fetch_source(official, raw_folder(Path(out_dir), raw_dir), **options)


def raw_folder(out_dir: Path, raw_dir: str | os.PathLike | None) -> Path:
    """Where a dataset's archive and extraction live: `raw_dir`, default `<out_dir>/../_raw`,
    shared by every category of the dataset."""
    return Path(raw_dir) if raw_dir is not None else Path(out_dir).parent / "_raw"


def resolve_archive(official: RawArchive | None, *, url: str | None = None, sha256: str | None = None,
                    md5: str | None = None, archive_name: str | None = None,
                    archive: str | os.PathLike | None = None) -> RawArchive | None:
    """The archive a dataset's options describe: the `official` one with the overrides applied.

    A `url` alone keeps the official file name and checksums (a mirror serves the same bytes);
    `sha256`/`md5` replace the checksums, `archive_name` the file name. Without any address, the
    user's own `archive` (verified when a hash is given); None when there is nothing at all."""
    url = url or (official.url if official is not None else None)
    if url:
        return RawArchive(
            url=url,
            filename=archive_name or (official.filename if official is not None else url.rstrip("/").rsplit("/", 1)[-1]),
            sha256=sha256 if sha256 is not None else (official.sha256 if official is not None else None),
            md5=md5 if md5 is not None else (official.md5 if official is not None else None))
    if archive is not None:
        return RawArchive(url="", filename=archive_name or Path(archive).name, sha256=sha256, md5=md5)
    return None


def fetch_source(official: RawArchive | None, raw_dir: str | os.PathLike, *,
                 source_dir: str | os.PathLike | None = None, archive: str | os.PathLike | None = None,
                 url: str | None = None, sha256: str | None = None, md5: str | None = None,
                 archive_name: str | None = None, progress: bool = True) -> Path:
    """The extracted raw dataset for a source's options (see `resolve_archive`, `fetch_extracted`).
    Every source and the pipeline's raw asset go through here, so they find the same extraction."""
    raw = resolve_archive(official, url=url, sha256=sha256, md5=md5, archive_name=archive_name, archive=archive)
    if raw is None and source_dir is not None:  # returned as is; the name only labels errors
        raw = RawArchive(url="", filename="user_folder.tar")
    if raw is None:
        raise ValueError("this dataset has no official download address: give url, archive or source_dir")
    return Path(fetch_extracted(raw, raw_dir, source_dir=source_dir, archive=archive, progress=progress))
