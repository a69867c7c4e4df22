"""MVTec LOCO AD (Bergmann, Batzner, Fauser, Sattlegger, Steger, IJCV 2022, "Beyond Dents and
Scratches"), restructured into our MVTec layout, one category per folder.

Published layout, inside `mvtec_loco_anomaly_detection/<category>/`:

    train/good/000.png ...                     defect-free training images
    validation/good/000.png ...                defect-free validation images (our "validation" split)
    test/{good,logical_anomalies,structural_anomalies}/000.png ...
    ground_truth/{logical_anomalies,structural_anomalies}/<id>/000.png, 001.png ...
    defects_config.json

A defective test image `test/<type>/<id>.png` has a ground-truth FOLDER `ground_truth/<type>/<id>/`
with one single-channel PNG per defect region, whose pixels are 0 or the defect's `pixel_value`
from `defects_config.json` (a list of {defect_name, pixel_value, saturation_threshold,
relative_saturation}). We copy every image byte for byte, keep those folders and the config
unchanged (the official sPRO needs them) and add `ground_truth/<type>/<id>_mask.png`, the union of
the regions as a 0/255 PNG, which the manifest points to for pixel AUROC and AUPRO.

defect_type is `logical_anomalies` or `structural_anomalies`. The views "structural" (good +
structural, as ESAD trains and tests) and "logical" (good + logical) are category folders of their
own, written by `prepare(..., view=...)` with the other kind left out.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd

from ad_models.data.download import RawArchive, fetch_for_category
from ad_models.data.layout import DatasetError, is_image_file, read_image_file, require_category, write_category

DATASET = "mvtec_loco"
CATEGORIES: tuple[str, ...] = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
DEFECT_TYPES: tuple[str, ...] = ("logical_anomalies", "structural_anomalies")
# Named subsets of the test set: good images plus these defect types ("all" keeps both).
VIEWS: dict[str, tuple[str, ...]] = {"structural": ("structural_anomalies",), "logical": ("logical_anomalies",)}
ARCHIVE_ROOT = "mvtec_loco_anomaly_detection"  # the one top-level folder of the published archive
DEFECTS_CONFIG = "defects_config.json"

RAW = RawArchive(
    url="https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/430647091-1646842701/"
    "mvtec_loco_anomaly_detection.tar.xz",
    filename="mvtec_loco_anomaly_detection.tar.xz",
    sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
)

# Images per folder, from the dataset paper (Bergmann et al. 2022, its table of the dataset); the
# per-category test totals (275, 330, 310, 341, 312) and the split totals (1772 train, 304
# validation, 1568 test) are repeated by other tools. One exception, not verified here:
# splicing_connectors train/validation, 354/59 in the paper, is 360/60 in a LOCO loader that
# checks these counts against the extracted files (J. P. C. Bertoldo's, written for anomalib,
# noting "these two below were wrong in the paper"). We follow the files, which is what the asset
# check compares against; if that check reports 354 and 59 on the real archive, the paper was right.
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "breakfast_box": {"train/good": 351, "validation/good": 62, "test/good": 102,
                      "test/logical_anomalies": 83, "test/structural_anomalies": 90},
    "juice_bottle": {"train/good": 335, "validation/good": 54, "test/good": 94,
                     "test/logical_anomalies": 142, "test/structural_anomalies": 94},
    "pushpins": {"train/good": 372, "validation/good": 69, "test/good": 138,
                 "test/logical_anomalies": 91, "test/structural_anomalies": 81},
    "screw_bag": {"train/good": 360, "validation/good": 60, "test/good": 122,
                  "test/logical_anomalies": 137, "test/structural_anomalies": 82},
    "splicing_connectors": {"train/good": 360, "validation/good": 60, "test/good": 119,
                            "test/logical_anomalies": 108, "test/structural_anomalies": 85},
}

_GOOD_FOLDERS = ("train/good", "validation/good", "test/good")
_MAX_LISTED = 20


# ------------------------------------------------------------------ defects_config.json


@dataclass(frozen=True)
class DefectConfig:
    """One entry of a category's defects_config.json."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def read_defects_config(category_dir: str | os.PathLike) -> dict[int, DefectConfig]:
    """`<category_dir>/defects_config.json` as {pixel_value: DefectConfig}, checked as the official
    evaluation checks it (pixel values 1..255, relative thresholds in (0, 1])."""
    path = Path(category_dir) / DEFECTS_CONFIG
    if not path.is_file():
        raise DatasetError(f"{path} not found: every MVTec LOCO category folder has one (sPRO needs it)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        configs = [
            DefectConfig(str(e["defect_name"]), e["pixel_value"], e["saturation_threshold"], e["relative_saturation"])
            for e in entries
        ]
    except (ValueError, TypeError, KeyError) as e:
        raise DatasetError(
            f"{path} is not a list of {{defect_name, pixel_value, saturation_threshold, "
            f"relative_saturation}} objects: {e!r}"
        ) from None
    by_value: dict[int, DefectConfig] = {}
    for c in configs:
        if type(c.pixel_value) is not int or not 1 <= c.pixel_value <= 255:
            raise DatasetError(f"{path}: {c.defect_name} has pixel_value {c.pixel_value!r}, expected an int in 1..255")
        if type(c.relative_saturation) is not bool:
            raise DatasetError(f"{path}: {c.defect_name} has relative_saturation {c.relative_saturation!r}, "
                               "expected true or false")
        threshold = c.saturation_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0 or (
            c.relative_saturation and threshold > 1
        ):
            limits = "in (0, 1] (relative)" if c.relative_saturation else "> 0 (pixels)"
            raise DatasetError(f"{path}: {c.defect_name} has saturation_threshold {threshold!r}, expected {limits}")
        if c.pixel_value in by_value:
            raise DatasetError(f"{path}: pixel_value {c.pixel_value} is used by both "
                               f"{by_value[c.pixel_value].defect_name} and {c.defect_name}")
        by_value[c.pixel_value] = c
    return by_value


# ------------------------------------------------------------------ ground-truth regions


def _region_pngs(folder: Path) -> list[Path]:
    # The official evaluation reads sorted(glob("*.png")), one channel per file.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _read_region(path: Path, defects: dict[int, DefectConfig]) -> tuple[np.ndarray, DefectConfig]:
    """One region PNG as (bool mask, its DefectConfig); its pixels must be 0 or one defect id."""
    array = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DatasetError(f"cannot decode ground-truth region {path}")
    if array.ndim != 2:
        raise DatasetError(f"ground-truth region {path} has {array.shape[2]} channels, expected one "
                           "(pixel value = defect id)")
    values = np.unique(array)
    ids = values[values != 0]
    if ids.size != 1:
        found = "no defect pixel" if ids.size == 0 else f"several defect ids {ids.tolist()[:10]}"
        raise DatasetError(f"ground-truth region {path} has {found}; expected exactly one non-zero value")
    defect_id = int(ids[0])
    if defect_id not in defects:
        raise DatasetError(f"ground-truth region {path} has pixel value {defect_id}, which "
                           f"{DEFECTS_CONFIG} does not list (known: {sorted(defects)})")
    return array != 0, defects[defect_id]


class SproRegion(NamedTuple):
    """One defect region for sPRO: where it is, and how many detected pixels saturate it."""

    mask: np.ndarray  # bool [H, W]
    saturation_area: float  # pixels


def _region_folder(category_dir: Path, mask: str | os.PathLike) -> Path:
    path = Path(mask)
    if not path.is_absolute():
        path = category_dir / path
    if path.is_dir():
        return path
    name = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
    return path.with_name(name)


def _check_region_size(size) -> tuple[int, int] | None:
    def positive_int(x) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0

    if size is None:
        return None
    if positive_int(size):
        return int(size), int(size)
    if isinstance(size, tuple) and len(size) == 2 and all(positive_int(s) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be None, a positive int or (height, width), got {size!r}")


def load_spro_regions(
    category_dir: str | os.PathLike,
    mask: str | os.PathLike,
    *,
    size: int | tuple[int, int] | None = None,
) -> list[SproRegion]:
    """The sPRO regions of one test image, from its per-region folder ground_truth/<type>/<id>/.

    `mask` is the manifest's mask_path (`ground_truth/<type>/<id>_mask.png`, absolute or relative
    to `category_dir`) or the region folder itself; an empty `mask` (a good image) gives [].
    `size` is None (the PNGs' own resolution), an int (size x size, like the data loader) or
    (height, width).

    The saturation area follows the official MVTec LOCO evaluation (GroundTruthChannel.
    get_saturation_area): relative_saturation -> int(saturation_threshold * region area), else
    min(saturation_threshold, region area). At another size the region is resized nearest-neighbour
    (as the loader resizes masks), the region area is counted after resizing, and an absolute
    threshold is scaled by the ratio of image areas (new H*W / original H*W) before the min. A
    region too thin to survive nearest-neighbour resizing is kept as every pixel it covers at all,
    so that every defect still counts once in the mean, as at full resolution. A saturation area
    below one pixel becomes one pixel (the official code would divide by zero there).
    """
    category_dir = Path(category_dir)
    requested = _check_region_size(size)
    if not str(mask):
        return []
    folder = _region_folder(category_dir, mask)
    if not folder.is_dir():
        raise DatasetError(f"ground-truth region folder {folder} does not exist (expected one PNG per defect "
                           f"region in ground_truth/<type>/<id>/)")
    pngs = _region_pngs(folder)
    if not pngs:
        raise DatasetError(f"ground-truth region folder {folder} contains no PNG")
    defects = read_defects_config(category_dir)
    regions = []
    for png in pngs:
        full, config = _read_region(png, defects)
        height, width = full.shape
        target = requested or (height, width)
        region = full
        if target != (height, width):
            dsize = (target[1], target[0])  # cv2 wants (width, height)
            region = cv2.resize(full.astype(np.uint8), dsize, interpolation=cv2.INTER_NEAREST).astype(bool)
            if not region.any():  # a thin defect that nearest-neighbour sampling missed entirely
                region = cv2.resize(full.astype(np.float32), dsize, interpolation=cv2.INTER_AREA) > 0
        area = int(region.sum())
        if config.relative_saturation:
            saturation = float(int(config.saturation_threshold * area))
        else:
            scale = (target[0] * target[1]) / (height * width)
            saturation = min(config.saturation_threshold * scale, float(area))
        regions.append(SproRegion(region, max(saturation, 1.0)))
    return regions


# ------------------------------------------------------------------ restructuring


def find_source_root(source_dir: str | os.PathLike, category: str) -> Path:
    """The folder holding the category folders: `source_dir` or one of its subfolders (the
    archive's mvtec_loco_anomaly_detection/)."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"MVTec LOCO source folder {source_dir} does not exist")
    candidates = [source_dir] + sorted(p for p in source_dir.iterdir() if p.is_dir())
    roots = [p for p in candidates if (p / category / "train" / "good").is_dir()]
    if not roots:
        raise FileNotFoundError(
            f"no {category}/train/good in {source_dir} or its subfolders: expected the published layout "
            f"{ARCHIVE_ROOT}/{category}/{{train,validation,test,ground_truth}} (download {RAW.url} and extract it)"
        )
    if len(roots) > 1:
        raise ValueError(f"several MVTec LOCO copies under {source_dir}: {', '.join(map(str, roots))}; pass one")
    return roots[0]


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


def _listing(title: str, items: list[str]) -> str:
    lines = [f"  {len(items)} {title}:"] + [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return "\n".join(lines)


def _check_ground_truth(source: Path, defect_types: tuple[str, ...]) -> None:
    """Every defective test image has a non-empty region folder and every region folder an image;
    raise DatasetError listing all mismatches at once."""
    missing, empty, orphans = [], [], []
    for defect_type in defect_types:
        stems = {p.stem for p in _images(source / "test" / defect_type)}
        gt_dir = source / "ground_truth" / defect_type
        folders = {p.name for p in gt_dir.iterdir() if p.is_dir()} if gt_dir.is_dir() else set()
        missing += [f"ground_truth/{defect_type}/{s}/ (for test/{defect_type}/{s})" for s in sorted(stems - folders)]
        empty += [f"ground_truth/{defect_type}/{s}/" for s in sorted(stems & folders)
                  if not _region_pngs(gt_dir / s)]
        orphans += [f"ground_truth/{defect_type}/{s}/" for s in sorted(folders - stems)]
    problems = []
    if missing:
        problems.append(_listing("defective test images without a ground-truth folder", missing))
    if empty:
        problems.append(_listing("ground-truth folders without any region PNG", empty))
    if orphans:
        problems.append(_listing("ground-truth folders without a test image", orphans))
    if problems:
        raise DatasetError(f"MVTec LOCO category {source} has incomplete ground truth:\n" + "\n".join(problems))


def _merge_regions(job: tuple[Path, Path, dict[int, DefectConfig]]) -> None:
    """Write the union of one image's region PNGs as a 0/255 mask."""
    folder, mask_path, defects = job
    union = None
    for png in _region_pngs(folder):
        region, _ = _read_region(png, defects)
        if union is not None and region.shape != union.shape:
            raise DatasetError(f"ground-truth region {png} is {region.shape[1]}x{region.shape[0]}, but the other "
                               f"regions of {folder} are {union.shape[1]}x{union.shape[0]}")
        union = region if union is None else union | region
    ok, encoded = cv2.imencode(".png", np.where(union, 255, 0).astype(np.uint8))
    if not ok:
        raise DatasetError(f"cannot encode the merged mask {mask_path}")
    mask_path.write_bytes(encoded.tobytes())


def _restructure(source: Path, out: Path, defect_types: tuple[str, ...]) -> None:
    _check_ground_truth(source, defect_types)  # before copying anything: a truncated copy fails fast
    folders = _GOOD_FOLDERS + tuple(f"test/{t}" for t in defect_types)
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for image in _images(source / folder):
            shutil.copyfile(image, out / folder / image.name)
    shutil.copyfile(source / DEFECTS_CONFIG, out / DEFECTS_CONFIG)
    defects = read_defects_config(out)
    jobs = []
    for defect_type in defect_types:
        (out / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
        for image in _images(source / "test" / defect_type):
            folder = out / "ground_truth" / defect_type / image.stem
            shutil.copytree(source / "ground_truth" / defect_type / image.stem, folder)
            jobs.append((folder, folder.with_name(f"{image.stem}_mask.png"), defects))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # cv2 releases the GIL
        list(pool.map(_merge_regions, jobs))


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: bool = True,
    view: str = "all",
    **raw_options,
) -> pd.DataFrame:
    """Restructure one category into `out_dir` (the category folder, replaced whole) and return
    its manifest.

    The data comes from `source_dir` (an extracted copy), else `archive` (the .tar.xz you already
    have), else a download of `url` (default: the publisher's) into `raw_dir` (default
    `<out_dir>/../_raw`), verified against `sha256` (default: the published sum, also for a `url`
    of a mirror). `view` "structural" or "logical" keeps only that kind of defective test image.

    `seed` is accepted like every source's but changes nothing: LOCO's splits are fixed."""
    require_category(category, CATEGORIES, DATASET)
    if view != "all" and view not in VIEWS:
        raise ValueError(f"unknown mvtec_loco view {view!r}; known: all, {', '.join(VIEWS)}")
    defect_types = DEFECT_TYPES if view == "all" else VIEWS[view]
    out_dir = Path(out_dir)
    extracted = fetch_for_category(RAW, out_dir, progress=progress, **raw_options)
    source = find_source_root(extracted, category) / category
    if not (source / DEFECTS_CONFIG).is_file():
        raise DatasetError(f"{source / DEFECTS_CONFIG} not found: incomplete copy of MVTec LOCO "
                           f"(every category folder has one)")
    return write_category(out_dir, category, DATASET, lambda tmp: _restructure(source, tmp, defect_types))
