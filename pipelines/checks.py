"""Asset checks: data sanity on datasets, a regression floor on evaluations.

They run inside the asset's own step (declared as `check_specs`), so `adpipe materialize`, the UI
and `dvc repro` all record them.
"""
from __future__ import annotations

import math
from pathlib import Path

import dagster as dg

from ad_models.data.layout import DatasetError, read_manifest, validate_manifest

DATASET_VALID = "manifest_is_valid"
BETTER_THAN_CHANCE = "better_than_chance"


def dataset_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(DATASET_VALID, asset=asset,
                              description="Every image decodes, defects have masks of the image's size, "
                                          "train/good is not empty.")]


def evaluation_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(BETTER_THAN_CHANCE, asset=asset,
                              description="Image AUROC above 0.5 on the test set (warns otherwise).")]


def check_dataset(folder: Path) -> dg.AssetCheckResult:
    try:
        manifest = read_manifest(folder)
        validate_manifest(manifest)
    except (DatasetError, FileNotFoundError) as e:
        return dg.AssetCheckResult(check_name=DATASET_VALID, passed=False, metadata={"problem": str(e)[:2000]})
    return dg.AssetCheckResult(check_name=DATASET_VALID, passed=True, metadata={"images": len(manifest)})


def check_evaluation(metrics: dict) -> dg.AssetCheckResult:
    auroc = metrics.get("image_auroc")
    passed = auroc is not None and not math.isnan(auroc) and auroc > 0.5
    return dg.AssetCheckResult(check_name=BETTER_THAN_CHANCE, passed=passed,
                               severity=dg.AssetCheckSeverity.WARN,
                               metadata={"image_auroc": float("nan") if auroc is None else float(auroc)})
