"""VisA, the Visual Anomaly dataset (Zou et al., ECCV 2022): 12 categories, split by its 1-class CSV.

Published layout: `split_csv/1cls.csv` (columns object,split,label,image,mask; label normal or
anomaly; paths relative to the dataset root), images `<category>/Data/Images/{Normal,Anomaly}/*.JPG`
and masks `<category>/Data/Masks/Anomaly/*.png` whose defective pixels are 1. Normal images go to
`<split>/good/`, anomalies to `test/anomaly/` (the 1-class split has no finer defect type) with
their masks rewritten as 0/255 `ground_truth/anomaly/<stem>_mask.png`. The large JPGs are copied
byte for byte.

Assumed about the real archive (as anomalib's and the publishers' own preparation scripts read it,
not checked against a download here): `split_csv/` and the category folders sit at the top level
of the tar (a copy one folder further down is found too); any nonzero mask pixel is defective.

EXPECTED_COUNTS: the 1-class split per category (train normal, test normal, test anomalies), as
published by the authors and mirrored per category elsewhere: 9621 normal and 1200 anomalous
images in total, 100 anomalies per category.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

import pandas as pd

from ad_models.data.download import RawArchive, fetch_for_category
from ad_models.data.layout import DatasetError, require_category, write_jobs

DATASET = "visa"
CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
RAW = RawArchive(
    url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
    filename="VisA_20220922.tar",
    sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
)
SPLIT_CSV = PurePosixPath("split_csv/1cls.csv")
CSV_COLUMNS = ["object", "split", "label", "image", "mask"]
DEFECT_TYPE = "anomaly"


def _counts(train: int, test_good: int) -> dict[str, int]:
    return {"train/good": train, "test/good": test_good, f"test/{DEFECT_TYPE}": 100}


EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "candle": _counts(900, 100),
    "capsules": _counts(542, 60),
    "cashew": _counts(450, 50),
    "chewinggum": _counts(453, 50),
    "fryum": _counts(450, 50),
    "macaroni1": _counts(900, 100),
    "macaroni2": _counts(900, 100),
    "pcb1": _counts(904, 100),
    "pcb2": _counts(901, 100),
    "pcb3": _counts(905, 101),
    "pcb4": _counts(904, 101),
    "pipe_fryum": _counts(450, 50),
}


def find_root(source: Path) -> Path:
    """The folder holding `split_csv/1cls.csv`: `source` itself or one of its subfolders."""
    if not source.is_dir():
        raise FileNotFoundError(f"VisA folder {source} does not exist")
    roots = [p for p in [source, *sorted(q for q in source.iterdir() if q.is_dir())] if (p / SPLIT_CSV).is_file()]
    if not roots:
        raise FileNotFoundError(f"no {SPLIT_CSV} in {source} or its subfolders: not the published VisA layout")
    if len(roots) > 1:
        raise ValueError(f"several VisA copies under {source}: {', '.join(map(str, roots))}; pass one")
    return roots[0]


def read_split(root: Path, category: str) -> list[dict[str, str]]:
    """The rows of `split_csv/1cls.csv` for one category, checked."""
    with open(root / SPLIT_CSV, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != CSV_COLUMNS:
            raise DatasetError(f"{root / SPLIT_CSV}: columns must be {CSV_COLUMNS}, got {reader.fieldnames}")
        rows = [row for row in reader if row["object"] == category]
    bad = [f"{r['image']}: split {r['split']!r}, label {r['label']!r}" for r in rows
           if r["split"] not in ("train", "test") or r["label"] not in ("normal", "anomaly")
           or (r["label"] == "anomaly" and (r["split"] != "test" or not r["mask"]))]
    if bad:
        raise DatasetError(f"{root / SPLIT_CSV}: rows of {category} that a 1-class split cannot hold "
                           f"(split train/test; anomalies only in test, with a mask):\n  " + "\n  ".join(bad[:20]))
    if not rows:
        raise DatasetError(f"{root / SPLIT_CSV} has no rows for {category!r}")
    # the CSV comes from a downloaded archive: never let it point outside the dataset
    outside = [p for r in rows for p in (r["image"], r["mask"])
               if p and (PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts)]
    if outside:
        raise DatasetError(f"{root / SPLIT_CSV}: paths must stay inside the dataset folder: {outside[:5]}")
    return rows


def plan(root: Path, category: str) -> list[tuple[Path, Path, str]]:
    """(source, path inside the category folder, mode) for every image and mask to write."""
    jobs: list[tuple[Path, Path, str]] = []
    for row in read_split(root, category):
        image = root / row["image"]
        if row["label"] == "normal":
            jobs.append((image, Path(row["split"]) / "good" / image.name, "copy"))
        else:
            jobs.append((image, Path("test") / DEFECT_TYPE / image.name, "copy"))
            jobs.append((root / row["mask"], Path("ground_truth") / DEFECT_TYPE / f"{image.stem}_mask.png", "mask"))
    missing = [str(source.relative_to(root)) for source, _, _ in jobs if not source.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} files listed in {SPLIT_CSV} for {category} are missing under {root} "
                           f"(incomplete download or extraction?):\n  " + "\n  ".join(missing[:20]))
    clashes = len({dest for _, dest, _ in jobs}) != len(jobs)
    if clashes:
        raise DatasetError(f"{SPLIT_CSV} lists two {category} images with the same file name in one folder")
    return jobs


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: bool = True,
    **raw_options,
) -> pd.DataFrame:
    """Restructure one category into `out_dir` (replaced whole) by the 1-class split; return its manifest.

    Raw data as for mvtec_ad.prepare. `seed` changes nothing: the official split is kept."""
    require_category(category, CATEGORIES, DATASET)
    out_dir = Path(out_dir)
    source = fetch_for_category(RAW, out_dir, progress=progress, **raw_options)
    jobs = plan(find_root(source), category)

    return write_jobs(out_dir, category, DATASET, jobs)
