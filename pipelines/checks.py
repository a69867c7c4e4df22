"""Asset checks: data sanity on datasets, a regression floor on evaluations.

They run inside the asset's own step (declared as `check_specs`), so `adpipe materialize`, the UI
and `dvc repro` all record them.
"""
from __future__ import annotations

import math
from pathlib import Path

import dagster as dg

import pandas as pd

from ad_models.data.layout import DatasetError, count_problems, count_table, read_manifest, validate_manifest
from ad_models.data.sources import expected_counts
from pipelines.metadata import markdown_table as _table

DATASET_VALID = "manifest_is_valid"
COUNTS_AS_PUBLISHED = "counts_as_published"
BETTER_THAN_CHANCE = "better_than_chance"
INBOX_ACCEPTED = "inbox_files_accepted"
CANDIDATE_NOT_WORSE = "candidate_not_worse"
FALSE_ALARMS_AS_EXPECTED = "false_alarms_as_expected"


def dataset_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(DATASET_VALID, asset=asset,
                              description="Every image decodes, defects have masks of the image's size, "
                                          "train/good is not empty."),
            dg.AssetCheckSpec(COUNTS_AS_PUBLISHED, asset=asset,
                              description="Image counts per split and defect type equal the publisher's "
                                          "(a truncated archive fails, naming what is missing).")]


def evaluation_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(BETTER_THAN_CHANCE, asset=asset,
                              description="Image AUROC above 0.5 on the test set (warns otherwise)."),
            dg.AssetCheckSpec(FALSE_ALARMS_AS_EXPECTED, asset=asset,
                              description="The good test images fail at the decision threshold about as often as "
                                          "the policy expected (warns when more fail than chance explains, "
                                          "binomial p < 0.01).")]


def check_dataset(folder: Path) -> dg.AssetCheckResult:
    try:
        manifest = read_manifest(folder)
        validate_manifest(manifest)
    except (DatasetError, FileNotFoundError) as e:
        return dg.AssetCheckResult(check_name=DATASET_VALID, passed=False, metadata={"problem": str(e)[:2000]})
    return dg.AssetCheckResult(check_name=DATASET_VALID, passed=True, metadata={"images": len(manifest)})


def check_counts(source: str, category: str, manifest: pd.DataFrame) -> dg.AssetCheckResult:
    counts = count_table(manifest)
    expected = expected_counts(source, category)
    if expected is None:
        return dg.AssetCheckResult(check_name=COUNTS_AS_PUBLISHED, passed=True,
                                   metadata={"note": f"{source} publishes no counts for {category}",
                                             "counts": dg.MetadataValue.json(counts)})
    problems = count_problems(manifest, expected)
    metadata = {"counts": dg.MetadataValue.json(counts), "expected": dg.MetadataValue.json(expected)}
    if problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in problems))
    return dg.AssetCheckResult(check_name=COUNTS_AS_PUBLISHED, passed=not problems, metadata=metadata)


def check_evaluation(metrics: dict) -> dg.AssetCheckResult:
    auroc = metrics.get("image_auroc")
    passed = auroc is not None and not math.isnan(auroc) and auroc > 0.5
    return dg.AssetCheckResult(check_name=BETTER_THAN_CHANCE, passed=passed,
                               severity=dg.AssetCheckSeverity.WARN,
                               metadata={"image_auroc": float("nan") if auroc is None else float(auroc)})


def check_false_alarms(metrics: dict) -> dg.AssetCheckResult:
    if "false_alarm_p_value" not in metrics:
        return dg.AssetCheckResult(check_name=FALSE_ALARMS_AS_EXPECTED, passed=True,
                                   metadata={"note": "no thresholds: no validation data to set them on"})
    p_value = metrics["false_alarm_p_value"]
    return dg.AssetCheckResult(
        check_name=FALSE_ALARMS_AS_EXPECTED, passed=not p_value < 0.01, severity=dg.AssetCheckSeverity.WARN,
        metadata={"expected": float(metrics["expected_false_alarm_rate"]),
                  "seen": float(metrics["false_alarm_rate_at_threshold"]), "p_value": float(p_value)})


def inbox_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(INBOX_ACCEPTED, asset=asset,
                              description="Every new file in the inbox was a valid, new good image (warns, "
                                          "listing each rejected file and why, otherwise).")]


def check_inbox(rejected: list[tuple[str, str]], rejected_dir: Path) -> dg.AssetCheckResult:
    metadata = {"rejected": len(rejected)}
    if rejected:
        metadata["reasons"] = dg.MetadataValue.md("\n".join(f"- `{name}`: {reason}" for name, reason in rejected[:50]))
        metadata["rejected_folder"] = dg.MetadataValue.path(str(rejected_dir))
    return dg.AssetCheckResult(check_name=INBOX_ACCEPTED, passed=not rejected, severity=dg.AssetCheckSeverity.WARN,
                               metadata=metadata)


def deployment_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(CANDIDATE_NOT_WORSE, asset=asset,
                              description="The newly trained model is not worse than the deployed one on the "
                                          "synthetic bank and labelled validation images, within the tolerance; "
                                          "otherwise it is kept under rejected/ and not deployed (warns).")]


def check_deployment(record: dict) -> dg.AssetCheckResult:
    rows = comparison_rows(record)
    metadata = {"decision": record["decision"], "candidate": record["candidate_id"],
                "tolerance": dg.MetadataValue.float(float(record.get("tolerance", float("nan"))))}
    if rows:
        metadata["comparison"] = _table(["set", "metric", "candidate", "deployed"], rows)
    if record.get("reasons"):
        metadata["reasons"] = dg.MetadataValue.md("\n".join(f"- {r}" for r in record["reasons"]))
    return dg.AssetCheckResult(check_name=CANDIDATE_NOT_WORSE, passed=record["decision"] != "rejected",
                               severity=dg.AssetCheckSeverity.WARN, metadata=metadata)


def comparison_rows(record: dict) -> list[list]:
    """(set, metric, candidate, deployed) for every AUROC the decision compared."""
    candidate, deployed = record.get("candidate_metrics") or {}, record.get("deployed_metrics") or {}
    return [[name, metric, value, (deployed.get(name) or {}).get(metric, "-")]
            for name, values in candidate.items() for metric, value in values.items() if metric.endswith("auroc")]
