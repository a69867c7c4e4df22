"""Retraining on new good samples, driven in-process: the inbox sensor, the retraining schedule, the
deployment gate as an asset with its check, `adpipe ingest/retrain/predict`."""
import json

import dagster as dg
import pandas as pd
import pytest
import yaml

from ad_models import runs
from pipelines.automation import INGEST_ASSETS, RETRAIN_ASSETS, ingest_run_key
from pipelines.cli import main
from pipelines.definitions import build_definitions
from pipelines.params import ParamsError, load_params
from pipelines.partitions import model_partition_key
from tests.tiny_project import TINY, new_good

FABRIC, CIRCUIT = "synthetic/fabric", "synthetic/circuit"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two categories, prepared, trained, evaluated and deployed with the cheap mean-image method."""
    root = tmp_path_factory.mktemp("automation")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({**TINY, "methods": ["mean_image"], "ingest": {"min_age_seconds": 0},
                                    "retraining": {"cron": "30 3 * * *", "tolerance": 0.05},
                                    # a few good images cannot show a 1 % tail: the threshold would pass everything
                                    "decision": {"max_false_alarm_rate": 0.1}}))
    params = load_params(path)
    defs = build_definitions(params, device="cpu", progress=False)
    instance = dg.DagsterInstance.ephemeral()
    for category in params.categories:
        assert materialize(defs, instance, INGEST_ASSETS, category).success
        assert materialize(defs, instance, RETRAIN_ASSETS, model_partition_key(category, "mean_image")).success
    return {"root": root, "params": params, "defs": defs, "instance": instance}


def materialize(defs, instance, selection, partition_key):
    return dg.materialize(list(defs.assets), selection=selection, partition_key=partition_key,
                          resources=defs.resources, instance=instance)


def sensor_requests(t) -> list[dg.RunRequest] | dg.SkipReason:
    sensor = t["defs"].resolve_sensor_def("inbox_sensor")
    # `with`: the accelerator resource is a context manager (it claims a device), as the daemon opens it
    with dg.build_sensor_context(instance=t["instance"], resources=t["defs"].resources,
                                 definitions=t["defs"]) as context:
        result = sensor.evaluate_tick(context)
    return result.run_requests or result.skip_message


def schedule_requests(t) -> list[dg.RunRequest] | str:
    schedule = t["defs"].resolve_schedule_def("retrain_schedule")
    with dg.build_schedule_context(instance=t["instance"], resources=t["defs"].resources,
                                   repository_def=t["defs"].get_repository_def()) as context:
        result = schedule.evaluate_tick(context)
    return result.run_requests or result.skip_message


def test_the_schedule_and_pools_come_from_params(trained):
    defs, params = trained["defs"], trained["params"]
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "30 3 * * *" and schedule.job_name == "retrain"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert defs.resolve_sensor_def("inbox_sensor").minimum_interval_seconds == 30
    graph = defs.resolve_asset_graph()
    for key in ("model", "evaluation", "deployed_model"):  # one GPU step at a time (dagster.yaml's limit)
        assert graph.get(dg.AssetKey(key)).pools == {"gpu"}
    with pytest.raises(ParamsError, match="retraining.cron: 'nightly' is not a cron string"):
        load_params(write(trained["root"] / "bad.yaml", retraining={"cron": "nightly"}))
    with pytest.raises(ParamsError, match="ingest: unknown ingest rule"):
        load_params(write(trained["root"] / "bad.yaml", ingest={"min_size": 3}))
    assert params.retraining["timezone"] == "UTC"  # defaults fill what the file leaves out


def write(path, **changes):
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def test_new_files_trigger_ingestion_of_their_category_only_then_retraining_of_its_models(trained):
    t, params = trained, trained["params"]
    assert schedule_requests(t) == "every model was trained on its category's current training images"
    assert sensor_requests(t) == "no new files in the inboxes"

    inbox, rejected, store = params.ingest_folders(FABRIC)
    inbox.mkdir(parents=True)
    dropped = new_good(t["root"] / "new_fabric", "fabric", 2, inbox)
    (inbox / "notes.png").write_text("not an image")
    requests = sensor_requests(t)
    assert [r.partition_key for r in requests] == [FABRIC]
    assert sensor_requests(t)[0].run_key == requests[0].run_key  # the same inbox: the same run, not a new one

    before = materialize_dataset_version(t, FABRIC)
    result = materialize(t["defs"], t["instance"], INGEST_ASSETS, requests[0].partition_key)
    ingested = result.asset_materializations_for_node("ingested_goods")[0].metadata
    assert ingested["added"].value == 2 and ingested["rejected"].value == 1
    assert "notes.png" in ingested["rejected_files"].value and "does not decode" in ingested["rejected_files"].value
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "inbox_files_accepted")
    assert not check.passed and "notes.png" in check.metadata["reasons"].value
    assert not any(inbox.iterdir()) and (rejected / "notes.png.reason.txt").is_file()
    dataset = result.asset_materializations_for_node("dataset")[0]
    assert dataset.metadata["train_good"].value == 12 and dataset.metadata["train_good_ingested"].value == 2
    counts = next(c for c in result.get_asset_check_evaluations() if c.check_name == "counts_as_published")
    assert counts.passed  # the ingested images come on top of the source's published counts
    assert dataset.tags["dagster/data_version"] != before  # what the UI marks models stale by
    assert len(dropped) == 2

    requests = schedule_requests(t)
    assert [r.partition_key for r in requests] == [model_partition_key(FABRIC, "mean_image")]
    assert "the training images changed" in requests[0].tags["adpipe/why"]
    result = materialize(t["defs"], t["instance"], RETRAIN_ASSETS, requests[0].partition_key)
    log = json.loads((params.model_dir("mean_image", FABRIC) / "training_log.json").read_text())
    assert log["counts"]["train"] == 12 - 2  # the two new images trained on; the bank holds two out
    deployed = result.asset_materializations_for_node("deployed_model")[0].metadata
    assert deployed["decisions"].value == 2 and deployed["decision"].value in ("deployed", "rejected")
    assert schedule_requests(t) == "every model was trained on its category's current training images"


def materialize_dataset_version(t, category) -> str:
    """The data version of the category's latest `dataset` materialization."""
    records = t["instance"].fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("dataset"), asset_partitions=[category]), limit=1).records
    return records[0].asset_materialization.tags["dagster/data_version"]


def test_the_ingest_run_key_changes_only_when_there_is_reason_to_look_again(trained, tmp_path):
    params = trained["params"]
    (tmp_path / "a.png").write_bytes(b"x")
    files = [tmp_path / "a.png"]
    key = ingest_run_key(params, FABRIC, files, now=7200.0)
    assert ingest_run_key(params, FABRIC, files, now=7300.0) == key  # the same files within the hour: no new run
    assert ingest_run_key(params, FABRIC, files, now=10800.0) != key  # a crashed run is retried the next hour
    (tmp_path / "b.png").write_bytes(b"y")
    assert ingest_run_key(params, FABRIC, files + [tmp_path / "b.png"], now=7200.0) != key
    assert ingest_run_key(params, CIRCUIT, files, now=7200.0) != key


def test_a_worse_candidate_is_not_deployed(trained, tmp_path):
    t, params = trained, trained["params"]
    partition = model_partition_key(CIRCUIT, "mean_image")
    current = params.deploy_dir("mean_image", CIRCUIT) / "current" / "deployment.json"
    before = json.loads(current.read_text())["candidate_id"]
    # a model of fabric offered as the circuit's: far worse on the circuit's bank
    runs.train("mean_image", {"image_size": 64}, params.dataset_dir(FABRIC), params.model_dir("mean_image", CIRCUIT),
               device="cpu", progress=False)
    result = materialize(t["defs"], t["instance"], [dg.AssetKey("deployed_model")], partition)
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "candidate_not_worse" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN and "<" in check.metadata["reasons"].value
    meta = result.asset_materializations_for_node("deployed_model")[0].metadata
    assert meta["decision"].value == "rejected" and meta["deployed"].value == before
    assert json.loads(current.read_text())["candidate_id"] == before
    assert (params.deploy_dir("mean_image", CIRCUIT) / "rejected" / meta["candidate"].value / "weights.pt").is_file()
    # the report shows the deployed model and its history
    assert materialize(t["defs"], t["instance"], [dg.AssetKey("report")], None).success
    report = (params.report_dir / "report.html").read_text()
    assert "Deployed models" in report and before in report and "rejected" in report


def test_cli_ingests_retrains_and_predicts_with_the_deployed_model(trained, tmp_path, capsys):
    params = trained["params"]
    flags = ["--params", str(params.file)]
    assert main(flags + ["ingest"]) == 0
    assert "no new files" in capsys.readouterr().err
    inbox = params.ingest_folders(CIRCUIT).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    new_good(tmp_path / "new_circuit", "circuit", 1, inbox)
    assert main(flags + ["ingest", "--category", CIRCUIT]) == 0
    assert not any(inbox.iterdir())
    assert main(flags + ["retrain", "--category", CIRCUIT]) == 0
    err = capsys.readouterr().err
    assert "mean_image on synthetic/circuit: the training images changed" in err
    assert main(flags + ["retrain"]) == 0 and "every model was trained" in capsys.readouterr().err

    images = sorted((params.dataset_dir(CIRCUIT) / "test").rglob("*.png"))
    out = tmp_path / "predictions"
    assert main(flags + ["predict", "--category", CIRCUIT, "--out", str(out)] + [str(p) for p in images]) == 0
    err = capsys.readouterr().err  # what the line should expect, stated with the verdicts
    assert "policy: at most 10.00% of good parts fail" in err and "expected false alarms:" in err
    assert "artificial defects caught on the bank:" in err
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == len(images) and set(table.verdict) <= {"pass", "fail"}
    defective = table.image.str.contains("/test/(?!good)", regex=True)
    assert (table.verdict[defective] == "fail").mean() > (table.verdict[~defective] == "fail").mean()
    assert len(list(out.glob("*_map.png"))) == len(images)
    with pytest.raises(SystemExit, match="unknown category"):
        main(flags + ["predict", "--category", "synthetic/granite", str(images[0])])
