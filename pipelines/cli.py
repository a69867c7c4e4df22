"""`adpipe`: run the Dagster asset graph in-process, the same code the UI and `dvc repro` run.

    adpipe materialize                                   # the whole graph, every partition
    adpipe materialize --select raw_dataset,dataset --category mvtec_ad/bottle
    adpipe materialize --select dataset,defect_bank --category synthetic/fabric
    adpipe materialize --select model,evaluation --method pfm --category synthetic/fabric
    adpipe partitions                                    # what params.yaml defines
    adpipe warm -- dvc repro                             # every adpipe call of the command skips the imports
    adpipe instance                                      # prepare the run history `dagster dev` shows
    adpipe worker --queue gpu                            # a celery worker (execution.executor: celery)
    adpipe ingest                                        # take new good images from the inboxes now
    adpipe retrain                                       # retrain (and maybe deploy) what is stale, now
    adpipe retrain --force --method pfm --category synthetic/fabric
    adpipe predict --category synthetic/fabric --method pfm images/*.png --out predictions/

Runs are recorded in the project's Dagster instance ($DAGSTER_HOME, default .dagster_home beside
params.yaml), the one `make dev` opens, so the UI shows every materialization however it was run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ORDER = ["raw_dataset", "ingested_goods", "dataset", "defect_bank", "model", "evaluation", "deployed_model", "report"]
PER_CATEGORY = ["ingested_goods", "dataset", "defect_bank"]
PER_MODEL = ["model", "evaluation", "deployed_model"]


def materialize(select: list[str], categories: list[str] | None, methods: list[str] | None,
                params_file: str | None, device: str = "", pairs: list[tuple[str, str]] | None = None) -> int:
    """Materialize `select` (in ORDER) for the chosen categories and methods; per-model assets for
    each (category, method) of `pairs` when given, else for every combination."""
    import dagster as dg

    from pipelines.definitions import build_assets, build_resources, run_job
    from pipelines.devices import assigning_waiting_steps
    from pipelines.instance import get_instance, reclaim_dead_runs, run_tags
    from pipelines.params import load_params

    params = load_params(params_file)
    categories, methods = _chosen(params, categories, methods)
    assets = build_assets(params)
    resources = build_resources(params, device)
    instance = get_instance(params)
    for run_id in reclaim_dead_runs(instance):
        print(f"adpipe: run {run_id} lost its process; marked failed, its gpu slot freed", file=sys.stderr)
    tags = run_tags()

    executor = params.execution["executor"]

    def run(selection: list[str], partition_key=None) -> None:
        label = f"{'+'.join(selection)}" + (f" [{partition_key}]" if partition_key else "")
        print(f"adpipe: materializing {label}" + ("" if executor == "in_process" else f" ({executor} executor)"),
              file=sys.stderr, flush=True)
        if executor == "in_process":
            # AssetKeys, not strings: dagster's string-selection parser needs antlr4 4.13, while dvc's
            # hydra dependency pins antlr4 4.9
            dg.materialize(assets, selection=[dg.AssetKey(s) for s in selection], partition_key=partition_key,
                           resources=resources, instance=instance, tags=tags)
            return
        result = run_job(params, "adpipe_" + "_".join(selection), partition_key, instance, tags, tuple(selection),
                         device)
        if not result.success:
            raise SystemExit(f"adpipe: the run {result.run_id} of {label} failed (see it in the UI, `make dev`)")

    with assigning_waiting_steps(instance):
        return _materialize_in_order(select, categories, methods, params, pairs, run)


def _materialize_in_order(select: list[str], categories: list[str], methods: list[str], params,
                          pairs: list[tuple[str, str]] | None, run) -> int:
    """The runs, in the graph's order: raw datasets, per category, per model, the report."""
    from pipelines.partitions import model_partition_key
    select = [s for s in ORDER if s in select]
    if "raw_dataset" in select:  # the raw datasets behind the chosen categories; generated ones have none
        raw = params.raw_datasets()
        for dataset in dict.fromkeys(c.split("/", 1)[0] for c in categories):
            if dataset in raw:
                run(["raw_dataset"], dataset)
    per_category = [s for s in PER_CATEGORY if s in select]
    if per_category:
        for category in categories:
            run(per_category, category)
    per_model = [s for s in PER_MODEL if s in select]
    if per_model:
        for category, method in pairs or [(c, m) for c in categories for m in methods]:
            run(per_model, model_partition_key(category, method))
    if "report" in select:
        run(["report"])
    return 0


def _chosen(params, categories: list[str] | None, methods: list[str] | None) -> tuple[list[str], list[str]]:
    """The categories and methods asked for (default: all of params.yaml's), checked."""
    categories = categories or params.categories
    methods = methods or params.methods
    for name, wanted, known in (("category", categories, params.categories), ("method", methods, params.methods)):
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"adpipe: unknown {name} {unknown} (params.yaml has {known})")
    return categories, methods


def ingest_now(categories: list[str] | None, params_file: str | None, device: str = "") -> int:
    """What the inbox sensor does, now: an ingestion run for each category with new files."""
    from pipelines.automation import waiting_by_category
    from pipelines.params import load_params
    params = load_params(params_file)
    categories, _ = _chosen(params, categories, None)
    waiting = {c: f for c, f in waiting_by_category(params).items() if c in categories}
    if not waiting:
        print("adpipe: no new files in the inboxes of " + ", ".join(categories), file=sys.stderr)
        return 0
    for category, files in waiting.items():
        print(f"adpipe: {category}: {len(files)} new file(s)", file=sys.stderr)
    return materialize(PER_CATEGORY, list(waiting), None, params_file, device)


def retrain_now(categories: list[str] | None, methods: list[str] | None, force: bool,
                params_file: str | None, device: str = "") -> int:
    """What the retraining schedule does, now: train, evaluate and deploy-if-not-worse the models
    whose training images changed (every chosen one with --force), then the report."""
    from pipelines.automation import stale_models
    from pipelines.params import load_params
    params = load_params(params_file)
    categories, methods = _chosen(params, categories, methods)
    if force:
        pairs = [(c, m) for c in categories for m in methods]
    else:
        stale = stale_models(params, categories, methods)
        for (category, method), (why, _) in stale.items():
            print(f"adpipe: {method} on {category}: {why}", file=sys.stderr)
        pairs = list(stale)
    if not pairs:
        print("adpipe: every model was trained on its category's current training images", file=sys.stderr)
        return 0
    return materialize(PER_MODEL + ["report"], categories, methods, params_file, device, pairs=pairs)


def predict(category: str, method: str | None, images: list[str], out: str, params_file: str | None,
            device: str = "") -> int:
    """Score images with the deployed model of (method, category); write maps and pass/fail."""
    from ad_models.deploy import deployed_info
    from ad_models.predict import predict_images
    from ad_models.thresholds import expectation
    from pipelines.params import load_params
    params = load_params(params_file)
    _chosen(params, [category], [method] if method else None)
    if method is None:  # the first of params.yaml's methods with a deployed model for the category
        method = next((m for m in params.methods if deployed_info(params.deploy_dir(m, category))), None)
        if method is None:
            raise SystemExit(f"adpipe: no deployed model for {category} yet (run the pipeline, or `adpipe retrain`)")
    folder = params.deploy_dir(method, category)
    if deployed_info(folder) is None:
        raise SystemExit(f"adpipe: no deployed {method} model for {category} in {folder}")
    table = predict_images(folder, images, out, device=device or params.device)
    failed = int((table.verdict == "fail").sum())
    print(f"adpipe: {method} on {category}: {len(table) - failed} pass, {failed} fail "
          f"(threshold {table.threshold.iloc[0]:.4g}); maps and predictions.csv in {out}", file=sys.stderr)
    print(f"adpipe: {expectation(deployed_info(folder)['threshold'])}", file=sys.stderr)
    for row in table.itertuples():
        print(f"{row.verdict}\t{row.score:.6g}\t{row.image}")
    return 0


def worker(queue: str, name: str | None, concurrency: int, params_file: str | None) -> int:
    """Run `dagster-celery worker start` on `queue` with the broker of params.yaml (blocks)."""
    import subprocess

    import yaml

    from ad_models.io import write_text
    from pipelines.devices import device_indices
    from pipelines.execution import celery_config
    from pipelines.instance import dagster_home, get_instance
    from pipelines.params import load_params
    params = load_params(params_file)
    if not params.execution["celery"].get("broker"):
        raise SystemExit(f"adpipe: {params.file} has no execution.celery.broker for the workers to listen to")
    home = dagster_home(params)
    get_instance(params)  # the home, with its settings, for the steps this worker runs
    config = home / f"celery-{queue}.yaml"
    write_text(config, yaml.safe_dump({"execution": {"config": celery_config(params)}}))
    concurrency = concurrency or (max(1, len(device_indices(params))) if queue == "gpu" else 1)
    command = [str(Path(sys.executable).with_name("dagster-celery")), "worker", "start", "-A", "dagster_celery.app",
               "-y", str(config), "-q", queue, "-n", name or queue, "--", "--concurrency", str(concurrency)]
    print(f"adpipe: celery worker on queue {queue}, {concurrency} step(s) at once: {' '.join(command)}", file=sys.stderr)
    bindir = str(Path(sys.executable).parent)  # dagster-celery starts `celery` from PATH
    return subprocess.call(command, env={**os.environ, "DAGSTER_HOME": str(home),
                                         "PATH": bindir + os.pathsep + os.environ.get("PATH", "")})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["warm"]:  # under `adpipe warm`, the warm server runs the command (pipelines/warm.py)
        from pipelines.warm import forward
        code = forward(argv)
        if code is not None:
            return code
    parser = argparse.ArgumentParser(prog="adpipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", help="params.yaml to use (default: $ADPIPE_PARAMS or ./params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    mat = sub.add_parser("materialize", help="materialize assets in-process")
    mat.add_argument("--select", default=",".join(ORDER),
                     help=f"comma-separated assets among {ORDER} (default: all, in order)")
    mat.add_argument("--category", action="append", help="a '<dataset>/<category>' partition (repeatable)")
    mat.add_argument("--method", action="append", help="a method partition (repeatable)")
    mat.add_argument("--device", default="", help="torch device override: cpu, cuda, cuda:1, auto")
    sub.add_parser("partitions", help="print the category and method partitions")
    wrm = sub.add_parser("warm", help="run a command (e.g. dvc repro) with a warm server behind its adpipe calls")
    wrm.add_argument("run", nargs=argparse.REMAINDER, help="the command, after --")
    sub.add_parser("instance", help="prepare the run history (DAGSTER_HOME) that `dagster dev` opens; print its path")
    wrk = sub.add_parser("worker", help="a celery worker for params.yaml's execution.celery broker")
    wrk.add_argument("--queue", required=True, choices=["gpu", "cpu"], help="gpu: training, evaluation, deployment")
    wrk.add_argument("--name", help="worker name (default: the queue's name); '@<host>' is appended")
    wrk.add_argument("--concurrency", type=int, default=0,
                     help="steps at once (default: one per device of execution.devices for gpu, 1 for cpu)")
    ing = sub.add_parser("ingest", help="take new good images from data/incoming/<category>/good/ now")
    ing.add_argument("--category", action="append", help="a category (repeatable; default: all)")
    ing.add_argument("--device", default="")
    ret = sub.add_parser("retrain", help="train, evaluate and deploy-if-not-worse the stale models now")
    ret.add_argument("--category", action="append", help="a category (repeatable; default: all)")
    ret.add_argument("--method", action="append", help="a method (repeatable; default: all)")
    ret.add_argument("--force", action="store_true", help="retrain the chosen models even if up to date")
    ret.add_argument("--device", default="")
    pre = sub.add_parser("predict", help="score images with the deployed model: maps + pass/fail")
    pre.add_argument("--category", required=True, help="the '<dataset>/<category>' the images show")
    pre.add_argument("--method", help="default: the first of params.yaml's methods with a deployed model")
    pre.add_argument("--out", default="predictions", help="folder for maps, masks and predictions.csv")
    pre.add_argument("--device", default="")
    pre.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)

    if args.command == "partitions":
        from pipelines.params import load_params
        params = load_params(args.params)
        print("categories:", " ".join(params.categories))
        print("methods:", " ".join(params.methods))
        return 0
    if args.command == "warm":
        from pipelines.warm import warm
        return warm(args.run[1:] if args.run[:1] == ["--"] else args.run)
    if args.command == "instance":
        from pipelines.instance import dagster_home, get_instance, reclaim_dead_runs
        from pipelines.params import load_params
        params = load_params(args.params)
        reclaim_dead_runs(get_instance(params))
        print(dagster_home(params))
        return 0
    if args.command == "worker":
        return worker(args.queue, args.name, args.concurrency, args.params)
    if args.command == "ingest":
        return ingest_now(args.category, args.params, args.device)
    if args.command == "retrain":
        return retrain_now(args.category, args.method, args.force, args.params, args.device)
    if args.command == "predict":
        return predict(args.category, args.method, args.images, args.out, args.params, args.device)
    select = [s.strip() for s in args.select.split(",") if s.strip()]
    unknown = [s for s in select if s not in ORDER]
    if unknown:
        parser.error(f"unknown assets {unknown}; choose among {ORDER}")
    return materialize(select, args.category, args.method, args.params, args.device)


if __name__ == "__main__":
    sys.exit(main())
