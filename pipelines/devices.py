"""One accelerator per GPU step: every GPU of a machine busy, no two steps on the same one.

Dagster's pools limit how many GPU steps run at once (the `gpu` pool's limit follows the number of
devices, `adpipe instance`), but nothing in Dagster says which device a step should use. The
`accelerator` resource claims one: an exclusive lock per device index in a folder local to the
machine (`execution.lock_dir`), taken when the step starts and released when it ends; the kernel
drops the lock of a step whose process dies, so a killed step frees its device. The step then
trains on `cuda:<index>`; on a machine without CUDA (or with a CPU device in params.yaml) the
claimed index only orders the steps and the device stays the configured one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import sqlalchemy.exc
from pydantic import PrivateAttr

from pipelines.params import Params, load_params

GPU_POOL = "gpu"


def device_indices(params: Params) -> list[int]:
    """The device indices GPU steps share on this machine: params.yaml's list, or every CUDA device."""
    devices = params.execution["devices"]
    if devices != "auto":
        return list(devices)
    import torch
    return list(range(torch.cuda.device_count()))


def lock_dir(params: Params) -> Path:
    configured = params.execution["lock_dir"]
    return params._resolve(configured) if configured else Path(tempfile.gettempdir()) / "adpipe-devices"


@contextlib.contextmanager
def claim_device(indices: list[int], folder: Path, on_wait: Callable[[str], None] | None = None,
                 poll_seconds: float = 0.5) -> Iterator[int]:
    """Hold an exclusive lock on the first free device of `indices` while the block runs; waits while
    all are taken."""
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in indices:
            handle = open(folder / f"device-{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")  # who holds it, for a person looking
                handle.flush()
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if on_wait is not None and not waited:
            on_wait(f"every device of {indices} is taken; waiting for one to be released")
        waited = True
        time.sleep(poll_seconds)


class Accelerator(dg.ConfigurableResource):
    """The torch device of a GPU step, with a device of this machine claimed for the step's lifetime."""

    params_file: str
    device: str = ""  # "", "auto", "cpu", "cuda", "cuda:1": this machine's override; "" = params.yaml's `device`
    _claimed: int | None = PrivateAttr(default=None)
    _torch_device: str = PrivateAttr(default="")

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator["Accelerator"]:
        params = load_params(self.params_file)
        base = self.device or params.device
        indices = device_indices(params)
        if not indices or base == "cpu" or ":" in base:  # nothing to share, or a device named outright
            self._torch_device = base
            yield self
            return
        log = context.log.info if context.log else None
        with claim_device(indices, lock_dir(params), log) as index:
            self._claimed = index
            self._torch_device = f"cuda:{index}" if _uses_cuda(base) else base
            if log:
                log(f"claimed device {index} of {indices} ({self._torch_device})")
            yield self

    @property
    def claimed(self) -> int | None:
        """The claimed device index (None: no devices to claim on this machine)."""
        return self._claimed

    @property
    def torch_device(self) -> str:
        return self._torch_device


def _uses_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device == "auto":
        import torch
        return torch.cuda.is_available()
    return False


def set_gpu_pool_limit(instance: dg.DagsterInstance, params: Params) -> int:
    """The `gpu` pool admits `execution.gpu_slots` steps at once (a fleet's GPUs), by default as many
    as this machine has devices (at least one)."""
    slots = params.execution["gpu_slots"] or max(1, len(device_indices(params)))
    # An explicit row, even when it equals dagster.yaml's default: otherwise every step's claim
    # initialises the pool from the default, and two runs doing so at once fail on PostgreSQL
    # (Dagster retries a duplicate INSERT inside the transaction the error aborted).
    for attempt in range(3):
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        if info.limit == slots and not info.using_default_limit:
            break
        try:
            instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)
            break
        except sqlalchemy.exc.DBAPIError:  # another process created the row at the same moment
            if attempt == 2:
                raise
            time.sleep(0.2)
    return slots


@contextlib.contextmanager
def assigning_waiting_steps(instance: dg.DagsterInstance, every_seconds: float = 5.0) -> Iterator[None]:
    """While the block runs, hand free `gpu` slots to waiting steps every few seconds.

    Dagster assigns a freed slot only to the steps already waiting at that moment; a step that
    looked for a free slot just before another run freed it, and queued itself just after, waits
    for ever (seen with two `adpipe` processes on one instance). Assigning again fixes that.
    """
    stop = threading.Event()

    def assign() -> None:
        while not stop.wait(every_seconds):
            with contextlib.suppress(Exception):  # a storage hiccup must not end the run
                instance.event_log_storage.assign_pending_steps([GPU_POOL])

    thread = threading.Thread(target=assign, name="adpipe-assign-gpu-slots", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_seconds + 5)
