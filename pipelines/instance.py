"""One run history: every way of running (UI, `adpipe`, DVC stages) records into the same Dagster instance.

The instance lives in $DAGSTER_HOME, by default `.dagster_home` beside params.yaml (the repository
root). Its settings come from the `dagster.yaml` beside params.yaml (the repository's own when the
params file's folder has none): copied into the home whenever they differ, so an edit there (the
PostgreSQL storage, a pool limit) reaches every later run.

A run that `adpipe` starts in-process is tagged with this host and process. When that process dies
without ending its run (kill -9, a lost machine), the run would hold its `gpu` pool slot forever
and every later run would wait for it; `reclaim_dead_runs` marks such runs failed and frees their
slots (the UI's runs are watched by the daemon's run monitoring instead, see dagster.yaml).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg
import psutil

from ad_models.io import write_text
from pipelines.devices import set_gpu_pool_limit
from pipelines.params import Params

HOME_ENV = "DAGSTER_HOME"
DEFAULT_HOME = ".dagster_home"
SETTINGS = "dagster.yaml"
REPOSITORY_SETTINGS = Path(__file__).resolve().parents[1] / SETTINGS


def dagster_home(params: Params) -> Path:
    """$DAGSTER_HOME, or `.dagster_home` in the folder of params.yaml."""
    home = os.environ.get(HOME_ENV)
    return Path(home).absolute() if home else params.file.parent / DEFAULT_HOME


def settings_file(params: Params) -> Path:
    own = params.file.parent / SETTINGS
    return own if own.is_file() else REPOSITORY_SETTINGS


def get_instance(params: Params) -> dg.DagsterInstance:
    """The persistent instance of this project, created on first use, its `gpu` pool limit set from
    params.yaml. Step processes (multiprocess, celery) get a reference to it from Dagster."""
    home = dagster_home(params)
    home.mkdir(parents=True, exist_ok=True)
    wanted = settings_file(params).read_text()
    current = home / SETTINGS
    if not current.is_file() or current.read_text() != wanted:
        write_text(current, wanted)
    instance = dg.DagsterInstance.from_config(str(home))
    set_gpu_pool_limit(instance, params)
    return instance


HOST_TAG, PID_TAG, PROCESS_START_TAG = "adpipe/host", "adpipe/pid", "adpipe/process_started"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
              dg.DagsterRunStatus.CANCELING]


def run_tags() -> dict[str, str]:
    """Tags naming the process that runs an in-process run."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            PROCESS_START_TAG: repr(psutil.Process().create_time())}


def _alive(pid: int, started: str) -> bool:
    try:
        return repr(psutil.Process(pid).create_time()) == started  # the same process, not a reused pid
    except psutil.Error:
        return False


def reclaim_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the unfinished runs whose process on this host is gone and free their pool slots;
    returns their run ids."""
    reclaimed = []
    filters = dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()})
    for run in instance.get_runs(filters=filters):
        pid, started = run.tags.get(PID_TAG), run.tags.get(PROCESS_START_TAG)
        if pid is None or started is None or _alive(int(pid), started):
            continue
        instance.report_run_failed(run, f"adpipe: its process (pid {pid}) ended without ending the run")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reclaimed.append(run.run_id)
    return reclaimed
