"""An MVTec-style category folder <-> a pandas manifest with one row per image.

Layout of one category folder (`root`):

    train/good/*                      defect-free training images
    validation/good/*                 optional defect-free validation images
    test/good/*, test/<defect_type>/*  test images
    ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png) one mask per defective test image
    manifest.csv                      written by `write_manifest`, paths relative to `root`
"""
from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd

from ad_models.data.download import sha256sum
from ad_models.io import atomic_dir, atomic_path, read_json, write_json

COLUMNS = ["path", "split", "label", "defect_type", "mask_path", "category", "dataset"]
SPLITS = ("train", "validation", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.csv"
_MAX_LISTED = 20


class DatasetError(ValueError):
    """A dataset folder or manifest that cannot be used as it is; the message says what to fix."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image_file(path: str | os.PathLike, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """cv2.imread that also handles non-ASCII paths; None when the file is missing or undecodable."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, flags)


def _find_mask(root: Path, defect_type: str, stem: str) -> str:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        mask = root / "ground_truth" / defect_type / name
        if mask.is_file():
            return mask.as_posix()
    return ""


def scan_category(root: str | os.PathLike, category: str, dataset: str) -> pd.DataFrame:
    """List the images of one category folder as a manifest with absolute paths (sorted)."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetError(f"category folder {root} does not exist")
    rows = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect_type = class_dir.name
            if split != "test" and defect_type != "good":
                raise DatasetError(
                    f"{class_dir}: only good images belong in {split}/ (expected {split}/good/); "
                    f"move defective images to test/{defect_type}/"
                )
            label = 0 if defect_type == "good" else 1
            for image in sorted(p for p in class_dir.iterdir() if p.is_file() and is_image_file(p)):
                mask = _find_mask(root, defect_type, image.stem) if label else ""
                rows.append((image.as_posix(), split, label, defect_type, mask, category, dataset))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["label"] = df["label"].astype(int)
    return df


def _category_dir(df: pd.DataFrame) -> str:
    # <root>/<split>/<defect_type>/<file>: the category folder is three levels above each image
    roots = {str(Path(p).parents[2]) for p in df["path"] if len(Path(p).parents) > 2}
    if len(roots) == 1:
        return roots.pop()
    try:
        return os.path.commonpath(list(df["path"]))
    except ValueError:
        return "<mixed folders>"


def _relative_to(path: str, root: str) -> str:
    if root.startswith("<") or not path.startswith(root.rstrip("/") + "/"):
        return path
    return path[len(root.rstrip("/")) + 1:]


def listing(title: str, items: list[str]) -> str:
    """An indented count, title and the first items, one per line: a problem in a DatasetError."""
    lines = [f"  {len(items)} {title}:"] + [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return "\n".join(lines)


def _check_columns(df: pd.DataFrame) -> None:
    if not isinstance(df, pd.DataFrame):
        raise DatasetError(f"expected a pandas DataFrame manifest, got {type(df).__name__}")
    if list(df.columns) != COLUMNS:
        raise DatasetError(f"manifest columns must be exactly {COLUMNS}, got {list(df.columns)}")


def _image_and_mask_shapes(row: tuple[str, str]) -> tuple[tuple | None, tuple | None]:
    image_path, mask_path = row
    image = read_image_file(image_path, cv2.IMREAD_UNCHANGED)
    mask = read_image_file(mask_path, cv2.IMREAD_GRAYSCALE) if mask_path else None
    return (None if image is None else image.shape[:2]), (None if mask is None else mask.shape[:2])


def validate_manifest(df: pd.DataFrame) -> None:
    """Raise DatasetError listing every problem found: unreadable images, missing or
    mis-sized masks, an empty train/good; decodes every image and mask once."""
    _check_columns(df)
    root = _category_dir(df) if len(df) else "<empty manifest>"
    categories = sorted(set(map(str, df["category"])))
    problems = []

    def rel(paths: list[str]) -> list[str]:
        return [_relative_to(p, root) for p in paths]

    bad_split = df.loc[~df["split"].isin(SPLITS), "path"].tolist()
    if bad_split:
        problems.append(listing(f"images with a split not in {SPLITS}", rel(bad_split)))
    good = df["label"] == 0
    inconsistent = df.loc[
        ~df["label"].isin([0, 1]) | (good != (df["defect_type"] == "good")) | (good & (df["mask_path"] != "")),
        "path",
    ].tolist()
    if inconsistent:
        problems.append(listing(
            "images whose label, defect_type and mask_path disagree "
            "(good images: label 0, defect_type 'good', no mask)", rel(inconsistent)))
    if not ((df["split"] == "train") & good).any():
        problems.append("  train/good is empty: at least one defect-free training image is needed")
    wrong_split = df.loc[~good & (df["split"] != "test"), "path"].tolist()
    if wrong_split:
        problems.append(listing("defective images outside test/", rel(wrong_split)))
    no_mask = df.loc[~good & (df["mask_path"] == ""), "path"].tolist()
    if no_mask:
        problems.append(listing(
            "defective test images without a mask file "
            "(expected ground_truth/<defect_type>/<stem>_mask.png)", rel(no_mask)))

    pairs = list(zip(df["path"], df["mask_path"]))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # cv2 releases the GIL
        shapes = list(pool.map(_image_and_mask_shapes, pairs, chunksize=16))
    unreadable = [p for (p, _), (shape, _) in zip(pairs, shapes) if shape is None]
    bad_masks = [m for (_, m), (_, mshape) in zip(pairs, shapes) if m and mshape is None]
    mis_sized = [
        f"{_relative_to(m, root)} is {mshape[1]}x{mshape[0]}, "
        f"image {_relative_to(p, root)} is {shape[1]}x{shape[0]}"
        for (p, m), (shape, mshape) in zip(pairs, shapes)
        if shape is not None and mshape is not None and shape != mshape
    ]
    if unreadable:
        problems.append(listing("missing, unreadable or undecodable images", rel(unreadable)))
    if bad_masks:
        problems.append(listing("missing, unreadable or undecodable mask files", rel(bad_masks)))
    if mis_sized:
        problems.append(listing("masks whose size differs from their image", mis_sized))

    if problems:
        raise DatasetError(
            f"dataset {', '.join(sorted(set(map(str, df['dataset']))))} category {', '.join(categories)} "
            f"in {root} has problems:\n" + "\n".join(problems)
        )


def write_manifest(df: pd.DataFrame, root: str | os.PathLike) -> Path:
    """Write `<root>/manifest.csv` atomically, with paths relative to `root` (posix)."""
    _check_columns(df)
    root = Path(root).absolute()

    def relative(p: str) -> str:
        if not p:
            return ""
        try:
            return Path(p).absolute().relative_to(root).as_posix()
        except ValueError:
            raise DatasetError(f"{p} is not inside the category folder {root}") from None

    out = df.copy()
    out["path"] = out["path"].map(relative)
    out["mask_path"] = out["mask_path"].map(relative)
    manifest = root / MANIFEST_NAME
    with atomic_path(manifest) as tmp:
        out.to_csv(tmp, index=False, lineterminator="\n")
    return manifest


def read_manifest(root: str | os.PathLike) -> pd.DataFrame:
    """Read `<root>/manifest.csv` and return it with absolute paths."""
    root = Path(root).absolute()
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found: the dataset is not prepared (prepare it with "
            f"ad_models.data.sources.prepare_category, or `adpipe` through the pipeline)"
        )
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    _check_columns(df)
    df["label"] = df["label"].astype(int)
    df["path"] = [(root / p).as_posix() for p in df["path"]]
    df["mask_path"] = [(root / p).as_posix() if p else "" for p in df["mask_path"]]
    return df


# ----------------------------------------------------------------------------- building a category folder

TRANSFER_MODES = ("copy", "mask", "png")


def _binary_mask(source: Path) -> tuple[np.ndarray | None, bool]:
    """(0/255 mask, whether the file already is exactly that as a single-channel PNG), or
    (None, False) when unreadable."""
    mask = read_image_file(source, cv2.IMREAD_UNCHANGED)
    if mask is None:
        return None, False
    if mask.ndim == 3:  # a colour mask: defective where any colour channel is set (alpha ignored)
        mask = mask[..., :3].max(axis=2)
    elif (source.suffix.lower() == ".png" and mask.dtype == np.uint8
          and bool(((mask == 0) | (mask == 255)).all())):
        return mask, True
    return np.where(mask > 0, 255, 0).astype(np.uint8), False


def _transfer(job: tuple[Path, Path, str]) -> str | None:
    """Carry out one job; the source's name when it cannot be read or written, else None."""
    source, dest, mode = job
    if mode == "copy":
        try:
            shutil.copyfile(source, dest)
        except OSError:
            return str(source)
        return None
    if mode == "mask":
        mask, already = _binary_mask(source)
        if mask is None:
            return str(source)
        if already:  # byte copy: re-encoding a 1024x1024 PNG costs far more than reading it
            shutil.copyfile(source, dest)
            return None
        return None if cv2.imwrite(str(dest), mask) else str(source)
    image = read_image_file(source, cv2.IMREAD_UNCHANGED)  # "png": convert a format we do not keep as is
    return None if image is not None and cv2.imwrite(str(dest), image) else str(source)


def transfer_files(jobs: list[tuple[Path, Path, str]], workers: int | None = None) -> None:
    """Carry out (source, destination, mode) jobs in a thread pool (file I/O and cv2 release the GIL).

    Modes: "copy" copies the bytes; "mask" writes a single-channel 0/255 PNG (any nonzero pixel is
    defective), copying the bytes when the source already is one; "png" re-encodes an image as PNG.
    Raises DatasetError listing every source that could not be read or written."""
    bad_modes = sorted({mode for _, _, mode in jobs} - set(TRANSFER_MODES))
    if bad_modes:
        raise ValueError(f"unknown transfer modes {bad_modes}; known: {TRANSFER_MODES}")
    for folder in sorted({Path(dest).parent for _, dest, _ in jobs}):
        folder.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        failed = [f for f in pool.map(_transfer, [(Path(s), Path(d), m) for s, d, m in jobs], chunksize=8) if f]
    if failed:
        raise DatasetError("cannot read or write these files:\n" + listing("files", sorted(failed)))


def write_category(
    out_dir: str | os.PathLike, category: str, dataset: str, fill: Callable[[Path], None]
) -> pd.DataFrame:
    """Build the category folder `out_dir` atomically and return its manifest.

    `fill(tmp)` writes the images and masks into an empty temporary folder beside `out_dir`; the
    folder is then scanned, validated and given its manifest, and only then replaces `out_dir`
    whole. Any error leaves the previous `out_dir` (if any) untouched."""
    with atomic_dir(out_dir) as tmp:
        fill(tmp)
        df = scan_category(tmp, category, dataset)
        validate_manifest(df)
        write_manifest(df, tmp)
    return read_manifest(out_dir)


def write_jobs(out_dir: str | os.PathLike, category: str, dataset: str,
               jobs: list[tuple[Path, Path, str]], record_inputs: bool = False) -> pd.DataFrame:
    """A category folder made of `(source, path inside the folder, mode)` jobs (see `transfer_files`),
    written atomically by `write_category`; returns its manifest. With `record_inputs` (sources that
    read the user's own folders, which no published checksum pins) the folder gets `inputs.json`
    (`inputs_digest`). A validation error also names the source file of each file it lists."""
    def fill(tmp: Path) -> None:
        transfer_files([(source, tmp / rel, mode) for source, rel, mode in jobs])
        if record_inputs:
            write_json(tmp / INPUTS_RECORD, inputs_digest(jobs))
    try:
        return write_category(out_dir, category, dataset, fill)
    except DatasetError as e:
        message = str(e)
        # the listed paths are inside a temporary folder; the user knows the files they came from
        named = [f"{Path(rel).as_posix()} <- {source}" for source, rel, _ in jobs if Path(rel).as_posix() in message]
        if not named:
            raise
        raise DatasetError(message + "\n" + listing("source files of the paths above", named)) from e


# ----------------------------------------------------------------------------- what a category was read from

INPUTS_RECORD = "inputs.json"


def files_digest(files: list[tuple[str, str | os.PathLike]]) -> str:
    """A sha256 hex digest over the sorted (name, sha256 of the file's bytes) of `(name, path)` pairs:
    it changes exactly when a file changes, appears, disappears or is renamed, and not when the
    files move together to another folder or machine."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(sha256sum, [path for _, path in files]))
    digest = hashlib.sha256()
    for name, file_digest in sorted(zip((name for name, _ in files), digests)):
        digest.update(f"{name}\t{file_digest}\n".encode())
    return digest.hexdigest()


def inputs_digest(jobs: list[tuple[Path, Path, str]]) -> dict[str, int | str]:
    """{"files": n, "sha256": `files_digest` over each job's path inside the category folder and its
    source file}: what a category folder was read from."""
    return {"files": len(jobs), "sha256": files_digest([(Path(rel).as_posix(), source) for source, rel, _ in jobs])}


def read_inputs_record(category_dir: str | os.PathLike) -> dict | None:
    """The `inputs_digest` a category folder was built from, or None when its source records none."""
    record = Path(category_dir) / INPUTS_RECORD
    return read_json(record) if record.is_file() else None


# ----------------------------------------------------------------------------- expected image counts

ANY_DEFECT = "test/*"  # key for "all defective test images, whatever their type"


def require_category(category: str, categories: tuple[str, ...] | list[str], dataset: str) -> None:
    if category not in categories:
        raise ValueError(f"unknown {dataset} category {category!r}; known: {', '.join(categories)}")


def count_table(df: pd.DataFrame) -> dict[str, int]:
    """Images per `<split>/<defect_type>` (e.g. "train/good", "test/crack"): the key format of
    each source's EXPECTED_COUNTS."""
    keys = df["split"].astype(str) + "/" + df["defect_type"].astype(str)
    return {key: int(n) for key, n in sorted(keys.value_counts().items())}


def count_problems(df: pd.DataFrame, expected: dict[str, int]) -> list[str]:
    """Differences between a manifest's counts and `expected`, one readable line each; empty when
    they agree. Reports short and missing folders and folders that nobody expected.

    `expected` may use the key "test/*" for the number of defective test images whatever their
    type (for datasets whose per-type counts are not published); defect types are then not
    reported as unexpected."""
    actual = count_table(df)

    def is_defective_test(key: str) -> bool:
        return key.startswith("test/") and key != "test/good"

    problems = []
    for key, n in expected.items():
        have = sum(v for k, v in actual.items() if is_defective_test(k)) if key == ANY_DEFECT else actual.get(key, 0)
        label = "defective test images (all types)" if key == ANY_DEFECT else key
        if have == 0 and n > 0:
            problems.append(f"{label}: missing, expected {n} images")
        elif have != n:
            problems.append(f"{label}: {have} images, expected {n}")
    for key, have in actual.items():
        if key not in expected and not (ANY_DEFECT in expected and is_defective_test(key)):
            problems.append(f"{key}: {have} images, none expected")
    return problems
