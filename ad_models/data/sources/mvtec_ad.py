"""MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021): 15 categories, already in our layout.

Published layout, kept as is: `<category>/train/good/NNN.png`, `<category>/test/<defect_type>/NNN.png`
and one mask per defective test image, `<category>/ground_truth/<defect_type>/NNN_mask.png`.
Images are copied byte for byte; masks are copied when they already are single-channel 0/255
PNGs (the published ones are) and rewritten as such otherwise.

Assumed about the real archive (not checked against a download here): the tar.xz holds the
category folders at its top level beside license/readme files (as anomalib's loader expects);
a copy one folder further down (`<source_dir>/mvtec_anomaly_detection/<category>`) is found too.

EXPECTED_COUNTS: the per-defect-type image counts of the published dataset (train 3629, test 1725
images in total). Per-type counts of bottle, cable, capsule, grid, metal_nut, pill, screw, tile,
toothbrush, transistor and zipper were checked against independent public code that counts the
real folders; carpet, hazelnut, leather and wood per-type counts come from the dataset's listing
and agree with the published per-category totals.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ad_models.data.download import RawArchive, fetch_for_category
from ad_models.data.layout import DatasetError, is_image_file, require_category, write_jobs

DATASET = "mvtec_ad"
CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
RAW = RawArchive(
    url="https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
        "420938113-1629960298/mvtec_anomaly_detection.tar.xz",
    filename="mvtec_anomaly_detection.tar.xz",
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
)


def _counts(train: int, test_good: int, **defects: int) -> dict[str, int]:
    return {"train/good": train, "test/good": test_good, **{f"test/{k}": n for k, n in defects.items()}}


EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "bottle": _counts(209, 20, broken_large=20, broken_small=22, contamination=21),
    "cable": _counts(224, 58, bent_wire=13, cable_swap=12, combined=11, cut_inner_insulation=14,
                     cut_outer_insulation=10, missing_cable=12, missing_wire=10, poke_insulation=10),
    "capsule": _counts(219, 23, crack=23, faulty_imprint=22, poke=21, scratch=23, squeeze=20),
    "carpet": _counts(280, 28, color=19, cut=17, hole=17, metal_contamination=17, thread=19),
    "grid": _counts(264, 21, bent=12, broken=12, glue=11, metal_contamination=11, thread=11),
    "hazelnut": _counts(391, 40, crack=18, cut=17, hole=18, print=17),
    "leather": _counts(245, 32, color=19, cut=19, fold=17, glue=19, poke=18),
    "metal_nut": _counts(220, 22, bent=25, color=22, flip=23, scratch=23),
    "pill": _counts(267, 26, color=25, combined=17, contamination=21, crack=26, faulty_imprint=19,
                    pill_type=9, scratch=24),
    "screw": _counts(320, 41, manipulated_front=24, scratch_head=24, scratch_neck=25, thread_side=23,
                     thread_top=23),
    "tile": _counts(230, 33, crack=17, glue_strip=18, gray_stroke=16, oil=18, rough=15),
    "toothbrush": _counts(60, 12, defective=30),
    "transistor": _counts(213, 60, bent_lead=10, cut_lead=10, damaged_case=10, misplaced=10),
    "wood": _counts(247, 19, color=8, combined=11, hole=10, liquid=10, scratch=21),
    "zipper": _counts(240, 32, broken_teeth=19, combined=16, fabric_border=17, fabric_interior=16,
                      rough=17, split_teeth=18, squeezed_teeth=16),
}


def find_category_dir(root: Path, category: str, must_contain: tuple[str, ...] = ("train", "test")) -> Path:
    """The category folder: `<root>/<category>`, `<root>/<one folder>/<category>` or `root`
    itself when it is named `category`; it must hold the folders `must_contain`."""
    if not root.is_dir():
        raise FileNotFoundError(f"raw data folder {root} does not exist")
    candidates = [root / category] + sorted(p / category for p in root.iterdir() if p.is_dir())
    found = [p for p in candidates if p.is_dir()] or ([root] if root.name == category else [])
    if not found:
        listing = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "(empty)"
        raise FileNotFoundError(f"no {category!r} folder in {root} or its subfolders; found: {listing}")
    if len(found) > 1:
        raise ValueError(f"several {category!r} folders under {root}: {', '.join(map(str, found))}; pass one")
    missing = [name for name in must_contain if not (found[0] / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{found[0]} lacks {', '.join(f'{m}/' for m in missing)}: not the published layout")
    return found[0]


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


def plan(category_dir: Path) -> list[tuple[Path, Path, str]]:
    """(source, path inside the category folder, mode) for every image and mask to write."""
    jobs: list[tuple[Path, Path, str]] = []
    train_good = category_dir / "train" / "good"
    if not train_good.is_dir():
        raise FileNotFoundError(f"{train_good} does not exist: not the published MVTec AD layout")
    jobs += [(p, Path("train/good") / p.name, "copy") for p in _images(train_good)]
    unmasked = []
    for type_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for image in _images(type_dir):
            jobs.append((image, Path("test") / defect_type / image.name, "copy"))
            if defect_type == "good":
                continue
            mask = category_dir / "ground_truth" / defect_type / f"{image.stem}_mask.png"
            if not mask.is_file():
                unmasked.append(f"{image} (no {mask.relative_to(category_dir)})")
                continue
            jobs.append((mask, Path("ground_truth") / defect_type / mask.name, "mask"))
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
    """Restructure one category into `out_dir` (replaced whole) and return its manifest.

    The raw data come from `source_dir` (an extracted copy), `archive` (the downloaded archive)
    or a download; `raw_options` are source_dir, archive, url, sha256, md5, archive_name and
    raw_dir (see `download.fetch_for_category`). `seed` changes nothing: the official split is kept."""
    require_category(category, CATEGORIES, DATASET)
    out_dir = Path(out_dir)
    root = fetch_for_category(RAW, out_dir, progress=progress, **raw_options)
    jobs = plan(find_category_dir(root, category))

    return write_jobs(out_dir, category, DATASET, jobs)
