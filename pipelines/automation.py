"""Retraining on new good samples: a sensor on the inboxes, a schedule that retrains stale models.

- `inbox_sensor` polls data/incoming/<dataset>/<category>/good/ and, for each category with new
  files, requests one run of `ingest_new_goods` (ingested_goods -> dataset -> defect_bank) for that
  category. The dataset's data version then changes exactly when its training images did.
- `retrain_schedule` (params.yaml `retraining.cron`, nightly by default) requests one run of
  `retrain` (model -> evaluation -> deployed_model) per (category, method) whose model was trained
  on other training images than the category's current ones, or was never trained; nothing else.
- "Retrain now": launch `retrain` for chosen partitions from the UI, or `adpipe retrain`.

Both decide from files (the inbox listing; the data version recorded in each training log), so
`adpipe`, the UI and `dvc repro` agree on what is stale. The model, evaluation and deployment steps
share the `gpu` concurrency pool (dagster.yaml: one at a time), so a nightly batch queues.
"""
from __future__ import annotations

import hashlib
import time

import dagster as dg

from ad_models.data.ingest import store_version, training_data_version, waiting_files
from ad_models.runs import why_retrain
from pipelines.params import Params
from pipelines.partitions import category_partitions, model_partition_key, model_partitions
from pipelines.resources import AdpipeResource

INGEST_JOB = "ingest_new_goods"
RETRAIN_JOB = "retrain"
# AssetKeys, not strings: dagster's string-selection parser needs antlr4 4.13, dvc's hydra pins 4.9
INGEST_ASSETS = [dg.AssetKey(k) for k in ("ingested_goods", "dataset", "defect_bank")]
RETRAIN_ASSETS = [dg.AssetKey(k) for k in ("model", "evaluation", "deployed_model")]


def build_jobs(params: Params) -> list[dg.UnresolvedAssetJobDefinition]:
    return [
        dg.define_asset_job(INGEST_JOB, selection=INGEST_ASSETS, partitions_def=category_partitions(params),
                            description="Take the new good images of a category's inbox into its training set, "
                                        "then rebuild its dataset and defect bank."),
        dg.define_asset_job(RETRAIN_JOB, selection=RETRAIN_ASSETS, partitions_def=model_partitions(params),
                            description="Train, evaluate and (if not worse) deploy a model."),
    ]


def ingest_run_key(params: Params, category: str, files, now: float | None = None) -> str:
    """A run key that changes when there is reason to look again: the waiting files (names, sizes,
    modification times), the store (some files of a crashed run were added), the prepared dataset
    (files wait for it) or the hour (a run that crashed before adding anything is retried hourly,
    not on every tick)."""
    stats = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    manifest = params.dataset_dir(category) / "manifest.csv"
    stats += [store_version(params.ingest_folders(category).store),
              str(manifest.stat().st_mtime_ns) if manifest.is_file() else "not prepared",
              str(int((time.time() if now is None else now) // 3600))]
    digest = hashlib.sha256("\n".join(stats).encode()).hexdigest()[:16]
    return f"{category}:{digest}"


def waiting_by_category(params: Params) -> dict[str, list]:
    """The inbox files each category's next ingestion would take (categories with none left out)."""
    rules = params.ingest_rules()
    waiting = {c: waiting_files(params.ingest_folders(c).inbox, rules) for c in params.categories}
    return {c: files for c, files in waiting.items() if files}


def stale_models(params: Params, categories: list[str] | None = None,
                 methods: list[str] | None = None) -> dict[tuple[str, str], tuple[str, str]]:
    """{(category, method): (why it needs training, the category's current data version)} for the
    models not trained on their category's current training images. Categories whose dataset is
    not prepared yet are left out (there is nothing to train on)."""
    stale = {}
    for category in categories or params.categories:
        dataset = params.dataset_dir(category)
        if not (dataset / "manifest.csv").is_file():
            continue
        version = training_data_version(dataset)
        for method in methods or params.methods:
            why = why_retrain(params.model_dir(method, category), version)
            if why:
                stale[category, method] = (why, version)
    return stale


def build_inbox_sensor(params: Params) -> dg.SensorDefinition:
    # running from the start: dropping files into an inbox is the whole user interface
    @dg.sensor(name="inbox_sensor", job_name=INGEST_JOB, default_status=dg.DefaultSensorStatus.RUNNING,
               minimum_interval_seconds=int(params.retraining["inbox_poll_seconds"]),
               description="New files in data/incoming/<dataset>/<category>/good/ -> one ingestion run for that "
                           "category (checks each file, adds the valid ones, rejects the others with a reason).")
    def inbox_sensor(context: dg.SensorEvaluationContext, adpipe: AdpipeResource):
        waiting = waiting_by_category(adpipe.params)
        if not waiting:
            return dg.SkipReason("no new files in the inboxes")
        for category, files in waiting.items():
            context.log.info(f"{category}: {len(files)} new file(s), e.g. {files[0].name}")
            yield dg.RunRequest(run_key=ingest_run_key(adpipe.params, category, files), partition_key=category,
                                tags={"adpipe/new_files": str(len(files))})

    return inbox_sensor


def build_retrain_schedule(params: Params) -> dg.ScheduleDefinition:
    cfg = params.retraining

    @dg.schedule(name="retrain_schedule", job_name=RETRAIN_JOB, cron_schedule=cfg["cron"],
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 execution_timezone=cfg["timezone"],
                 description=f"Retrain ({cfg['cron']}, {cfg['timezone']}) only the (method, category) models whose "
                             f"training images changed since they were trained; each is then evaluated and "
                             f"deployed if not worse than the deployed one.")
    def retrain_schedule(context: dg.ScheduleEvaluationContext, adpipe: AdpipeResource):
        stale = stale_models(adpipe.params)
        if not stale:
            return dg.SkipReason("every model was trained on its category's current training images")
        requests = []
        for (category, method), (why, version) in stale.items():
            context.log.info(f"{method} on {category}: {why}")
            requests.append(dg.RunRequest(run_key=f"{category}|{method}|{version[:16]}",
                                          partition_key=model_partition_key(category, method),
                                          tags={"adpipe/why": why[:200]}))
        return requests

    return retrain_schedule
