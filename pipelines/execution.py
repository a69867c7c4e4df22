"""Which Dagster executor runs the steps, and which celery queue each step goes to.

GPU steps (model, evaluation, deployed_model) carry the `gpu` queue tag, the cheap ones (datasets,
the bank, the report) the `cpu` queue tag; only the celery executor reads them, so a fleet's GPU
machines run `adpipe worker --queue gpu` and any other machine `adpipe worker --queue cpu`.
"""
from __future__ import annotations

import dagster as dg

from pipelines.params import Params

QUEUE_TAG = "dagster-celery/queue"
GPU_QUEUE, CPU_QUEUE = "gpu", "cpu"
GPU_STEP = {QUEUE_TAG: GPU_QUEUE}
CPU_STEP = {QUEUE_TAG: CPU_QUEUE}


def celery_config(params: Params) -> dict[str, str]:
    celery = params.execution["celery"]
    return {"broker": celery["broker"], "backend": celery.get("backend") or celery["broker"]}


def build_executor(params: Params) -> dg.ExecutorDefinition:
    """params.yaml's `execution.executor` for the runs Dagster launches."""
    execution = params.execution
    if execution["executor"] == "multiprocess":
        # spawn: a forked child would inherit the parent's torch threads and CUDA state
        return dg.multiprocess_executor.configured(
            {"max_concurrent": execution["max_concurrent"], "start_method": {"spawn": {}}}, name="multiprocess")
    if execution["executor"] == "celery":
        from dagster_celery import celery_executor
        return celery_executor.configured(celery_config(params), name="celery")
    return dg.in_process_executor
