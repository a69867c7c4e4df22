"""One device per GPU step, on CPU with fake device indices: no two steps share one, a killed step
frees its own, the gpu pool is as wide as the machine has devices, and the multiprocess executor runs
two GPU steps side by side."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.execution import build_executor
from pipelines.devices import Accelerator, claim_device, set_gpu_pool_limit
from pipelines.params import ParamsError, load_params
from tests.tiny_project import write_params

ROOT = Path(__file__).resolve().parents[1]


def test_claims_are_exclusive_and_wait_for_a_free_device(tmp_path):
    held, order = [], []
    with claim_device([0, 1], tmp_path) as first, claim_device([0, 1], tmp_path) as second:
        held = [first, second]

        def third():
            with claim_device([0, 1], tmp_path, poll_seconds=0.05) as index:
                order.append(("third", index))

        waiting = threading.Thread(target=third)
        waiting.start()
        time.sleep(0.5)
        assert order == []  # both devices taken: it waits
        order.append(("released", None))
    waiting.join(timeout=10)
    assert held == [0, 1]
    assert order[0] == ("released", None) and order[1][1] in (0, 1)


def test_a_killed_step_frees_its_device(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipelines.devices import claim_device\n"
                               f"with claim_device([0], Path({str(tmp_path)!r})) as i:\n"
                               "    print(i, flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "0"
    waited = []
    blocked = threading.Thread(target=lambda: claim_device([0], tmp_path, waited.append, 0.05).__enter__())
    blocked.start()
    time.sleep(0.5)
    assert blocked.is_alive() and waited  # device 0 is held by the other process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    blocked.join(timeout=10)
    assert not blocked.is_alive()


def test_the_gpu_pool_follows_the_devices(tmp_path):
    params = load_params(write_params(tmp_path, execution={"devices": [0, 1, 2]}))
    with dg.instance_for_test() as instance:
        assert set_gpu_pool_limit(instance, params) == 3
        assert instance.event_log_storage.get_concurrency_info("gpu").limit == 3
        # a fleet: the machine that runs the UI may have no GPU, the workers have eight between them
        fleet = load_params(write_params(tmp_path, execution={"devices": [0], "gpu_slots": 8}))
        assert set_gpu_pool_limit(instance, fleet) == 8
        assert instance.event_log_storage.get_concurrency_info("gpu").limit == 8


@pytest.mark.parametrize("execution, problem", [
    ({"executor": "spark"}, "execution.executor must be one of"),
    ({"devices": [0, 0]}, "execution.devices must be 'auto' or a list"),
    ({"devices": "all"}, "execution.devices must be 'auto' or a list"),
    ({"max_concurrent": -1}, "execution.max_concurrent"),
    ({"gpu_slots": "all"}, "execution.gpu_slots"),
    ({"gpus": 2}, "execution: unknown keys ['gpus']"),
    ({"compile": "fast"}, "execution.compile must be false or one of ['default', 'reduce-overhead', 'max-autotune']"),
])
def test_bad_execution_settings_are_clear(tmp_path, execution, problem):
    with pytest.raises(ParamsError, match=problem.replace("[", r"\[").replace("(", r"\(")):
        load_params(write_params(tmp_path, execution=execution))


# -- two GPU steps through the multiprocess executor ---------------------------------------------------

def _gpu_step(name: str):
    @dg.op(name=name, pool="gpu")
    def step(accelerator: Accelerator) -> None:
        start = time.time()
        time.sleep(3)
        folder = Path(os.environ["ADPIPE_TEST_OUT"])
        (folder / f"{name}.json").write_text(json.dumps({"device": accelerator.claimed, "start": start,
                                                         "end": time.time()}))
    return step


def two_gpu_steps() -> dg.JobDefinition:
    """Reconstructable in the step processes: everything comes from the environment."""
    params = load_params(os.environ["ADPIPE_PARAMS"])

    @dg.job(executor_def=build_executor(params),
            resource_defs={"accelerator": Accelerator(params_file=str(params.file))})
    def job():
        _gpu_step("train_a")()
        _gpu_step("train_b")()
    return job


@pytest.mark.slow
def test_multiprocess_runs_two_gpu_steps_side_by_side_on_their_own_devices(tmp_path, monkeypatch):
    params = write_params(tmp_path, execution={"executor": "multiprocess", "devices": [0, 1],
                                               "lock_dir": str(tmp_path / "locks")})
    monkeypatch.setenv("ADPIPE_PARAMS", str(params))
    monkeypatch.setenv("ADPIPE_TEST_OUT", str(tmp_path))
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        set_gpu_pool_limit(instance, load_params(params))
        # by its package path: pytest imports this file as a top-level module the step processes cannot find
        job = dg.build_reconstructable_job("tests.test_devices", "two_gpu_steps", reconstructor_working_directory=str(ROOT))
        result = dg.execute_job(job, instance=instance)
        assert result.success
    a, b = (json.loads((tmp_path / f"train_{x}.json").read_text()) for x in "ab")
    assert {a["device"], b["device"]} == {0, 1}
    assert a["start"] < b["end"] and b["start"] < a["end"]  # side by side


@pytest.mark.slow
def test_adpipe_materialize_runs_steps_through_the_multiprocess_executor(tmp_path, monkeypatch):
    from pipelines.cli import main
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    params = write_params(tmp_path, categories=["synthetic/granite"], methods=["mean_image"],
                          execution={"executor": "multiprocess", "max_concurrent": 2})
    assert main(["--params", str(params), "materialize", "--select", "dataset,defect_bank"]) == 0
    assert (tmp_path / "data" / "defects" / "synthetic" / "granite").is_dir()
    instance = dg.DagsterInstance.from_config(str(tmp_path / ".dagster_home"))
    [run] = instance.get_runs()
    started = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTED).records
    assert {r.event_log_entry.step_key for r in started} == {"dataset", "defect_bank"}  # each in a subprocess
    assert instance.get_materialized_partitions(dg.AssetKey("defect_bank")) == {"synthetic/granite"}


def test_a_step_queued_just_after_a_slot_was_freed_gets_it(tmp_path):
    """Dagster's race: run B saw no free slot, run A then freed its slot (nobody was waiting), and B
    queued itself unassigned. The assigner of `adpipe` hands B the slot."""
    from pipelines.devices import assigning_waiting_steps
    params = load_params(write_params(tmp_path))
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        set_gpu_pool_limit(instance, params)
        assert storage.claim_concurrency_slot("gpu", "run-a", "model").is_claimed
        storage.free_concurrency_slot_for_step("run-a", "model")
        storage.add_pending_step("gpu", "run-b", "model", should_assign=False)  # B's stale view
        assert not storage.claim_concurrency_slot("gpu", "run-b", "model").is_claimed  # stuck
        with assigning_waiting_steps(instance, every_seconds=0.1):
            time.sleep(0.5)
        assert storage.claim_concurrency_slot("gpu", "run-b", "model").is_claimed
