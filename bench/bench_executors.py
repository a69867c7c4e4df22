"""Two GPU steps through Dagster's executors: one after the other (in_process) or side by side
(multiprocess, one claimed device each).

    python bench/bench_executors.py                       # PFM on two built-in categories, 2 fake devices
    python bench/bench_executors.py --devices 0 1 2 3 --categories fabric granite circuit carpet

Each step trains a real model with ad_models.runs.train on the device its `accelerator` resource
claimed (cuda:<index> on a GPU machine; on a CPU the index only spreads the steps, each with
--threads torch threads). Prints the wall time of each executor and, per step, its device and span.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg  # noqa: E402
import yaml  # noqa: E402

from ad_models import runs  # noqa: E402
from ad_models.data.sources import prepare_category  # noqa: E402
from ad_models.defects.bank import build_bank  # noqa: E402
from pipelines.execution import build_executor  # noqa: E402
from pipelines.devices import Accelerator, set_gpu_pool_limit  # noqa: E402
from pipelines.params import load_params  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _train_step(category: str):
    @dg.op(name=f"train_{category}", pool="gpu")
    def train(accelerator: Accelerator) -> None:
        import torch
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        spec = json.loads(os.environ["BENCH_SPEC"])
        data = Path(spec["data"])
        start = time.time()
        runs.train(spec["method"], spec["config"], data / "datasets" / category, data / "models" / spec["run"] / category,
                   bank_dir=data / "defects" / category, device=accelerator.torch_device, progress=False)
        out = {"device": accelerator.claimed, "torch_device": accelerator.torch_device, "start": start,
               "end": time.time()}
        (data / "spans" / spec["run"]).mkdir(parents=True, exist_ok=True)
        (data / "spans" / spec["run"] / f"{category}.json").write_text(json.dumps(out))
    return train


def training_job(params_file: str) -> dg.JobDefinition:
    """Rebuilt in every step process (the multiprocess executor spawns them); the params file is an
    argument, not the environment, since Dagster caches a reconstructed job by its arguments."""
    params = load_params(params_file)
    spec = json.loads(os.environ["BENCH_SPEC"])

    @dg.job(name="training", executor_def=build_executor(params),
            resource_defs={"accelerator": Accelerator(params_file=str(params.file))})
    def job():
        for category in spec["categories"]:
            _train_step(category)()
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["fabric", "granite"])
    parser.add_argument("--devices", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--method", default="pfm")
    parser.add_argument("--method-config", type=json.loads, default={"image_size": 128, "epochs": 10})
    parser.add_argument("--threads", type=int, default=1, help="torch threads per step")
    args = parser.parse_args()

    data = RESULTS / "executors"
    for category in args.categories:
        prepare_category("synthetic", category, data / "datasets" / category, seed=0)
        build_bank(data / "datasets" / category, data / "defects" / category, {"image_size": 128}, progress=False)
    os.environ["BENCH_THREADS"] = str(args.threads)
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for executor in ("in_process", "multiprocess"):
            params = Path(tmp) / f"{executor}.yaml"
            params.write_text(yaml.safe_dump({
                "datasets": {"synthetic": {"source": "synthetic"}}, "categories": ["synthetic/fabric"],
                "methods": [args.method], "execution": {"executor": executor, "devices": args.devices,
                                                        "lock_dir": str(Path(tmp) / "locks")}}))
            os.environ["BENCH_SPEC"] = json.dumps({"data": str(data), "method": args.method, "run": executor,
                                                   "config": args.method_config, "categories": args.categories})
            home = Path(tmp) / f"home_{executor}"
            home.mkdir()
            with dg.instance_for_test(temp_dir=str(home)) as instance:
                set_gpu_pool_limit(instance, load_params(params))
                job = dg.build_reconstructable_job("bench_executors", "training_job", (str(params),),
                                                   reconstructor_working_directory=str(Path(__file__).parent))
                start = time.perf_counter()
                assert dg.execute_job(job, instance=instance).success
                walls[executor] = time.perf_counter() - start
            spans = [json.loads((data / "spans" / executor / f"{c}.json").read_text()) for c in args.categories]
            t0 = min(s["start"] for s in spans)
            print(f"{executor:>12}: wall {walls[executor]:6.1f} s; " + "; ".join(
                f"{c} on device {s['device']} ({s['torch_device']}) {s['start'] - t0:5.1f}-{s['end'] - t0:5.1f} s"
                for c, s in zip(args.categories, spans)), flush=True)
    print(f"# multiprocess / in_process wall time: {walls['multiprocess'] / walls['in_process']:.2f} "
          f"({len(args.categories)} steps, {len(args.devices)} devices, {args.threads} torch thread(s) per step)")


if __name__ == "__main__":
    main()
