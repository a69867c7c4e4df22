"""A user's own dataset already in MVTec AD layout, used as it is: one category per folder.

    train/good/*                          defect-free training images
    validation/good/*                     optional defect-free validation images
    test/good/*, test/<defect_type>/*     test images
    ground_truth/<defect_type>/<stem>_mask.<ext> or <stem>.<ext>   one mask per defective test image

The user's split and defect types are kept exactly: every image goes to the same split and type
folder under the same name (the `folder` source, by contrast, splits good images by a hash).
`source_dir` is that category folder, or a folder holding it as `<category>/`; in params.yaml
`{category}` in it is replaced per category.

Formats as in `folder`: PNG, JPEG, BMP and TIFF images are copied byte for byte, other formats
OpenCV reads are converted to PNG; a mask may be in any of them, its nonzero pixels defective, and
is written as `ground_truth/<defect_type>/<stem>_mask.png`. Good test images need no mask. A
defective image without one is an error, with no option to allow it: the evaluation scores every
pixel of a test image, and the pixels of an unmasked defect would count as good ones. Other files
(notes, masks of no test image, hidden files) are not read.

No checksum pins the user's files, so the category folder records a hash of every file read
(`inputs.json`, see `layout.inputs_digest`). There is no official list of categories (CATEGORIES
is None) and there are no expected counts (EXPECTED_COUNTS is empty).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ad_models.data.layout import DatasetError, listing, write_jobs
from ad_models.data.sources.folder import (READABLE_EXTENSIONS, check_category_name, check_unique_destinations,
                                           image_files, image_job, mask_index)

DATASET = "mvtec_folder"
CATEGORIES: tuple[str, ...] | None = None  # any folder-safe name (folder.CATEGORY_PATTERN)
RAW = None
EXPECTED_COUNTS: dict[str, dict[str, int]] = {}
GOOD = "good"


def find_category_dir(source_dir: Path, category: str) -> Path:
    """`source_dir` when it holds train/, else its `<category>` subfolder when that does."""
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source_dir {source_dir} is not a folder")
    for candidate in (source_dir, source_dir / category):
        if (candidate / "train").is_dir():
            return candidate
    found = ", ".join(sorted(p.name for p in source_dir.iterdir())[:20]) or "(empty)"
    raise DatasetError(f"{source_dir} is not in MVTec layout: it holds no train/ folder, nor does "
                       f"{source_dir / category}; found: {found}")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def plan(category_dir: Path) -> list[tuple[Path, Path, str]]:
    """(source, path inside the category folder, mode) for every image and mask to write. Raises
    DatasetError listing every way the folder departs from the layout (see the module docstring)."""
    problems: list[str] = []
    jobs: list[tuple[Path, Path, str]] = []

    def images_in(folder: Path) -> list[Path]:
        images = image_files(folder)
        nested = [p.relative_to(category_dir).as_posix() for p in images if p.parent != folder]
        if nested:
            problems.append(listing(f"images in subfolders of {folder.relative_to(category_dir)}/, which the "
                                    f"MVTec layout does not have (move them into it)", nested))
        return [p for p in images if p.parent == folder]

    def loose_images(split_dir: Path, belong_in: str) -> None:
        loose = sorted(p.name for p in split_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in READABLE_EXTENSIONS)
        if loose:
            problems.append(listing(f"images directly in {split_dir.name}/ (they belong in {belong_in})", loose))

    for split in ("train", "validation"):  # defect-free images only; validation/ is optional
        split_dir = category_dir / split
        if not split_dir.is_dir():
            continue
        loose_images(split_dir, f"{split}/{GOOD}/")
        others = [p.name for p in _subfolders(split_dir) if p.name != GOOD]
        if others:
            problems.append(f"  {split}/ holds {others}: only {split}/{GOOD}/ belongs there (defect-free "
                            f"images); defective images go in test/<defect_type>/")
        good_dir = split_dir / GOOD
        if not good_dir.is_dir():
            if split == "train":
                problems.append(f"  train/{GOOD}/ does not exist: the defect-free training images go there")
            continue
        images = images_in(good_dir)
        if split == "train" and not images:
            problems.append(f"  train/{GOOD}/ holds no images (looked for {', '.join(READABLE_EXTENSIONS)})")
        jobs += [image_job(p, Path(split) / GOOD, p.stem) for p in images]

    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        problems.append(f"  test/ does not exist: the test images go in test/{GOOD}/ and test/<defect_type>/")
    else:
        loose_images(test_dir, f"test/{GOOD}/ or test/<defect_type>/")
        no_ground_truth, unmasked = [], []
        for type_dir in _subfolders(test_dir):
            defect_type = type_dir.name
            images = images_in(type_dir)
            jobs += [image_job(p, Path("test") / defect_type, p.stem) for p in images]
            if defect_type == GOOD or not images:
                continue
            truth_dir = category_dir / "ground_truth" / defect_type
            if not truth_dir.is_dir():
                no_ground_truth.append(f"test/{defect_type}/ ({len(images)} images) has no ground_truth/{defect_type}/")
                continue
            masks = mask_index(truth_dir)
            for image in images:
                mask = masks.get((".", image.stem))
                if mask is None:
                    unmasked.append(f"test/{defect_type}/{image.name} (no ground_truth/{defect_type}/"
                                    f"{image.stem}_mask.* or {image.stem}.*)")
                    continue
                jobs.append((mask, Path("ground_truth") / defect_type / f"{image.stem}_mask.png", "mask"))
        if no_ground_truth:
            problems.append(listing("defect type folders without ground truth (one mask per image, "
                                    "<stem>_mask.<ext> or <stem>.<ext>)", no_ground_truth))
        if unmasked:
            problems.append(listing("defective test images without a mask", unmasked))

    if problems:
        raise DatasetError(f"{category_dir} is not usable in MVTec layout as it is:\n" + "\n".join(problems))
    check_unique_destinations(jobs)
    return jobs


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    source_dir: str | os.PathLike,
    raw_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Copy the user's category folder into `out_dir` (replaced whole), validate it, record a hash of
    what was read, and return its manifest.

    `seed` changes nothing (the user's split is kept); `raw_dir` and `progress` are accepted like
    every source's and unused: nothing is downloaded or extracted."""
    check_category_name(category)
    jobs = plan(find_category_dir(Path(source_dir), category))
    return write_jobs(out_dir, category, DATASET, jobs, record_inputs=True)
