"""Dataset sources: one module per dataset, each with `CATEGORIES` and
`prepare(category, out_dir, *, seed=0, **options) -> manifest DataFrame`, which writes the
category folder `out_dir` in MVTec layout (atomically, replacing it whole), validates it and
writes its manifest."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ad_models.data.sources import magnetic_tile, synthetic

SOURCES = {"synthetic": synthetic, "magnetic_tile": magnetic_tile}


def prepare_category(source: str, category: str, out_dir: str | os.PathLike, **options) -> pd.DataFrame:
    """Prepare one category of one source into `out_dir`; options go to that source's `prepare`."""
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; known sources: {', '.join(sorted(SOURCES))}")
    module = SOURCES[source]
    if category not in module.CATEGORIES:
        raise ValueError(
            f"unknown category {category!r} for dataset source {source!r}; known: {', '.join(module.CATEGORIES)}"
        )
    return module.prepare(category, Path(out_dir), **options)
