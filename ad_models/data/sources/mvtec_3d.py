"""MVTec 3D-AD (Bergmann et al., VISAPP 2022), RGB images only: 10 categories.

Published layout: `<category>/{train,validation,test}/<defect_type>/{rgb,gt,xyz}/NNN.png|tiff`
(train and validation hold only `good`). We take `rgb/NNN.png` as the image and, for defective
test images, `gt/NNN.png` as the mask (written as 0/255 `ground_truth/<defect_type>/NNN_mask.png`);
the point clouds (`xyz/`) are ignored, and so are the all-zero `gt/` of the good test images.
`validation/good` becomes our `validation/good`.

Assumed about the real archive (not checked against a download here): the category folders sit at
the top level of the tar.xz (as anomalib's loader expects), beside license/readme files; each
category may also hold a `calibration/` folder, which is ignored; gt masks are PNGs whose nonzero
pixels are defective.

EXPECTED_COUNTS: train, validation and good-test counts per category and the number of defective
test images of all types together ("test/*"), as in the dataset paper's table (2656 train,
294 validation, 1197 test images in total). The per-defect-type counts are not given: we could not
verify them, so a missing defect type shows up only as a short "test/*" total.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ad_models.data.download import RawArchive, fetch_for_category
from ad_models.data.layout import ANY_DEFECT, DatasetError, require_category, write_jobs
from ad_models.data.sources.mvtec_ad import find_category_dir

DATASET = "mvtec_3d"
CATEGORIES: tuple[str, ...] = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire",
)
RAW = RawArchive(
    url="https://www.mydrive.ch/shares/150646/25de33f1276dd418cd856f2f48a84cdb/download/"
        "428824485-1643299897/mvtec_3d_anomaly_detection.tar.xz",
    filename="mvtec_3d_anomaly_detection.tar.xz",
    md5="d8bb2800fbf3ac88e798da6ae10dc819",
)
# the defect types of each category, for the reader; counts are checked as one total (see above)
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "bagel": ("combined", "contamination", "crack", "hole"),
    "cable_gland": ("bent", "cut", "hole", "thread"),
    "carrot": ("combined", "contamination", "crack", "cut", "hole"),
    "cookie": ("combined", "contamination", "crack", "hole"),
    "dowel": ("bent", "combined", "contamination", "cut"),
    "foam": ("color", "combined", "contamination", "cut"),
    "peach": ("combined", "contamination", "cut", "hole"),
    "potato": ("combined", "contamination", "cut", "hole"),
    "rope": ("contamination", "cut", "open"),
    "tire": ("combined", "contamination", "cut", "hole"),
}


def _counts(train: int, validation: int, test_good: int, defective: int) -> dict[str, int]:
    return {"train/good": train, "validation/good": validation, "test/good": test_good, ANY_DEFECT: defective}


EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "bagel": _counts(244, 22, 22, 88),
    "cable_gland": _counts(223, 23, 21, 87),
    "carrot": _counts(286, 29, 28, 131),
    "cookie": _counts(210, 22, 28, 103),
    "dowel": _counts(288, 34, 26, 104),
    "foam": _counts(236, 27, 20, 80),
    "peach": _counts(361, 42, 26, 106),
    "potato": _counts(300, 33, 22, 92),
    "rope": _counts(298, 33, 32, 69),
    "tire": _counts(210, 29, 25, 87),
}


def _rgb_images(type_dir: Path) -> list[Path]:
    rgb = type_dir / "rgb"
    if not rgb.is_dir():
        raise FileNotFoundError(f"{type_dir} has no rgb/ folder: not the published MVTec 3D-AD layout")
    return sorted((p for p in rgb.iterdir() if p.is_file() and p.suffix.lower() == ".png"), key=lambda p: p.name)


def plan(category_dir: Path) -> list[tuple[Path, Path, str]]:
    """(source, path inside the category folder, mode) for every image and mask to write."""
    jobs: list[tuple[Path, Path, str]] = []
    for split in ("train", "validation"):
        good = category_dir / split / "good"
        if good.is_dir():
            jobs += [(p, Path(split) / "good" / p.name, "copy") for p in _rgb_images(good)]
        others = sorted(p.name for p in (category_dir / split).glob("*") if p.is_dir() and p.name != "good")
        if others:
            raise DatasetError(f"{category_dir / split} holds {others}: only good/ is expected there")
    unmasked = []
    for type_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for image in _rgb_images(type_dir):
            jobs.append((image, Path("test") / defect_type / image.name, "copy"))
            if defect_type == "good":
                continue
            mask = type_dir / "gt" / image.name
            if not mask.is_file():
                unmasked.append(f"{image} (no {mask.relative_to(category_dir)})")
                continue
            jobs.append((mask, Path("ground_truth") / defect_type / f"{image.stem}_mask.png", "mask"))
    if unmasked:
        raise DatasetError(f"{len(unmasked)} defective test images in {category_dir} have no mask:\n  "
                           + "\n  ".join(unmasked[:20]))
    return jobs


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: bool = True,
    **raw_options,
) -> pd.DataFrame:
    """Restructure one category (RGB only) into `out_dir` (replaced whole) and return its manifest.

    Raw data as for mvtec_ad.prepare; the official archive is checked by its published md5.
    `seed` changes nothing: the official split is kept."""
    require_category(category, CATEGORIES, DATASET)
    out_dir = Path(out_dir)
    root = fetch_for_category(RAW, out_dir, progress=progress, **raw_options)
    jobs = plan(find_category_dir(root, category, must_contain=("train", "test")))

    return write_jobs(out_dir, category, DATASET, jobs)
