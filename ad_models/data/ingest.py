"""New defect-free images for a category's training set: checked file by file, never lost.

Folders, under the data root (a category key is `<dataset>/<category>`, e.g. `synthetic/fabric`):

    incoming/<dataset>/<category>/good/        the inbox: users drop new good images here
    incoming/<dataset>/<category>/rejected/    each refused file as <name> + <name>.reason.txt (one line)
    ingested/<dataset>/<category>/good/        accepted images: <sha256[:16]><extension>, original bytes
    ingested/<dataset>/<category>/ledger.csv   one row per accepted image (LEDGER_COLUMNS)

`ingest` takes each inbox file (sorted by name) to exactly one place: accepted into the store,
moved to rejected/ with its reason, or left where it is (too young, possibly still being copied;
hidden or temporary names such as `*.part`). `merge_ingested` (called by
`sources.prepare_category(..., ingested_dir=...)`) adds the accepted images to the prepared
category folder as `train/good/ingested_<stored name>`; `training_data_version` hashes the training
images so that a change of them can be told.

Crash safety. The ledger is the commit point: an image is added when its stored file AND its
ledger row exist; nobody reads the store except through the ledger. The steps for a valid file,
and what a crash after each leaves:

1. `stored`: the bytes are written to a temporary name in store/good/, fsynced and renamed to
   their final, content-derived name. Crash: a stored image without a ledger row, which counts
   for nothing; the inbox file is still there, and the rerun writes the same bytes under the same
   name again.
2. `ledger`: the ledger is rewritten with the new row (temporary file, fsync, rename). Crash: the
   file is added AND still in the inbox; the rerun finds its sha256 in the ledger with the same
   original name, only removes the inbox file and reports it as `completed`.
3. `removed`: the inbox file is unlinked. Done.

For an invalid file:

1. `reason`: `<name>.reason.txt` is written atomically in rejected/. Crash: the image is still
   in the inbox beside a stray reason file; the rerun picks the same rejected name (the first whose
   image is free) and overwrites that reason file.
2. `moved`: the image is renamed into rejected/ (one rename: inbox and rejected/ are siblings).

So at every moment each file is whole in the inbox, or added, or rejected with its reason.
Duplicate checks go through the ledger, which grows as the batch is processed, so a rerun after a
crash rejects a repeated file with the same words as an uninterrupted run would.

One `ingest` per category at a time: two concurrent runs over the same inbox are not serialised.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
import pandas as pd

from ad_models.data.download import sha256sum
from ad_models.data.layout import (
    COLUMNS,
    IMAGE_EXTENSIONS,
    DatasetError,
    files_digest,
    read_image_file,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from ad_models.io import atomic_dir, atomic_path, write_text

LEDGER_NAME = "ledger.csv"
LEDGER_COLUMNS = ["sha256", "file", "original_name", "bytes", "width", "height", "channels", "ingested_at"]
_INT_COLUMNS = ("bytes", "width", "height", "channels")
REASON_SUFFIX = ".reason.txt"
INGESTED_PREFIX = "ingested_"  # name prefix of the merged images in the category folder's train/good
IGNORED_SUFFIXES = (".tmp", ".part", ".crdownload")  # copies in progress: left alone
STEPS = ("stored", "ledger", "removed", "reason", "moved")


# ----------------------------------------------------------------------------- folders and rules

class IngestFolders(NamedTuple):
    inbox: Path
    rejected: Path
    store: Path


def ingest_folders(data_root: str | os.PathLike, key: str) -> IngestFolders:
    """The inbox, rejected and store folders of category `key` ("<dataset>/<category>")."""
    parts = key.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"category key must look like '<dataset>/<category>', got {key!r}")
    root = Path(data_root)
    incoming = root / "incoming" / parts[0] / parts[1]
    return IngestFolders(incoming / "good", incoming / "rejected", root / "ingested" / parts[0] / parts[1])


@dataclass(frozen=True)
class IngestRules:
    """What a new good image must be to join the training set.

    `channels`: "auto" (the channel count, 1 or 3, of the category's training images) or 1 or 3.
    `min_age_seconds`: files modified more recently are left for a later run (still being copied?).
    """

    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    min_side: int = 32
    max_side: int = 8192
    channels: str | int = "auto"
    min_age_seconds: float = 2.0

    def __post_init__(self):
        if isinstance(self.extensions, str) or not all(isinstance(e, str) for e in self.extensions):
            raise ValueError(f"extensions must be a list of names such as ['png', 'jpg'], got {self.extensions!r}")
        extensions = tuple(sorted({"." + e.lower().lstrip(".") for e in self.extensions}))
        unknown = [e for e in extensions if e not in IMAGE_EXTENSIONS]
        if not extensions or unknown:
            raise ValueError(f"extensions must be among {', '.join(IMAGE_EXTENSIONS)}, got {list(self.extensions)}")
        object.__setattr__(self, "extensions", extensions)
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (pixels), got {value!r}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) must be >= min_side ({self.min_side})")
        if not (self.channels == "auto" or (type(self.channels) is int and self.channels in (1, 3))):
            raise ValueError(f"channels must be 'auto', 1 or 3, got {self.channels!r}")
        age = self.min_age_seconds
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age < float("inf"):
            raise ValueError(f"min_age_seconds must be a number >= 0, got {age!r}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "IngestRules":
        values = dict(values or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown ingest rule(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        if isinstance(values.get("extensions"), list):
            values["extensions"] = tuple(values["extensions"])
        return cls(**values)


@dataclass
class IngestResult:
    added: list[tuple[str, str]] = field(default_factory=list)     # (original name, stored name)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    completed: list[str] = field(default_factory=list)  # added by an interrupted run, now removed from the inbox
    skipped: list[str] = field(default_factory=list)    # too young, left in the inbox


# ----------------------------------------------------------------------------- the ledger

def _empty_ledger() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=int if c in _INT_COLUMNS else str) for c in LEDGER_COLUMNS})


def _read_ledger(store_dir: Path) -> pd.DataFrame:
    ledger = store_dir / LEDGER_NAME
    if not ledger.is_file():
        return _empty_ledger()
    df = pd.read_csv(ledger, dtype=str, keep_default_na=False)
    if list(df.columns) != LEDGER_COLUMNS:
        raise DatasetError(f"{ledger}: columns must be exactly {LEDGER_COLUMNS}, got {list(df.columns)}")
    for column in _INT_COLUMNS:
        df[column] = df[column].astype(int)
    return df


def _fsync_dir(folder: Path) -> None:
    """Make renames and unlinks in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable) -> None:
    """Write `path` through a temporary file, fsynced before the rename and the rename after."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _write_ledger(store_dir: Path, rows: list[dict]) -> None:
    df = pd.DataFrame(rows, columns=LEDGER_COLUMNS)
    _write_durably(store_dir / LEDGER_NAME, lambda f: f.write(df.to_csv(index=False, lineterminator="\n").encode()))


def ingested_images(store_dir: str | os.PathLike) -> pd.DataFrame:
    """The ledger rows of a store (LEDGER_COLUMNS) plus `path`, the stored image's absolute path;
    an empty frame when there is no store or ledger yet."""
    store = Path(store_dir).absolute()
    df = _read_ledger(store)
    df["path"] = [(store / "good" / name).as_posix() for name in df["file"]]
    return df


# ----------------------------------------------------------------------------- checking one file

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Dataset:
    """What the category folder says about new images, read only when a file needs it."""

    def __init__(self, dataset_dir: str | os.PathLike):
        self.root = Path(dataset_dir).absolute()
        self.manifest = read_manifest(self.root)

    @cached_property
    def channels(self) -> int:
        train = self.manifest[self.manifest["split"] == "train"]
        if train.empty:
            raise DatasetError(f"{self.root}: no training image to take the channel count from")
        image = read_image_file(train["path"].iloc[0], cv2.IMREAD_UNCHANGED)
        if image is None:
            raise DatasetError(f"cannot decode the training image {train['path'].iloc[0]}")
        return 1 if image.ndim == 2 else image.shape[2]

    @cached_property
    def by_sha256(self) -> dict[str, str]:
        """sha256 -> path relative to the category folder, of every train/validation/test image."""
        index = {}
        for path in self.manifest["path"]:
            index.setdefault(sha256sum(path), Path(path).relative_to(self.root).as_posix())
        return index


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def waiting_files(inbox_dir: str | os.PathLike, rules: IngestRules | None = None) -> list[Path]:
    """The inbox files the next `ingest` would take (not ignored, old enough), sorted by name; cheap
    (a directory listing and stats), for a sensor to poll."""
    rules, inbox = rules or IngestRules(), Path(inbox_dir)
    if not inbox.is_dir():
        return []
    now, waiting = time.time(), []
    for path in sorted(inbox.iterdir()):
        try:
            if path.is_file() and not _is_ignored(path.name) and now - path.stat().st_mtime >= rules.min_age_seconds:
                waiting.append(path)
        except FileNotFoundError:
            pass  # taken away while we looked
    return waiting


def ensure_store(store_dir: str | os.PathLike) -> Path:
    """Create an empty store (good/ and a ledger with its header) if there is none, so the store
    exists before anything is ingested (DVC's dataset stage depends on it)."""
    store = Path(store_dir)
    if not (store / LEDGER_NAME).is_file():
        (store / "good").mkdir(parents=True, exist_ok=True)
        _write_ledger(store, [])
    return store


def _problem(name: str, image: np.ndarray | None, digest: str, rules: IngestRules,
             dataset: _Dataset, ledger: dict[str, dict]) -> str | None:
    """Why the decoded file cannot join the training set, or None when it can."""
    if image is None:
        return f"does not decode as an image (corrupt, truncated, or not really a {Path(name).suffix.lower()} file)"
    channels = 1 if image.ndim == 2 else image.shape[2]
    wanted = dataset.channels if rules.channels == "auto" else rules.channels
    if channels != wanted:
        whose = "the training images have" if rules.channels == "auto" else "the ingest rules require"
        return f"has {_plural(channels, 'channel')}, {whose} {wanted}"
    h, w = image.shape[:2]
    bounds = f"each side must be {rules.min_side} to {rules.max_side} pixels"
    if min(h, w) < rules.min_side:
        return f"too small: {w}x{h} pixels (width x height); {bounds}"
    if max(h, w) > rules.max_side:
        return f"too large: {w}x{h} pixels (width x height); {bounds}"
    if digest in ledger:  # also catches a copy of a file added earlier in this batch
        row = ledger[digest]
        return f"duplicate of {row['original_name']}, already ingested as good/{row['file']}"
    if digest in dataset.by_sha256:
        return f"duplicate of the dataset image {dataset.by_sha256[digest]}"
    return None


# ----------------------------------------------------------------------------- ingest

def _free_name(folder: Path, name: str) -> str:
    """`name`, or `<stem>_<n><suffix>` with the smallest n whose image is not in `folder` yet."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, n = name, 0
    while (folder / candidate).exists():
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    return candidate


def ingest(inbox_dir: str | os.PathLike, store_dir: str | os.PathLike, rejected_dir: str | os.PathLike,
           dataset_dir: str | os.PathLike, rules: IngestRules | None = None,
           on_step: Callable[[str, str], None] | None = None) -> IngestResult:
    """Add the valid images of `inbox_dir` to the store, move the others to `rejected_dir` with
    their reason; see the module docstring for the folders and the crash-safety argument.

    `dataset_dir` is the prepared category folder (its manifest gives the channel count and the
    images a new one must not duplicate). `on_step(step, name)` is called after each step (STEPS).
    A bad file never stops the others; an error writing the store (a full disk) stops the run
    with the file still in the inbox."""
    rules = rules or IngestRules()
    inbox, store, rejected = Path(inbox_dir), Path(store_dir), Path(rejected_dir)
    result = IngestResult()
    if not inbox.is_dir():
        return result
    names = sorted(p.name for p in inbox.iterdir() if p.is_file() and not _is_ignored(p.name))
    if not names:
        return result  # an empty inbox (the usual case for a sensor) reads nothing else

    dataset = _Dataset(dataset_dir)
    rows = _read_ledger(store).to_dict("records")
    ledger = {row["sha256"]: row for row in rows}
    good = store / "good"

    def step(what: str, name: str) -> None:
        if on_step is not None:
            on_step(what, name)

    def remove_from_inbox(name: str) -> None:
        (inbox / name).unlink()
        _fsync_dir(inbox)
        step("removed", name)

    def reject(name: str, reason: str) -> None:
        reason = " ".join(reason.split())  # one line
        rejected.mkdir(parents=True, exist_ok=True)
        target = _free_name(rejected, name)
        write_text(rejected / (target + REASON_SUFFIX), reason + "\n")
        step("reason", name)
        shutil.move(inbox / name, rejected / target)  # a rename: inbox and rejected/ are siblings
        step("moved", name)
        result.rejected.append((name, reason))

    now = time.time()
    for name in names:
        path = inbox / name
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:
            continue  # taken away by the user while we looked: nothing to do
        if now - modified < rules.min_age_seconds:
            result.skipped.append(name)
            continue
        if path.suffix.lower() not in rules.extensions:
            reject(name, f"extension {path.suffix or '(none)'!r} is not an allowed image extension "
                         f"({', '.join(rules.extensions)})")
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as e:
            reject(name, f"cannot be read: {e.strerror or e}")
            continue
        if not data:
            reject(name, "empty file (0 bytes)")
            continue
        digest = hashlib.sha256(data).hexdigest()

        row = ledger.get(digest)
        if row is not None and row["original_name"] == name:
            # an earlier run crashed after the commit point: finish its job
            if not (good / row["file"]).is_file():
                _write_durably(good / row["file"], lambda f: f.write(data))
                step("stored", name)
            remove_from_inbox(name)
            result.completed.append(name)
            continue

        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:  # e.g. a header announcing more pixels than OpenCV accepts
            image = None
        reason = _problem(name, image, digest, rules, dataset, ledger)
        if reason is not None:
            reject(name, reason)
            continue

        stored = digest[:16] + path.suffix.lower()
        _write_durably(good / stored, lambda f: f.write(data))  # overwrites a copy left by a crash
        step("stored", name)
        h, w = image.shape[:2]
        row = {"sha256": digest, "file": stored, "original_name": name, "bytes": len(data), "width": w,
               "height": h, "channels": 1 if image.ndim == 2 else image.shape[2],
               "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_ledger(store, rows + [row])  # the commit point
        rows.append(row)
        ledger[digest] = row
        step("ledger", name)
        remove_from_inbox(name)
        result.added.append((name, stored))
    return result


# ----------------------------------------------------------------------------- versions and merging

def store_version(store_dir: str | os.PathLike) -> str:
    """A hash of the accepted images' contents: changes exactly when an image is added."""
    digests = sorted(_read_ledger(Path(store_dir))["sha256"])
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def training_data_version(dataset_dir: str | os.PathLike) -> str:
    """A sha256 hex digest over the sorted (path relative to the category folder, sha256 of the
    bytes) of the manifest's train rows: changes exactly when the training images change, and not
    when the folder moves or other splits change."""
    root = Path(dataset_dir).absolute()
    manifest = read_manifest(root)
    train = manifest.loc[manifest["split"] == "train", "path"]
    return files_digest([(Path(p).relative_to(root).as_posix(), p) for p in train])


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link every file of `source` into `dest` (a copy where links are not possible)."""
    for folder, _, files in os.walk(source):
        target = dest / Path(folder).relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, target / name)
            except OSError:
                shutil.copy2(Path(folder) / name, target / name)


def merge_ingested(staging_dir: str | os.PathLike, ingested_dir: str | os.PathLike,
                   out_dir: str | os.PathLike) -> pd.DataFrame:
    """Build the category folder `out_dir` (atomically, replacing it whole) from a prepared folder
    `staging_dir` plus the ingested images of the store `ingested_dir`, each copied to
    `train/good/ingested_<stored name>`; return the validated manifest. Any error leaves the
    previous `out_dir` untouched. The caller removes `staging_dir`."""
    staging = Path(staging_dir).absolute()
    base = read_manifest(staging)
    if base.empty:
        raise DatasetError(f"{staging}: the prepared category has no images")
    images = ingested_images(ingested_dir)
    category, dataset = base["category"].iloc[0], base["dataset"].iloc[0]
    with atomic_dir(out_dir) as tmp:
        _link_tree(staging, tmp)
        (tmp / "train" / "good").mkdir(parents=True, exist_ok=True)
        added = []
        for stored, source in zip(images["file"], images["path"]):
            dest = tmp / "train" / "good" / f"{INGESTED_PREFIX}{stored}"
            if dest.exists():
                raise DatasetError(f"{staging}: train/good/{dest.name} already exists; "
                                   f"cannot add the ingested image {source} under that name")
            shutil.copyfile(source, dest)
            added.append((dest.as_posix(), "train", 0, "good", "", category, dataset))

        def moved(p: str) -> str:
            return (tmp / Path(p).relative_to(staging)).as_posix() if p else ""

        base["path"] = base["path"].map(moved)
        base["mask_path"] = base["mask_path"].map(moved)
        train = base["split"] == "train"
        df = pd.concat([base[train], pd.DataFrame(added, columns=COLUMNS), base[~train]], ignore_index=True)
        df["label"] = df["label"].astype(int)
        validate_manifest(df)
        write_manifest(df, tmp)
    return read_manifest(out_dir)
