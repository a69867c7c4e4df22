"""An MVTec-style category folder <-> a pandas manifest with one row per image.

Layout of one category folder (`root`):

    train/good/*                      defect-free training images
    validation/good/*                 optional defect-free validation images
    test/good/*, test/<defect_type>/*  test images
    ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png) one mask per defective test image
    manifest.csv                      written by `write_manifest`, paths relative to `root`
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ad_models.io import atomic_path

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


def _listing(title: str, items: list[str]) -> str:
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
        problems.append(_listing(f"images with a split not in {SPLITS}", rel(bad_split)))
    good = df["label"] == 0
    inconsistent = df.loc[
        ~df["label"].isin([0, 1]) | (good != (df["defect_type"] == "good")) | (good & (df["mask_path"] != "")),
        "path",
    ].tolist()
    if inconsistent:
        problems.append(_listing(
            "images whose label, defect_type and mask_path disagree "
            "(good images: label 0, defect_type 'good', no mask)", rel(inconsistent)))
    if not ((df["split"] == "train") & good).any():
        problems.append("  train/good is empty: at least one defect-free training image is needed")
    wrong_split = df.loc[~good & (df["split"] != "test"), "path"].tolist()
    if wrong_split:
        problems.append(_listing("defective images outside test/", rel(wrong_split)))
    no_mask = df.loc[~good & (df["mask_path"] == ""), "path"].tolist()
    if no_mask:
        problems.append(_listing(
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
        problems.append(_listing("missing, unreadable or undecodable images", rel(unreadable)))
    if bad_masks:
        problems.append(_listing("missing, unreadable or undecodable mask files", rel(bad_masks)))
    if mis_sized:
        problems.append(_listing("masks whose size differs from their image", mis_sized))

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
