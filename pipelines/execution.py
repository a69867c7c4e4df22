"""Which Dagster executor runs the steps, and what each step asks of a celery fleet or a cluster.

GPU steps (model, evaluation, deployed_model) carry the `gpu` celery queue tag and, for Kubernetes,
a `dagster-k8s/config` tag asking for one `nvidia.com/gpu` on a node that has one; the cheap steps
(datasets, the bank, the report) carry the `cpu` queue tag. Only the executor in use reads its
tag, so the same assets run everywhere.
"""
from __future__ import annotations

from typing import Any

import dagster as dg

from pipelines.params import Params

QUEUE_TAG = "dagster-celery/queue"
K8S_TAG = "dagster-k8s/config"
GPU_QUEUE, CPU_QUEUE = "gpu", "cpu"
CPU_STEP = {QUEUE_TAG: CPU_QUEUE}
DATA_MOUNT = "data"  # the volume name of data/ in step pods


def gpu_step_tags(params: Params) -> dict[str, Any]:
    k8s = params.execution["k8s"]
    pod: dict[str, Any] = {}
    if k8s.get("gpu_node_selector"):
        pod["node_selector"] = dict(k8s["gpu_node_selector"])
    if k8s.get("gpu_tolerations"):
        pod["tolerations"] = list(k8s["gpu_tolerations"])
    return {QUEUE_TAG: GPU_QUEUE,
            K8S_TAG: {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}, "pod_spec_config": pod}}


def celery_config(params: Params) -> dict[str, str]:
    celery = params.execution["celery"]
    return {"broker": celery["broker"], "backend": celery.get("backend") or celery["broker"]}


def k8s_config(params: Params) -> dict[str, Any]:
    """The k8s_job_executor's config: the image, the namespace, data/ from a shared volume claim."""
    k8s = params.execution["k8s"]
    config: dict[str, Any] = {"job_image": k8s["image"], "job_namespace": k8s.get("namespace") or "default",
                              "env_vars": [f"ADPIPE_PARAMS={params.file}"]}
    if params.execution["max_concurrent"]:
        config["max_concurrent"] = params.execution["max_concurrent"]
    if k8s.get("data_volume_claim"):
        config["volumes"] = [{"name": DATA_MOUNT, "persistent_volume_claim": {"claim_name": k8s["data_volume_claim"]}}]
        config["volume_mounts"] = [{"name": DATA_MOUNT, "mount_path": str(params.data_root)}]
    return config


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
    if execution["executor"] == "k8s":
        from dagster_k8s import k8s_job_executor
        return k8s_job_executor.configured(k8s_config(params), name="k8s")
    return dg.in_process_executor
