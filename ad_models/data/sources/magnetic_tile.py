"""The Magnetic Tile Defect dataset (Huang, Qiu, Yuan, The Visual Computer 2020), restructured
into MVTec layout as one category, `tile`.

Published layout: `MT_<Kind>/Imgs/<name>.jpg` with a same-name `<name>.png` mask, Kind in Free
(defect-free), Blowhole, Break, Crack, Fray, Uneven. MT_Free is split into train/good and
test/good by a hash of each file name (so the split never depends on listing order); each defect
kind goes to test/<kind>/ with its mask thresholded at > 127 and written as 0/255 PNG. The JPEGs
are copied byte for byte, never re-encoded.

Four MT_Uneven masks are empty although their images are labelled defective; they are kept as
defective (label 1) with empty masks: they count for image-level metrics and add no defective
pixel to pixel-level ones.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ad_models.data.download import RawArchive, fetch_for_category
from ad_models.data.layout import read_image_file, require_category, write_category

CATEGORIES: tuple[str, ...] = ("tile",)
DATASET = "magnetic_tile"
URL = "https://github.com/abin24/Magnetic-tile-defect-datasets./archive/refs/heads/master.zip"
ARCHIVE_NAME = "Magnetic-tile-defect-datasets.-master.zip"
RAW = RawArchive(url=URL, filename=ARCHIVE_NAME)  # a branch archive: GitHub publishes no checksum
DEFECT_KINDS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
KINDS = ("Free",) + DEFECT_KINDS
# published: 952 defect-free images; the good split is that of the default test_good_fraction 0.2
EXPECTED_COUNTS = {"tile": {"train/good": 755, "test/good": 197, "test/blowhole": 115, "test/break": 85,
                            "test/crack": 57, "test/fray": 32, "test/uneven": 103}}


def is_test_good(name: str, test_good_fraction: float) -> bool:
    """Whether a defect-free image goes to test/good: a hash of its file name, not its position."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_good_fraction


def find_source_root(source_dir: str | os.PathLike) -> Path:
    """The folder holding the MT_* folders: `source_dir` itself or one of its subfolders."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"magnetic tile source folder {source_dir} does not exist")
    candidates = [source_dir] + sorted(p for p in source_dir.iterdir() if p.is_dir())
    roots = [p for p in candidates if (p / "MT_Free").is_dir()]
    if not roots:
        raise FileNotFoundError(
            f"no MT_Free folder in {source_dir} or its subfolders: expected the published layout "
            f"MT_<Kind>/Imgs/<name>.jpg (download {URL} and extract it)"
        )
    if len(roots) > 1:
        raise ValueError(f"several magnetic tile copies under {source_dir}: {', '.join(map(str, roots))}; pass one")
    root = roots[0]
    missing = [f"MT_{kind}/Imgs" for kind in KINDS if not (root / f"MT_{kind}" / "Imgs").is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}: incomplete copy of the magnetic tile dataset")
    return root


def _images(root: Path, kind: str) -> list[Path]:
    return sorted((root / f"MT_{kind}" / "Imgs").glob("*.jpg"), key=lambda p: p.name)


def _restructure(root: Path, out: Path, *, test_good_fraction: float, limit_per_kind: int | None) -> None:
    limit = slice(None) if limit_per_kind is None else slice(limit_per_kind)
    free = _images(root, "Free")
    test = [p for p in free if is_test_good(p.name, test_good_fraction)]
    train = [p for p in free if not is_test_good(p.name, test_good_fraction)]
    for images, folder in ((train[limit], out / "train" / "good"), (test[limit], out / "test" / "good")):
        folder.mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copyfile(image, folder / image.name)
    for kind in DEFECT_KINDS:
        defect_type = kind.lower()
        images_dir, masks_dir = out / "test" / defect_type, out / "ground_truth" / defect_type
        images_dir.mkdir(parents=True, exist_ok=True)
        masks_dir.mkdir(parents=True, exist_ok=True)
        for image in _images(root, kind)[limit]:
            shutil.copyfile(image, images_dir / image.name)
            mask_file = image.with_suffix(".png")
            mask = read_image_file(mask_file, cv2.IMREAD_GRAYSCALE)
            if mask is None:  # leave the mask out: validation lists every image without one
                continue
            cv2.imwrite(str(masks_dir / f"{image.stem}_mask.png"), np.where(mask > 127, 255, 0).astype(np.uint8))


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    test_good_fraction: float = 0.2,
    limit_per_kind: int | None = None,
    progress: bool = True,
    **raw_options,
) -> pd.DataFrame:
    """Restructure the dataset into `out_dir` (the category folder, replaced whole) and return
    its manifest. Reads `source_dir` (an extracted copy) or `archive` (the user's copy of the
    archive) when given, else downloads `url` (default: the repository's archive) into `raw_dir`
    (default: `<out_dir>/../_raw`); the extracted folder is reused by later calls.

    `seed` is accepted like every source's but changes nothing: the test set of a real dataset
    must stay the same whatever seed a training run uses."""
    require_category(category, CATEGORIES, DATASET)
    if not 0 < test_good_fraction < 1:
        raise ValueError(f"test_good_fraction must be in (0, 1), got {test_good_fraction!r}")
    if limit_per_kind is not None and (type(limit_per_kind) is not int or limit_per_kind < 1):
        raise ValueError(f"limit_per_kind must be None or an int >= 1, got {limit_per_kind!r}")
    out_dir = Path(out_dir)
    extracted = fetch_for_category(RAW, out_dir, progress=progress, **raw_options)
    root = find_source_root(extracted)
    return write_category(out_dir, category, DATASET, lambda tmp: _restructure(
        root, tmp, test_good_fraction=test_good_fraction, limit_per_kind=limit_per_kind))
