"""DAGM 2007 (Weakly Supervised Learning for Industrial Optical Inspection): 10 synthetic texture
classes, `Class1` ... `Class10`, 512x512 grayscale PNGs.

Published layout: `ClassN/{Train,Test}/NNNN.PNG`, with `Label/Labels.txt` listing every image and
`Label/NNNN_label.PNG` the (elliptic, coarse) mask of each defective one. Defect-free Train images
go to `train/good/`, defect-free Test images to `test/good/`, defective Test images to
`test/defect/` (DAGM names no defect types) with their masks as 0/255
`ground_truth/defect/NNNN_mask.png`. The defective Train images are left out by default, so that
the test set is exactly the official one and results compare with published ones;
`train_defects_to_test=True` adds them to `test/defect/` as `train_NNNN.PNG` (Train and Test reuse
the same file names). Images are copied byte for byte.

Labels.txt, as assumed from public loaders (not checked against the publisher's files here): a
first line holding one field (the class number), then one row per image, whitespace separated:
`<id> <0|1 defective> <image file> 0 <mask file>` (the mask field is "0" or absent for defect-free
images). A UTF-8 byte-order mark and a lower-case `labels.txt` are accepted.

The archive's address changes with the publisher's pages, so there is no RAW: pass `url` (and
`sha256` if you know it) of an archive holding the class folders, your own `archive`, or
`source_dir` (a folder holding them, e.g. the per-class zips extracted side by side). The class
folder is found up to three levels down (the Kaggle copy nests `ClassN/ClassN/Train`).

EXPECTED_COUNTS: per the publisher's data description, Class1-6 have 1000 defect-free and 150
defective images in each of Train and Test, Class7-10 have 2000 and 300.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ad_models.data.download import RawArchive, fetch_for_category
from ad_models.data.layout import DatasetError, require_category, write_jobs

DATASET = "dagm"
CATEGORIES: tuple[str, ...] = tuple(f"Class{i}" for i in range(1, 11))
RAW: RawArchive | None = None
DEFECT_TYPE = "defect"
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    name: {"train/good": n, "test/good": n, f"test/{DEFECT_TYPE}": d}
    for name, (n, d) in zip(CATEGORIES, [(1000, 150)] * 6 + [(2000, 300)] * 4)
}


def find_class_dir(source: Path, category: str, depth: int = 3) -> Path:
    """The folder `category` holding Train/ and Test/, at most `depth` levels below `source`."""
    if not source.is_dir():
        raise FileNotFoundError(f"DAGM folder {source} does not exist")
    level, found = [source], []
    for _ in range(depth + 1):
        found += [p for p in level if p.name == category and (p / "Train").is_dir() and (p / "Test").is_dir()]
        level = [q for p in level for q in sorted(p.iterdir()) if q.is_dir()]
    if not found:
        raise FileNotFoundError(f"no {category}/ folder with Train/ and Test/ in {source} "
                                f"(searched {depth} levels down)")
    if len(found) > 1:
        raise ValueError(f"several {category} folders under {source}: {', '.join(map(str, found))}; pass one")
    return found[0]


def _plain_name(name: str, where: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise DatasetError(f"{where}: {name!r} is not a plain file name")
    return name


def read_labels(split_dir: Path) -> list[tuple[str, int, str]]:
    """(image file, 1 if defective, mask file or "") for each row of `<split_dir>/Label/Labels.txt`."""
    label_dir = split_dir / "Label"
    files = [p for p in label_dir.iterdir() if p.name.lower() == "labels.txt"] if label_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{split_dir} has no Label/Labels.txt: not the published DAGM layout")
    path = files[0]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields or (number == 1 and len(fields) == 1):  # blank, or the header (the class number)
            continue
        where = f"{path}, line {number}"
        if len(fields) < 3 or fields[1] not in ("0", "1"):
            raise DatasetError(f"{where}: expected '<id> <0|1> <image file> 0 <mask file>', got {line.strip()!r}")
        defective = int(fields[1])
        mask = fields[4] if defective and len(fields) >= 5 else ""
        if defective and mask in ("", "0"):
            raise DatasetError(f"{where}: a defective image without a mask file name: {line.strip()!r}")
        rows.append((_plain_name(fields[2], where), defective, _plain_name(mask, where) if mask else ""))
    return rows


def plan(class_dir: Path, train_defects_to_test: bool = False) -> list[tuple[Path, Path, str]]:
    """(source, path inside the category folder, mode) for every image and mask to write."""
    jobs: list[tuple[Path, Path, str]] = []
    for split_name, split in (("Train", "train"), ("Test", "test")):
        split_dir = class_dir / split_name
        prefix = "train_" if split == "train" else ""
        for image, defective, mask in read_labels(split_dir):
            if not defective:
                jobs.append((split_dir / image, Path(split) / "good" / image, "copy"))
            elif split == "test" or train_defects_to_test:
                name = prefix + image
                jobs.append((split_dir / image, Path("test") / DEFECT_TYPE / name, "copy"))
                jobs.append((split_dir / "Label" / mask,
                             Path("ground_truth") / DEFECT_TYPE / f"{Path(name).stem}_mask.png", "mask"))
    missing = [str(source.relative_to(class_dir)) for source, _, _ in jobs if not source.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} files listed in {class_dir.name}'s Labels.txt are missing under "
                           f"{class_dir} (incomplete download or extraction?):\n  " + "\n  ".join(missing[:20]))
    return jobs


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: bool = True,
    train_defects_to_test: bool = False,
    **raw_options,
) -> pd.DataFrame:
    """Restructure one class into `out_dir` (replaced whole) and return its manifest.

    Raw data from `source_dir`, `archive`, or `url` checked against `sha256` when given (see
    download.fetch_source). `seed` changes nothing: the official split is kept."""
    require_category(category, CATEGORIES, DATASET)
    out_dir = Path(out_dir)
    source = fetch_for_category(RAW, out_dir, progress=progress, **raw_options)
    jobs = plan(find_class_dir(source, category), train_defects_to_test)

    return write_jobs(out_dir, category, DATASET, jobs)
