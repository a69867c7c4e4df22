"""The Dagster code location: `dagster dev -m pipelines.definitions` (run from the repository root).

Everything is built from params.yaml (or the file named by $ADPIPE_PARAMS), so partitions,
assets and the DVC stages all agree.
"""
from __future__ import annotations

import os

import dagster as dg

from pipelines import automation
from pipelines.assets import datasets, defects, deployment, evaluation, models, report
from pipelines.params import Params, load_params
from pipelines.resources import AdpipeResource


def build_assets(params: Params) -> list[dg.AssetsDefinition]:
    raw = datasets.build_raw(params)  # None when every dataset is generated
    return ([raw] if raw else []) + [datasets.build_ingested(params), datasets.build(params), defects.build(params),
                                     models.build(params), evaluation.build(params), deployment.build(params),
                                     report.build(params)]


def build_definitions(params: Params, device: str = "", progress: bool = True) -> dg.Definitions:
    return dg.Definitions(
        assets=build_assets(params),
        jobs=automation.build_jobs(params),
        sensors=[automation.build_inbox_sensor(params)],
        schedules=[automation.build_retrain_schedule(params)],
        resources={"adpipe": AdpipeResource(params_file=str(params.file), device=device, progress=progress)},
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded lazily by Dagster's tools, so importing this module reads no params file."""
    return build_definitions(load_params(), device=os.environ.get("ADPIPE_DEVICE", ""))
