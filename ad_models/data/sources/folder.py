"""A user's own folders of images, restructured into our layout as one category.

- `good_dir`: defect-free images (subfolders included). Split into train/good and test/good by a
  hash of each file's path relative to `good_dir` (`test_good_fraction` of them go to test), so
  the split never depends on listing order or on `seed`, and adding images never moves old ones.
- `defective_dir` (optional): defective images, all in test/. Images directly in it get the
  defect type "defect"; images in a subfolder get the subfolder's name as defect type.
- `mask_dir` (needed with `defective_dir`): one mask per defective image, in a folder tree
  parallel to `defective_dir`, named like the image with or without a `_mask` suffix, in any
  format; its nonzero pixels are defective. A mask directly in `mask_dir` is found too, and
  `mask_dir` may be `defective_dir` itself (masks beside their images as `<stem>_mask.*`).

Any image format OpenCV reads is accepted: PNG, JPEG, BMP and TIFF files are copied byte for byte,
the others (WebP, PPM/PGM, JPEG 2000, ...) are converted to PNG. Files in subfolders of
`good_dir` are named `<sub>__<name>` so that names stay unique.

There is no official list of categories: any folder-safe name is accepted (CATEGORIES is None),
and there are no expected counts (EXPECTED_COUNTS is empty). No checksum pins the user's files, so
the category folder records a hash of every file read (`inputs.json`, see `layout.inputs_digest`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from ad_models.data.layout import IMAGE_EXTENSIONS, DatasetError, write_jobs
from ad_models.data.sources.magnetic_tile import is_test_good

DATASET = "folder"
CATEGORIES: tuple[str, ...] | None = None  # any name matching CATEGORY_PATTERN
CATEGORY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RAW = None
EXPECTED_COUNTS: dict[str, dict[str, int]] = {}
DEFAULT_DEFECT_TYPE = "defect"
# what cv2.imread decodes; the ones outside layout.IMAGE_EXTENSIONS are converted to PNG
READABLE_EXTENSIONS = IMAGE_EXTENSIONS + (
    ".jpe", ".dib", ".webp", ".jp2", ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".sr", ".ras", ".pfm",
    ".hdr", ".pic", ".exr",
)


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden files skipped), sorted by relative path."""
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_EXTENSIONS
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def image_job(source: Path, dest_dir: Path, stem: str) -> tuple[Path, Path, str]:
    """The transfer job writing image `source` as `dest_dir/<stem>`: kept as is in a format we keep,
    else converted to PNG."""
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return source, dest_dir / f"{stem}{source.suffix}", "copy"
    return source, dest_dir / f"{stem}.png", "png"


def mask_index(mask_dir: Path) -> dict[tuple[str, str], Path]:
    """(relative folder, image stem) -> mask file; `<stem>_mask.*` wins over `<stem>.*`."""
    index: dict[tuple[str, str], Path] = {}
    for mask in image_files(mask_dir):
        folder = mask.parent.relative_to(mask_dir).as_posix()
        stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
        if (folder, stem) not in index or mask.stem.endswith("_mask"):
            index[(folder, stem)] = mask
    return index


def plan(
    good_dir: Path,
    defective_dir: Path | None,
    mask_dir: Path | None,
    test_good_fraction: float,
) -> list[tuple[Path, Path, str]]:
    """(source, path inside the category folder, mode) for every image and mask to write."""
    good = image_files(good_dir)
    if not good:
        raise DatasetError(f"no images in {good_dir} (looked for {', '.join(READABLE_EXTENSIONS)})")
    jobs = []
    for image in good:
        rel = image.relative_to(good_dir).as_posix()
        split = "test" if is_test_good(rel, test_good_fraction) else "train"
        jobs.append(image_job(image, Path(split) / "good", Path(rel).with_suffix("").as_posix().replace("/", "__")))

    if defective_dir is not None:
        index = mask_index(mask_dir)
        unmasked = []
        images = image_files(defective_dir)
        if mask_dir.resolve() == defective_dir.resolve():  # masks beside their images: a.png, a_mask.png
            images = [p for p in images if not p.stem.endswith("_mask")]
        for image in images:
            rel = image.relative_to(defective_dir)
            nested = len(rel.parts) > 1
            defect_type = rel.parts[0] if nested else DEFAULT_DEFECT_TYPE
            stem = Path(*rel.parts[1:]).with_suffix("").as_posix().replace("/", "__") if nested else image.stem
            mask = index.get((rel.parent.as_posix(), image.stem)) or index.get((".", image.stem))
            if mask is None:
                unmasked.append(rel.as_posix())
                continue
            jobs.append(image_job(image, Path("test") / defect_type, stem))
            jobs.append((mask, Path("ground_truth") / defect_type / f"{stem}_mask.png", "mask"))
        if unmasked:
            raise DatasetError(
                f"{len(unmasked)} defective images in {defective_dir} have no mask in {mask_dir} "
                f"(expected <same subfolder>/<image stem>[_mask].<any image format>):\n  "
                + "\n  ".join(unmasked[:20]))

    check_unique_destinations(jobs)
    return jobs


def check_unique_destinations(jobs: list[tuple[Path, Path, str]]) -> None:
    """Raise DatasetError when two source files would be written to the same path."""
    seen: dict[Path, Path] = {}
    clashes = [f"{seen[dest]} and {source} -> {dest}"
               for source, dest, _ in jobs if seen.setdefault(dest, source) != source]
    if clashes:
        raise DatasetError("two files would get the same name (e.g. a.png and a.webp):\n  "
                           + "\n  ".join(clashes[:20]))


def check_category_name(category: str) -> None:
    """A category of the user's own is a folder name: nothing that could climb out of data/datasets."""
    if not isinstance(category, str) or not CATEGORY_PATTERN.fullmatch(category):
        raise ValueError(f"category {category!r} must be a folder-safe name (letters, digits, _ . -)")


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    good_dir: str | os.PathLike,
    defective_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    test_good_fraction: float = 0.2,
    raw_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Restructure the user's folders into `out_dir` (replaced whole) and return its manifest.

    `seed` changes nothing: the split is a hash of file names (see the module docstring).
    `raw_dir` and `progress` are accepted like every source's and unused: nothing is downloaded."""
    check_category_name(category)
    if not 0 <= test_good_fraction < 1:
        raise ValueError(f"test_good_fraction must be in [0, 1), got {test_good_fraction!r}")
    folders = {"good_dir": good_dir, "defective_dir": defective_dir, "mask_dir": mask_dir}
    for name, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{name} {folder} is not a folder")
    if (defective_dir is None) != (mask_dir is None):
        raise ValueError("defective_dir and mask_dir go together: defective images need masks")
    jobs = plan(Path(good_dir), None if defective_dir is None else Path(defective_dir),
                None if mask_dir is None else Path(mask_dir), test_good_fraction)
    return write_jobs(out_dir, category, DATASET, jobs, record_inputs=True)
