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


def build_executor(params: Params) -> dg.ExecutorDefinition:
    """params.yaml's `execution.executor` for the runs Dagster launches."""
    execution = params.execution
    if execution["executor"] == "multiprocess":
        # spawn: a forked child would inherit the parent's torch threads and CUDA state
        return dg.multiprocess_executor.configured(
            {"max_concurrent": execution["max_concurrent"], "start_method": {"spawn": {}}}, name="multiprocess")
    return dg.in_process_executor


def build_definitions(params: Params, device: str = "", progress: bool = True) -> dg.Definitions:
    return dg.Definitions(
        assets=build_assets(params),
        jobs=automation.build_jobs(params),
        sensors=[automation.build_inbox_sensor(params)],
        schedules=[automation.build_retrain_schedule(params)],
        resources=build_resources(params, device, progress),
        executor=build_executor(params),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded lazily by Dagster's tools, so importing this module reads no params file."""
    return build_definitions(load_params(), device=os.environ.get("ADPIPE_DEVICE", ""))
