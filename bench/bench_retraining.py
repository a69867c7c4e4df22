"""From a new good image in the inbox to a retrained, evaluated and deployed model: how long it takes.

    python bench/bench_retraining.py                              # params.yaml's methods, synthetic/fabric
    python bench/bench_retraining.py --category synthetic/circuit --methods pfm

Copies params.yaml with its data root moved to bench/results/retraining/ (the pipeline's data/ is
never touched), builds the category and trains and deploys its models once (not timed), drops new
good images into the inbox, then times what a factory would see: the inbox sensor's tick, the
ingestion run it requests, the retraining schedule's tick and the runs it requests (train ->
evaluate -> deploy-if-not-worse), all in-process through the same Dagster definitions as the UI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg  # noqa: E402
import yaml  # noqa: E402

from ad_models.data.sources import prepare_category  # noqa: E402
from ad_models.deploy import deployment_history  # noqa: E402
from pipelines.automation import INGEST_ASSETS, RETRAIN_ASSETS  # noqa: E402
from pipelines.definitions import build_definitions  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.partitions import model_partition_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "retraining"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", default="synthetic/fabric", help="a built-in synthetic category")
    parser.add_argument("--methods", nargs="*", help="default: params.yaml's")
    parser.add_argument("--new-images", type=int, default=1)
    parser.add_argument("--device", default="")
    args = parser.parse_args()

    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(data_root=str(RESULTS / "data"), categories=[args.category], methods=args.methods or raw["methods"])
    raw.setdefault("ingest", {})["min_age_seconds"] = 0
    (RESULTS / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(RESULTS / "params.yaml")
    defs = build_definitions(params, device=args.device, progress=False)
    instance = dg.DagsterInstance.ephemeral()

    def run(selection, partition_key) -> float:
        start = time.perf_counter()
        result = dg.materialize(list(defs.assets), selection=selection, partition_key=partition_key,
                                resources=defs.resources, instance=instance)
        assert result.success
        return time.perf_counter() - start

    category = args.category
    print(f"# {category}, methods {params.methods}, budget {params.budget}: "
          f"{params.method_options(params.methods[0], category)}", flush=True)
    setup = run(INGEST_ASSETS, category)
    for method in params.methods:
        setup += run(RETRAIN_ASSETS, model_partition_key(category, method))
    print(f"# first build, training and deployment (not timed below): {setup:.1f} s", flush=True)

    # new good images: the category's own generator with another seed, i.e. images it has not seen
    name = category.split("/", 1)[1]
    size = (raw["datasets"]["synthetic"].get("options") or {}).get("size", 256)
    source = prepare_category("synthetic", name, RESULTS / "new", n_train=args.new_images, n_test_good=0,
                              n_test_defect=0, seed=1234, size=size)
    inbox = params.ingest_folders(category).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, path in enumerate(source.path[source.split == "train"]):
        shutil.copyfile(path, inbox / f"new_{i:03d}.png")

    timings = {}
    t0 = time.perf_counter()
    sensor = defs.resolve_sensor_def("inbox_sensor").evaluate_tick(
        dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs))
    timings["sensor tick"] = time.perf_counter() - t0
    for request in sensor.run_requests:
        timings[f"ingest run [{request.partition_key}]"] = run(INGEST_ASSETS, request.partition_key)
    t0 = time.perf_counter()
    schedule = defs.resolve_schedule_def("retrain_schedule").evaluate_tick(
        dg.build_schedule_context(instance=instance, resources=defs.resources, repository_def=defs.get_repository_def()))
    timings["schedule tick"] = time.perf_counter() - t0
    for request in schedule.run_requests:  # one at a time, as the gpu pool would run them
        timings[f"retrain run [{request.partition_key}]"] = run(RETRAIN_ASSETS, request.partition_key)
    total = time.perf_counter() - start

    for what, seconds in timings.items():
        print(f"{what:48} {seconds:8.1f} s")
    print(f"{'inbox -> deployed (excluding waits for the next tick)':48} {total:8.1f} s")
    for method in params.methods:
        decision = deployment_history(params.deploy_dir(method, category))[-1]
        print(f"# {method}: candidate {decision['candidate_id']} {decision['decision']} "
              f"({'; '.join(decision.get('reasons') or []) or 'not worse'})")


if __name__ == "__main__":
    main()
