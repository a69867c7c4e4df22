"""Dataset sources: one module per dataset. Each module has

- `DATASET`, `CATEGORIES` (a tuple, or None when any name is accepted, as for a user folder),
- `RAW`: the official archive (`download.RawArchive`), or None when there is nothing to download,
- `EXPECTED_COUNTS`: category -> {"train/good": n, "test/<defect_type>": n, ...} as published,
- `VIEWS` (optional): named subsets of the test set, e.g. MVTec LOCO's "structural" and "logical",
- `prepare(category, out_dir, *, seed=0, **options) -> manifest DataFrame`, which writes the
  category folder `out_dir` in MVTec layout (atomically, replacing it whole), validates it and
  writes its manifest.

A category name may carry a view, `<category>.<view>` (e.g. `breakfast_box.structural`): the same
category restricted to good test images plus that view's defect types. A view folder is a complete
category folder of its own, so every later step treats it like any category.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import pandas as pd

from ad_models.data.download import RawArchive, fetch_source, resolve_archive
from ad_models.data.ingest import ingested_images, merge_ingested
from ad_models.data.sources import (dagm, folder, magnetic_tile, mvtec_3d, mvtec_ad, mvtec_folder, mvtec_loco, synthetic,
                                    visa)

SOURCES: dict[str, ModuleType] = {
    "synthetic": synthetic, "magnetic_tile": magnetic_tile, "mvtec_ad": mvtec_ad, "mvtec_loco": mvtec_loco,
    "visa": visa, "dagm": dagm, "mvtec_3d": mvtec_3d, "folder": folder, "mvtec_folder": mvtec_folder}
ALL_VIEW = "all"


def source_module(source: str) -> ModuleType:
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; known sources: {', '.join(sorted(SOURCES))}")
    return SOURCES[source]


def split_view(name: str) -> tuple[str, str]:
    """`breakfast_box.structural` -> (`breakfast_box`, `structural`); no view means "all"."""
    category, _, view = name.partition(".")
    return category, view or ALL_VIEW


def views_of(source: str) -> tuple[str, ...]:
    return (ALL_VIEW,) + tuple(getattr(source_module(source), "VIEWS", ()))


def check_category(source: str, name: str) -> None:
    """Raise ValueError saying what is known when `name` (with its view) is not a category of `source`."""
    module = source_module(source)
    category, view = split_view(name)
    known = module.CATEGORIES
    if not category or (known is not None and category not in known):
        raise ValueError(f"unknown category {category!r} for dataset source {source!r}; known: {', '.join(known or ())}")
    if view not in views_of(source):
        raise ValueError(f"unknown view {view!r} of {source}/{category}; known views: {', '.join(views_of(source))}")


def prepare_category(source: str, name: str, out_dir: str | os.PathLike,
                     ingested_dir: str | os.PathLike | None = None, **options) -> pd.DataFrame:
    """Prepare one category (optionally `<category>.<view>`) of one source into `out_dir`; options
    go to that source's `prepare`.

    With `ingested_dir`, a store of `ad_models.data.ingest` holding accepted images, the source
    prepares into the sibling `<out_dir>.staging` and `out_dir` is then built atomically from it
    plus those images in train/good (see `ingest.merge_ingested`); staging is removed afterwards.
    A crash at any point leaves the previous `out_dir` as it was."""
    check_category(source, name)
    category, view = split_view(name)
    if view != ALL_VIEW:
        options["view"] = view
    prepare = source_module(source).prepare
    out_dir = Path(out_dir)
    if ingested_dir is None or ingested_images(ingested_dir).empty:
        return prepare(category, out_dir, **options)
    staging = out_dir.with_name(out_dir.name + ".staging")  # a sibling: same `_raw` beside it, same disk
    try:
        prepare(category, staging, **options)
        return merge_ingested(staging, ingested_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


RAW_OPTIONS = ("source_dir", "archive", "url", "sha256", "md5", "archive_name")


def raw_archive(source: str, options: dict) -> RawArchive | None:
    """The archive a dataset's options describe (the source's official one, overridden)."""
    return resolve_archive(getattr(source_module(source), "RAW", None),
                           **{k: options.get(k) for k in RAW_OPTIONS if k != "source_dir"})


def has_raw(source: str, options: dict) -> bool:
    """Whether the dataset is read from somewhere (a download, an archive, a folder) rather than
    generated or read from folders of the user's own layout. A `source_dir` with `{category}` in it
    is one folder per category, read by the source's `prepare` itself: nothing dataset-wide to fetch."""
    source_dir = options.get("source_dir")
    per_category = bool(source_dir) and "{category}" in str(source_dir)
    return bool((source_dir and not per_category) or raw_archive(source, options))


def fetch_raw(source: str, raw_dir: str | os.PathLike, options: dict, progress: bool = True) -> Path:
    """Download (or take the user's archive or folder), verify and extract: the same extraction the
    source's `prepare` reads."""
    return fetch_source(getattr(source_module(source), "RAW", None), raw_dir, progress=progress,
                        **{k: options.get(k) for k in RAW_OPTIONS})


def expected_counts(source: str, name: str) -> dict[str, int] | None:
    """Published image counts of a category (restricted to its view), or None when unknown."""
    category, view = split_view(name)
    counts = getattr(source_module(source), "EXPECTED_COUNTS", {}).get(category)
    if counts is None or view == ALL_VIEW:
        return counts
    keep = {f"test/{t}" for t in source_module(source).VIEWS[view]}
    return {k: n for k, n in counts.items() if not k.startswith("test/") or k == "test/good" or k in keep}
