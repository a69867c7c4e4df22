"""The Dagster code location: `dagster dev -m pipelines.definitions` (run from the repository root).

Everything is built from params.yaml (or the file named by $ADPIPE_PARAMS), so partitions,
assets and the DVC stages all agree.
"""
from __future__ import annotations

import os

import dagster as dg

from pipelines import automation
from pipelines.assets import datasets, defects, deployment, evaluation, models, report
from pipelines.devices import Accelerator
from pipelines.execution import build_executor
from pipelines.params import Params, load_params
from pipelines.resources import AdpipeResource


def build_assets(params: Params) -> list[dg.AssetsDefinition]:
    raw = datasets.build_raw(params)  # None when every dataset is generated
    return ([raw] if raw else []) + [datasets.build_ingested(params), datasets.build(params), defects.build(params),
                                     models.build(params), evaluation.build(params), deployment.build(params),
                                     report.build(params)]


def build_resources(params: Params, device: str = "", progress: bool = True) -> dict[str, dg.ConfigurableResource]:
    return {"adpipe": AdpipeResource(params_file=str(params.file), progress=progress),
            "accelerator": Accelerator(params_file=str(params.file), device=device)}


def build_definitions(params: Params, device: str = "", progress: bool = True,
                      selection_job: tuple[str, list[str]] | None = None) -> dg.Definitions:
    """The code location; `selection_job` (name, asset names) adds a job over those assets."""
    jobs = automation.build_jobs(params)
    if selection_job is not None:
        name, assets = selection_job
        jobs.append(dg.define_asset_job(name, selection=[dg.AssetKey(a) for a in assets]))
    return dg.Definitions(
        assets=build_assets(params),
        jobs=jobs,
        sensors=[automation.build_inbox_sensor(params)],
        schedules=[automation.build_retrain_schedule(params)],
        resources=build_resources(params, device, progress),
        executor=build_executor(params),
    )


def job_of(params_file: str, job_name: str, assets: tuple[str, ...] = (), device: str = "") -> dg.JobDefinition:
    """A job of the code location (or, given `assets`, a job over them), rebuilt from params.yaml:
    what step processes and celery workers reconstruct."""
    params = load_params(params_file)
    return build_definitions(params, device, progress=False,
                             selection_job=(job_name, list(assets)) if assets else None).resolve_job_def(job_name)


def run_job(params: Params, job_name: str, partition_key: str | dg.MultiPartitionKey | None,
            instance: dg.DagsterInstance, tags: dict[str, str] | None = None, assets: tuple[str, ...] = (),
            device: str = "") -> dg.JobExecutionResult:
    """One partition of a job (a named one, or one over `assets`) through params.yaml's executor
    (multiprocess, celery, k8s): how `adpipe` runs outside the in-process executor."""
    args = (str(params.file), job_name, tuple(assets), device)
    job = dg.build_reconstructable_job("pipelines.definitions", "job_of", args)
    partitions = job_of(*args).partitions_def
    partition_tags = partitions.get_tags_for_partition_key(partition_key) if partition_key is not None else {}
    return dg.execute_job(job, instance=instance, tags={**partition_tags, **(tags or {})})


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded lazily by Dagster's tools, so importing this module reads no params file."""
    return build_definitions(load_params(), device=os.environ.get("ADPIPE_DEVICE", ""))
