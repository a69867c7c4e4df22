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


def build_definitions(params: Params, device: str = "", progress: bool = True) -> dg.Definitions:
    return dg.Definitions(
        assets=build_assets(params),
        jobs=automation.build_jobs(params),
        sensors=[automation.build_inbox_sensor(params)],
        schedules=[automation.build_retrain_schedule(params)],
        resources=build_resources(params, device, progress),
        executor=build_executor(params),
    )


def job_of(params_file: str, job_name: str) -> dg.JobDefinition:
    """A job of the code location, rebuilt from params.yaml: what step processes and celery workers
    reconstruct (`dg.build_reconstructable_job("pipelines.definitions", "job_of", (params_file, name))`)."""
    return build_definitions(load_params(params_file), progress=False).resolve_job_def(job_name)


def run_job(params: Params, job_name: str, partition_key: str | dg.MultiPartitionKey,
            instance: dg.DagsterInstance, tags: dict[str, str] | None = None) -> dg.JobExecutionResult:
    """One partition of a job through params.yaml's executor (multiprocess, celery), outside the UI."""
    job = dg.build_reconstructable_job("pipelines.definitions", "job_of", (str(params.file), job_name))
    partitions = job_of(str(params.file), job_name).partitions_def
    return dg.execute_job(job, instance=instance,
                          tags={**partitions.get_tags_for_partition_key(partition_key), **(tags or {})})


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded lazily by Dagster's tools, so importing this module reads no params file."""
    return build_definitions(load_params(), device=os.environ.get("ADPIPE_DEVICE", ""))
