"""`adpipe`: run the Dagster asset graph in-process, the same code the UI and `dvc repro` run.

    adpipe materialize                                   # the whole graph, every partition
    adpipe materialize --select raw_dataset,dataset --category mvtec_ad/bottle
    adpipe materialize --select dataset,defect_bank --category synthetic/fabric
    adpipe materialize --select model,evaluation --method pfm --category synthetic/fabric
    adpipe partitions                                    # what params.yaml defines

Runs are recorded in the Dagster instance at $DAGSTER_HOME when it is set (so `dagster dev` shows
them), otherwise in a throwaway one.
"""
from __future__ import annotations

import argparse
import os
import sys

ORDER = ["raw_dataset", "dataset", "defect_bank", "model", "evaluation", "report"]


def _instance():
    import dagster as dg
    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def materialize(select: list[str], categories: list[str] | None, methods: list[str] | None,
                params_file: str | None, device: str = "") -> int:
    import dagster as dg

    from pipelines.definitions import build_assets
    from pipelines.params import load_params
    from pipelines.partitions import model_partition_key
    from pipelines.resources import AdpipeResource

    params = load_params(params_file)
    categories = categories or params.categories
    methods = methods or params.methods
    for name, wanted, known in (("category", categories, params.categories), ("method", methods, params.methods)):
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"adpipe: unknown {name} {unknown} (params.yaml has {known})")
    assets = build_assets(params)
    resources = {"adpipe": AdpipeResource(params_file=str(params.file), device=device)}
    instance = _instance()

    def run(selection: list[str], partition_key=None) -> None:
        label = f"{'+'.join(selection)}" + (f" [{partition_key}]" if partition_key else "")
        print(f"adpipe: materializing {label}", file=sys.stderr, flush=True)
        # AssetKeys, not strings: dagster's string-selection parser needs antlr4 4.13, while dvc's
        # hydra dependency pins antlr4 4.9
        dg.materialize(assets, selection=[dg.AssetKey(s) for s in selection], partition_key=partition_key,
                       resources=resources, instance=instance)

    select = [s for s in ORDER if s in select]
    if "raw_dataset" in select:  # the raw datasets behind the chosen categories; generated ones have none
        raw = params.raw_datasets()
        for dataset in dict.fromkeys(c.split("/", 1)[0] for c in categories):
            if dataset in raw:
                run(["raw_dataset"], dataset)
    per_category = [s for s in ("dataset", "defect_bank") if s in select]
    if per_category:
        for category in categories:
            run(per_category, category)
    per_model = [s for s in ("model", "evaluation") if s in select]
    if per_model:
        for category in categories:
            for method in methods:
                run(per_model, model_partition_key(category, method))
    if "report" in select:
        run(["report"])
    return 0


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    if args.command == "partitions":
        from pipelines.params import load_params
        params = load_params(args.params)
        print("categories:", " ".join(params.categories))
        print("methods:", " ".join(params.methods))
        return 0
    select = [s.strip() for s in args.select.split(",") if s.strip()]
    unknown = [s for s in select if s not in ORDER]
    if unknown:
        parser.error(f"unknown assets {unknown}; choose among {ORDER}")
    return materialize(select, args.category, args.method, args.params, args.device)


if __name__ == "__main__":
    sys.exit(main())
