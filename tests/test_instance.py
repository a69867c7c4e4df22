"""One run history: the project's persistent Dagster instance, and runs whose process died."""
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest
import yaml

from pipelines.instance import dagster_home, get_instance, reclaim_dead_runs
from pipelines.params import load_params
from tests.servers import postgres_server
from tests.tiny_project import BIN, ROOT, TINY, write_params


def test_the_instance_lives_beside_params_and_follows_its_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    params = load_params(write_params(tmp_path))
    assert dagster_home(params) == tmp_path / ".dagster_home"
    gpu = get_instance(params).event_log_storage.get_concurrency_info("gpu")
    assert (tmp_path / ".dagster_home" / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text()
    # the gpu pool has its own row: no step initialises it from the default (racy on PostgreSQL)
    assert gpu.limit == 1 and not gpu.using_default_limit
    # an edited dagster.yaml beside params.yaml reaches the next run
    (tmp_path / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 2\ntelemetry:\n  enabled: false\n")
    assert get_instance(params).event_log_storage.get_concurrency_info("cpu").limit == 2
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    assert dagster_home(params) == tmp_path / "elsewhere"


def test_a_dead_process_does_not_hold_the_gpu_pool(tmp_path, monkeypatch):
    """A run left STARTED by a vanished process, holding the gpu slot, is failed and its slot freed;
    a run of a live process is left alone."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    instance = get_instance(load_params(write_params(tmp_path)))
    gone = subprocess.Popen([sys.executable, "-c", "import os, psutil; print(os.getpid(), "
                                                   "repr(psutil.Process().create_time()))"],
                            stdout=subprocess.PIPE, text=True)
    pid, started = gone.communicate()[0].split()
    from pipelines.instance import run_tags
    runs = {}
    for name, tags in (("dead", {**run_tags(), "adpipe/pid": pid, "adpipe/process_started": started}),
                       ("alive", run_tags())):
        run = instance.create_run_for_job(dg.GraphDefinition(name="g", node_defs=[]).to_job(name=name), tags=tags)
        instance.handle_new_event(dg.EventLogEntry(
            error_info=None, level="DEBUG", user_message="", run_id=run.run_id, timestamp=time.time(),
            dagster_event=dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=name)))
        runs[name] = run.run_id
    instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")  # as the executor does
    assert instance.event_log_storage.claim_concurrency_slot("gpu", runs["dead"], "model").is_claimed
    assert not instance.event_log_storage.claim_concurrency_slot("gpu", runs["alive"], "model").is_claimed

    assert reclaim_dead_runs(instance) == [runs["dead"]]
    assert instance.get_run_by_id(runs["dead"]).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(runs["alive"]).status == dg.DagsterRunStatus.STARTED
    # the waiting step of the live run gets the freed slot
    assert instance.event_log_storage.claim_concurrency_slot("gpu", runs["alive"], "model").is_claimed


@pytest.mark.slow
def test_a_killed_adpipe_run_does_not_block_the_next(tmp_path):
    """kill -9 of `adpipe materialize` in the middle of training: the next `adpipe` run reclaims the
    gpu slot instead of waiting for it forever."""
    from pipelines.cli import main
    params = write_params(tmp_path, categories=["synthetic/granite"], methods=["pfm"])
    assert main(["--params", str(params), "materialize", "--select", "dataset,defect_bank"]) == 0
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump({**TINY, "categories": ["synthetic/granite"], "methods": ["pfm"],
                                    "method_config": {"pfm": {"epochs": 100000, "image_size": 64}}}))
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    proc = subprocess.Popen([str(BIN / "adpipe"), "--params", str(slow), "materialize", "--select", "model"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    instance = dg.DagsterInstance.from_config(str(tmp_path / ".dagster_home"))
    deadline = time.time() + 120
    while not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots:
        assert time.time() < deadline and proc.poll() is None, "the training step never claimed the gpu slot"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["--params", str(params), "materialize", "--select", "model"]) == 0
    # dataset + bank, the killed training, the next one
    assert sorted(r.status.value for r in instance.get_runs()) == ["FAILURE", "SUCCESS", "SUCCESS"]


@pytest.mark.slow
def test_concurrent_writers_share_an_instance_on_postgresql(tmp_path):
    """dagster.yaml with the PostgreSQL storage: two `adpipe` processes (two categories) write into
    one instance at the same time, their training steps take turns on the gpu pool, and both runs'
    materializations are in the history."""
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed (the `scale` extra)")
    with postgres_server() as db:
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({
            **yaml.safe_load((ROOT / "dagster.yaml").read_text()),
            "storage": {"postgres": {"postgres_db": db}}}))
        params = write_params(tmp_path, categories=["synthetic/granite", "synthetic/fabric"], methods=["mean_image"])
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
        logs = [tmp_path / "granite.log", tmp_path / "fabric.log"]
        procs = [subprocess.Popen([str(BIN / "adpipe"), "--params", str(params), "materialize", "--category", category,
                                   "--select", "dataset,defect_bank,model"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=log.open("w"))
                 for category, log in zip(("synthetic/granite", "synthetic/fabric"), logs)]
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        instance = get_instance(load_params(params))
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_materialized_partitions(dg.AssetKey("dataset")) == {"synthetic/granite", "synthetic/fabric"}
        assert len(instance.get_materialized_partitions(dg.AssetKey("model"))) == 2
        instance.dispose()
