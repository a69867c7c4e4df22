"""A fleet without Kubernetes: steps through the celery executor, a real redis-server as the broker,
one worker per queue; GPU steps run on the `gpu` worker, the cheap ones on the `cpu` worker."""
import os
import subprocess
import time

import dagster as dg
import pytest

from pipelines.automation import INGEST_JOB, RETRAIN_JOB
from pipelines.cli import main
from pipelines.definitions import run_job
from pipelines.instance import get_instance
from pipelines.params import load_params
from pipelines.partitions import model_partition_key
from tests.servers import redis_server
from tests.tiny_project import BIN, ROOT, write_params

pytest.importorskip("dagster_celery", reason="dagster-celery is not installed (the `scale` extra)")


def workers_of(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """{step key: the celery worker that executed it}, from the run's engine events."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    out = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        worker = event.event_specific_data.metadata.get("Celery worker")
        if worker is not None:
            out[event.step_key] = worker.value
    return out


@pytest.mark.slow
def test_gpu_and_cpu_steps_run_on_the_workers_of_their_queues(tmp_path):
    with redis_server() as url:
        params_file = write_params(tmp_path, categories=["synthetic/granite"], methods=["mean_image"],
                                   execution={"executor": "celery", "celery": {"broker": url}})
        params = load_params(params_file)
        instance = get_instance(params)
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
        logs = {q: (tmp_path / f"worker-{q}.log").open("w") for q in ("gpu", "cpu")}
        workers = [subprocess.Popen([str(BIN / "adpipe"), "--params", str(params_file), "worker", "--queue", q],
                                    cwd=ROOT, env=env, stdout=logs[q], stderr=subprocess.STDOUT, start_new_session=True)
                   for q in ("gpu", "cpu")]
        try:
            deadline = time.time() + 120
            while not all("ready" in (tmp_path / f"worker-{q}.log").read_text() for q in ("gpu", "cpu")):
                assert time.time() < deadline and all(w.poll() is None for w in workers), \
                    "\n".join((tmp_path / f"worker-{q}.log").read_text()[-2000:] for q in ("gpu", "cpu"))
                time.sleep(0.5)
            ingest = run_job(params, INGEST_JOB, "synthetic/granite", instance)
            assert ingest.success
            # `adpipe materialize` (what DVC stages run) goes through the same executor
            assert main(["--params", str(params_file), "materialize", "--select", "defect_bank"]) == 0
            retrain = run_job(params, RETRAIN_JOB, model_partition_key("synthetic/granite", "mean_image"), instance)
            assert retrain.success
        finally:
            for w in workers:
                os.killpg(w.pid, 15)
            for w in workers:
                try:
                    w.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, 9)
    runs = instance.get_runs()
    assert len(runs) == 3 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    for run in runs:
        ran_on = workers_of(instance, run.run_id)
        assert ran_on, f"no step of run {run.run_id} ran on a celery worker"
        for step, worker in ran_on.items():
            queue = "gpu" if step in ("model", "evaluation", "deployed_model") else "cpu"
            assert worker.startswith(f"{queue}@"), (step, worker)
    steps = set().union(*(workers_of(instance, r.run_id) for r in runs))
    assert steps == {"ingested_goods", "dataset", "defect_bank", "model", "evaluation", "deployed_model"}
    assert (tmp_path / "data" / "deployed" / "mean_image" / "synthetic" / "granite" / "current" / "weights.pt").is_file()
    assert instance.get_materialized_partitions(dg.AssetKey("model")) == {
        model_partition_key("synthetic/granite", "mean_image")}
