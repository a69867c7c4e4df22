"""The Dagster code location and the whole graph, end to end, on a tiny synthetic dataset."""
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import dagster as dg
import pytest

from pipelines.definitions import build_definitions
from pipelines.params import ParamsError, load_params
from pipelines.partitions import model_partition_key
from tests.tiny_project import BIN, ROOT, new_good, write_params


def test_default_params_define_the_graph():
    defs = build_definitions(load_params(ROOT / "params.yaml"))
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_dataset", "ingested_goods", "dataset", "defect_bank", "model", "evaluation",
                    "deployed_model", "report"}
    # magnetic tile is configured (a download) but not among the categories; synthetic is generated
    assert graph.get(dg.AssetKey("raw_dataset")).partitions_def.get_partition_keys() == ["magnetic_tile"]
    model = graph.get(dg.AssetKey("model"))
    assert set(model.partitions_def.get_partition_keys()) >= {"synthetic/fabric|pfm", "synthetic/circuit|pefm"}
    assert {k.to_user_string() for k in model.parent_keys} == {"dataset", "defect_bank"}


def test_bad_params_are_clear(tmp_path):
    with pytest.raises(ParamsError, match="unknown category 'nope'.*known: fabric, granite, circuit"):
        load_params(write_params(tmp_path, categories=["synthetic/nope"]))
    with pytest.raises(ParamsError, match="method 'nope'"):
        load_params(write_params(tmp_path, methods=["nope"]))
    with pytest.raises(ParamsError, match="unknown keys"):
        load_params(write_params(tmp_path, epochs=3))
    with pytest.raises(ParamsError, match=r"pfm for synthetic/fabric with budget 'tiny' \(budgets.tiny.pfm, then method_config.pfm\): PFMConfig: unknown option\(s\) \['epoch'\]"):
        load_params(write_params(tmp_path, method_config={"pfm": {"epoch": 3}}))
    with pytest.raises(ParamsError, match=r"method_config.pfm.per_category: 'synthetic/fabrik': .*fabrik"):
        load_params(write_params(tmp_path, method_config={"pfm": {"per_category": {"synthetic/fabrik": {}}}}))


def test_the_decision_policy_is_chosen_per_category_and_checked(tmp_path):
    decision = {"max_false_alarm_rate": 0.03,
                "per_category": {"synthetic/circuit": {"policy": "fixed", "image_threshold": {"pfm": 0.3},
                                                       "pixel_threshold": 0.2}}}
    params = load_params(write_params(tmp_path, decision=decision))
    assert params.decision_policy("synthetic/fabric").max_false_alarm_rate == 0.03
    assert params.decision_policy("synthetic/circuit").fixed_threshold("image_threshold", "pfm") == 0.3
    assert load_params(ROOT / "params.yaml").decision_policy("synthetic/fabric").policy == "false_alarm_rate"
    with pytest.raises(ParamsError, match=r"decision for synthetic/fabric: max_false_alarm_rate must be .* got 5"):
        load_params(write_params(tmp_path, decision={"max_false_alarm_rate": 5}))
    with pytest.raises(ParamsError, match=r"decision.per_category: 'synthetic/fabrik'"):
        load_params(write_params(tmp_path, decision={"per_category": {"synthetic/fabrik": {}}}))
    with pytest.raises(ParamsError, match=r"retraining.good_quantile is now decision.max_false_alarm_rate"):
        load_params(write_params(tmp_path, retraining={"good_quantile": 0.99}))


def test_a_named_budget_sets_every_methods_settings_in_one_line(tmp_path):
    budgets = {"cpu": {"pfm": {"image_size": 64, "epochs": 3, "per_category": {"synthetic/fabric": {"epochs": 5}}}}}
    own = {"pfm": {"batch_size": 2, "per_category": {"synthetic/fabric": {"image_size": 32}}}}
    cpu = load_params(write_params(tmp_path, budget="cpu", budgets=budgets, method_config=own))
    # the budget's settings, then the user's own; each with its per-category entry
    assert cpu.method_options("pfm", "synthetic/fabric") == {"image_size": 32, "epochs": 5, "batch_size": 2}
    assert cpu.method_options("pfm", "synthetic/granite") == {"image_size": 64, "epochs": 3, "batch_size": 2}
    paper = load_params(write_params(tmp_path, budget="paper", budgets=budgets, method_config=own))
    assert paper.method_options("pfm", "synthetic/granite") == {"batch_size": 2}  # the method's defaults: its paper's
    assert load_params(write_params(tmp_path, budget=None, budgets=budgets)).budget == "paper"  # no budget named: the papers'
    with pytest.raises(ParamsError, match=r"budget 'gpu' is not defined; defined: \['cpu', 'paper'\]"):
        load_params(write_params(tmp_path, budget="gpu", budgets=budgets))
    with pytest.raises(ParamsError, match=r"budgets.cpu: unknown methods \['pfn'\]"):
        load_params(write_params(tmp_path, budgets={"cpu": {"pfn": {}}}))
    # a typo in a budget that is not chosen fails now, not when someone switches to it
    with pytest.raises(ParamsError, match=r"with budget 'fast' \(budgets.fast.pfm.*unknown option\(s\) \['epoch'\]"):
        load_params(write_params(tmp_path, budget="cpu", budgets={**budgets, "fast": {"pfm": {"epoch": 1}}}))
    # the repository's own params: the CPU budget for every method, the papers' one switch away
    repo = load_params(ROOT / "params.yaml")
    assert repo.budget == "cpu" and set(repo.budgets["cpu"]) == {"pfm", "pefm", "ndpnet", "slsg", "esad", "bvpn"}
    # the papers' settings, with only the project's own choice of image score over them
    assert dataclasses.replace(repo, budget="paper").method_options("pfm", "synthetic/fabric") == {"score_top_k": 328}


def test_whole_graph_end_to_end(tmp_path):
    params = load_params(write_params(tmp_path))
    defs = build_definitions(params, device="cpu", progress=False)
    assets = list(defs.assets)
    instance = dg.DagsterInstance.ephemeral()
    for category in params.categories:
        result = dg.materialize(assets, selection=[dg.AssetKey("dataset"), dg.AssetKey("defect_bank")],
                                partition_key=category, resources=defs.resources, instance=instance)
        meta = result.asset_materializations_for_node("dataset")[0].metadata
        assert meta["train_good"].value == 10 and meta["test_defective"].value == 8
        assert all(c.passed for c in result.get_asset_check_evaluations())
        bank = result.asset_materializations_for_node("defect_bank")[0].metadata
        assert bank["held_out_good"].value == 2 and bank["defective"].value == 4
        assert bank["train_remaining"].value == 8 and "data:image/png;base64," in bank["preview"].value
    for category in params.categories:
        for method in params.methods:
            result = dg.materialize(assets, selection=[dg.AssetKey("model"), dg.AssetKey("evaluation")],
                                    partition_key=model_partition_key(category, method),
                                    resources=defs.resources, instance=instance)
            trained = result.asset_materializations_for_node("model")[0].metadata
            assert trained["train_images"].value == 8 and trained["budget"].value == "tiny"
            if method == "pfm":
                assert trained["training_precision"].value == "float32"
            meta = result.asset_materializations_for_node("evaluation")[0].metadata
            assert 0.0 <= meta["image_auroc"].value <= 1.0 and 0 <= meta["bank_recall"].value <= 1
            assert meta["expected_false_alarm_rate"].value <= 0.02 + 1e-9
            # 2 good images held out, none failing: at most 78 % with 95 % confidence
            assert meta["false_alarm_rate_bound"].value == pytest.approx(1 - 0.05 ** (1 / 2))
            assert meta["decision_policy"].value.startswith("at most 2.00% of good parts fail")
            checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
            assert "expected" in checks["false_alarms_as_expected"].metadata
            assert "data:image/png;base64," in meta["gallery"].value
    dg.materialize(assets, selection=[dg.AssetKey("report")], resources=defs.resources, instance=instance)

    data = tmp_path / "data"
    for method in params.methods:
        model_dir = data / "models" / method / "synthetic" / "fabric"
        assert {"config.json", "weights.pt", "training_log.json"} <= {p.name for p in model_dir.iterdir()}
        calibration = json.loads((data / "eval" / method / "synthetic" / "fabric" / "calibration.json").read_text())
        assert calibration["policy"]["policy"] == "false_alarm_rate" and calibration["n_good_images"] == 2
        assert json.loads((model_dir / "config.json").read_text())["budget"] == "tiny"
        metrics = json.loads((data / "eval" / method / "synthetic" / "fabric" / "metrics.json").read_text())
        assert metrics["budget"] == "tiny" and metrics["n_test"] == 12 and set(metrics["image_auroc_per_defect_type"]) == {
            "scratch", "hole", "stain", "crack"}
    report = (data / "reports" / "report.html").read_text()
    assert "synthetic/circuit" in report and "AUPRO" in report and report.count("data:image/png;base64,") >= 6
    assert "<script src" not in report and "<link" not in report  # self-contained
    assert "<th>budget</th>" in report and "<td>tiny</td>" in report
    assert "Pass/fail decisions: at most 2.00% of good parts fail" in report and "<th>false alarms expected</th>" in report
    assert 'alt="pfm learning curve for synthetic/fabric"' in report and "mean_image learning curve" not in report
    dvc_metrics = json.loads((data / "reports" / "metrics.json").read_text())
    assert set(dvc_metrics["synthetic/fabric"]) == {"pfm", "mean_image"}
    assert len(list((data / "reports" / "roc").glob("*.csv"))) == 4
    assert not list(data.rglob("*.tmp")), "temporary files left behind"


def test_ndpnet_through_the_graph(tmp_path):
    """NDP-Net as a partition like any other: trained beside its bank, calibrated, evaluated, reported."""
    ndpnet = {"image_size": 64, "widths": [8, 8, 16, 16, 16], "ffm_channels": 8, "phase1_epochs": 1,
              "phase2_epochs": 2, "batch_size": 4, "select_every": 1}
    params = load_params(write_params(tmp_path, categories=["synthetic/fabric"], methods=["ndpnet"],
                                      method_config={"ndpnet": ndpnet}))
    defs = build_definitions(params, device="cpu", progress=False)
    assets, instance = list(defs.assets), dg.DagsterInstance.ephemeral()
    assert dg.materialize(assets, selection=[dg.AssetKey("dataset"), dg.AssetKey("defect_bank")],
                          partition_key="synthetic/fabric", resources=defs.resources, instance=instance).success
    result = dg.materialize(assets, selection=[dg.AssetKey("model"), dg.AssetKey("evaluation")],
                            partition_key=model_partition_key("synthetic/fabric", "ndpnet"),
                            resources=defs.resources, instance=instance)
    trained = result.asset_materializations_for_node("model")[0].metadata
    assert trained["selected_epoch"].value in (1, 2) and "bank image AUROC" in trained["checkpoint_selection"].value
    assert "def_per" in trained["loss_curve"].value
    assert "data:image/png;base64," in trained["learning_curve"].value
    assert "tf_efficientnet_lite0" in trained["weights"].value["perceptual"]
    evaluated = result.asset_materializations_for_node("evaluation")[0].metadata
    assert 0 <= evaluated["image_auroc"].value <= 1 and 0 <= evaluated["f1_at_threshold"].value <= 1
    assert dg.materialize(assets, selection=[dg.AssetKey("report")], resources=defs.resources,
                          instance=instance).success
    report = (tmp_path / "data" / "reports" / "report.html").read_text()
    assert "ndpnet" in report and 'alt="ndpnet learning curve for synthetic/fabric"' in report


def test_esad_and_slsg_through_the_graph_with_per_category_options(tmp_path):
    """ESAD and SLSG as partitions like any other; SLSG's simulated-anomaly rules set per category."""
    esad = {"image_size": 32, "widths": [8, 8, 16, 16, 16], "feature_network": "efficientnet_lite0", "epochs": 2,
            "batch_size": 4, "select_every": 1, "test_cell_sizes": [8, 16], "smoothing_sigma": 1.0}
    slsg = {"image_size": 64, "decoder_widths": [16, 16, 8, 8], "aux_width": 8, "iterations": 4, "batch_size": 2,
            "select_every": 2, "per_category": {"synthetic/circuit": {"foreground": True, "scar_probability": 0.9}}}
    params = load_params(write_params(tmp_path, methods=["esad", "slsg"], method_config={"esad": esad, "slsg": slsg}))
    assert params.method_options("slsg", "synthetic/circuit")["foreground"] is True
    assert "foreground" not in params.method_options("slsg", "synthetic/fabric")
    defs = build_definitions(params, device="cpu", progress=False)
    assets, instance = list(defs.assets), dg.DagsterInstance.ephemeral()
    for category in params.categories:
        assert dg.materialize(assets, selection=[dg.AssetKey("dataset"), dg.AssetKey("defect_bank")],
                              partition_key=category, resources=defs.resources, instance=instance).success
        for method in params.methods:
            result = dg.materialize(assets, selection=[dg.AssetKey("model"), dg.AssetKey("evaluation")],
                                    partition_key=model_partition_key(category, method),
                                    resources=defs.resources, instance=instance)
            trained = result.asset_materializations_for_node("model")[0].metadata
            assert "bank image AUROC" in trained["checkpoint_selection"].value
            assert ("| iteration |" if method == "slsg" else "| epoch |") in trained["loss_curve"].value
            evaluated = result.asset_materializations_for_node("evaluation")[0].metadata
            assert 0 <= evaluated["image_auroc"].value <= 1 and 0 <= evaluated["pixel_auroc"].value <= 1
    saved = {c: json.loads((tmp_path / "data" / "models" / "slsg" / c / "config.json").read_text())["config"]
             for c in params.categories}
    assert saved["synthetic/circuit"]["foreground"] and saved["synthetic/circuit"]["scar_probability"] == 0.9
    assert not saved["synthetic/fabric"]["foreground"]
    assert dg.materialize(assets, selection=[dg.AssetKey("report")], resources=defs.resources,
                          instance=instance).success
    report = (tmp_path / "data" / "reports" / "report.html").read_text()
    assert "esad" in report and "slsg" in report


def test_cli_runs_a_selection(tmp_path):
    from pipelines.cli import main
    params = write_params(tmp_path, categories=["synthetic/granite"], methods=["mean_image"])
    assert main(["--params", str(params), "materialize", "--select", "dataset,defect_bank,model"]) == 0
    assert (tmp_path / "data" / "models" / "mean_image" / "synthetic" / "granite" / "weights.pt").is_file()
    assert not (tmp_path / "data" / "eval").exists()
    # recorded in the project's instance beside params.yaml, where `make dev` looks
    instance = dg.DagsterInstance.from_config(str(tmp_path / ".dagster_home"))
    assert instance.get_materialized_partitions(dg.AssetKey("model")) == {
        model_partition_key("synthetic/granite", "mean_image")}
    assert instance.get_materialized_partitions(dg.AssetKey("dataset")) == {"synthetic/granite"}
    with pytest.raises(SystemExit):
        main(["--params", str(params), "materialize", "--category", "synthetic/fabric"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dagster_dev(home: Path, params: Path):
    """`dagster dev` over the instance in `home`, on 127.0.0.1; yields a GraphQL query function once
    the code location serves its assets (stopped on exit)."""
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ADPIPE_PARAMS": str(params)}
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    proc = subprocess.Popen([str(BIN / "dagster"), "dev", "-m", "pipelines.definitions", "-p", str(port),
                             "-h", "127.0.0.1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def graphql(query: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=5).read())["data"]

    try:
        deadline, served = time.time() + 120, False
        while time.time() < deadline and not served:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                served = bool(graphql("{ assetNodes { assetKey { path } } }")["assetNodes"])
            except (OSError, KeyError, TypeError, ValueError):
                time.sleep(1)
        assert served, "dagster dev did not serve the asset graph within 120 s"
        graphql.base_url = f"http://127.0.0.1:{port}"
        yield graphql
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine can make the graceful shutdown slow
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_dagster_dev_loads_the_code_location(tmp_path):
    """`dagster dev` starts, loads pipelines.definitions and serves its assets over GraphQL."""
    with dagster_dev(tmp_path, ROOT / "params.yaml") as graphql:
        nodes = graphql("{ assetNodes { assetKey { path } } }")["assetNodes"]
    assert {n["assetKey"]["path"][0] for n in nodes} == {"raw_dataset", "ingested_goods", "dataset", "defect_bank",
                                                        "model", "evaluation", "deployed_model", "report"}


@pytest.mark.slow
def test_the_ui_shows_what_the_cli_materialized(tmp_path):
    """One run history: `adpipe materialize` (what every DVC stage runs) records into the project's
    instance, and `dagster dev` over it lists the materialized partitions with their metadata."""
    from pipelines.cli import main
    params = write_params(tmp_path, categories=["synthetic/granite"], methods=["mean_image"])
    assert main(["--params", str(params), "materialize", "--select", "dataset,defect_bank,model"]) == 0
    with dagster_dev(tmp_path / ".dagster_home", params) as graphql:
        asset = graphql('{ assetOrError(assetKey: {path: ["model"]}) { ... on Asset { assetMaterializations '
                        '{ partition metadataEntries { label } } } } }')["assetOrError"]
        page = render_in_chromium(f"{graphql.base_url}/assets/model?view=partitions", tmp_path / "model_asset.png")
    [materialization] = asset["assetMaterializations"]
    assert set(materialization["partition"].split("|")) == {"synthetic/granite", "mean_image"}
    assert {"train_seconds", "budget"} <= {e["label"] for e in materialization["metadataEntries"]}
    # what a person opening the UI sees: the asset page lists the materialized partition
    assert "mean_image" in page and "synthetic/granite" in page
    assert cv2.imread(str(tmp_path / "model_asset.png")).std() > 10  # a drawn page, not a blank one


def render_in_chromium(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it, from headless Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian package chromium)")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
              "--virtual-time-budget=20000"]
    subprocess.run(common + [f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    return subprocess.run(common + ["--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=120).stdout


@pytest.mark.slow
def test_dvc_repro_rebuilds_and_then_does_nothing(tmp_path):
    """In a fresh git repository: `dvc repro` builds data/, a second one does nothing, and
    `dvc metrics show` / `dvc plots show` read the report's outputs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "ad_models", repo / "ad_models", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo, categories=["synthetic/granite"], methods=["mean_image"])
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "config", "core.analytics", "false")
    first = run(str(BIN / "dvc"), "repro")
    assert "Running stage 'train@mean_image-synthetic/granite'" in first
    model_runs = dg.DagsterInstance.from_config(str(repo / ".dagster_home")).fetch_materializations(
        dg.AssetKey("model"), limit=10).records
    assert [r.asset_materialization.partition for r in model_runs] == ["synthetic/granite|mean_image"]
    assert (repo / "data" / "reports" / "report.html").is_file()
    assert (repo / "data" / "deployed" / "mean_image" / "synthetic" / "granite" / "current" / "weights.pt").is_file()
    second = run(str(BIN / "dvc"), "repro")
    # only the inbox is looked at again (it is not versioned); with nothing new, nothing else runs
    assert [line for line in second.splitlines() if "Running stage" in line] == [
        "Running stage 'ingest@synthetic/granite':"]
    assert "Stage 'train@mean_image-synthetic/granite' didn't change, skipping" in second
    shown = run(str(BIN / "dvc"), "metrics", "show", "--json")
    metrics = json.loads(shown)
    values = next(iter(metrics.values()))["data"]["data/reports/metrics.json"]["data"]
    assert 0.0 <= values["synthetic/granite"]["mean_image"]["image_auroc"] <= 1.0
    plots = run(str(BIN / "dvc"), "plots", "show", "--json")
    assert "mean_image__synthetic__granite.csv" in plots
    # another decision policy: thresholds are set again by evaluation and deployment, nothing is retrained
    write_params(repo, categories=["synthetic/granite"], methods=["mean_image"], decision={"max_false_alarm_rate": 0.05})
    policy = run(str(BIN / "dvc"), "repro")
    assert {line for line in policy.splitlines() if "Running stage" in line} == {
        f"Running stage '{stage}':" for stage in ("ingest@synthetic/granite", "evaluate@mean_image-synthetic/granite",
                                                  "deploy@mean_image-synthetic/granite", "report")}
    deployed = json.loads((repo / "data" / "deployed" / "mean_image" / "synthetic" / "granite" / "current"
                           / "deployment.json").read_text())
    assert deployed["threshold"]["policy"]["max_false_alarm_rate"] == 0.05
    # a new good image in the inbox: the category's dataset, bank, model, evaluation and deployment go stale
    inbox = repo / "data" / "incoming" / "synthetic" / "granite" / "good"
    inbox.mkdir(parents=True)
    new_good(tmp_path / "new", "granite", 1, inbox)
    third = run(str(BIN / "dvc"), "repro")
    for stage in ("ingest@synthetic/granite", "dataset@synthetic/granite", "train@mean_image-synthetic/granite",
                  "deploy@mean_image-synthetic/granite", "report"):
        assert f"Running stage '{stage}'" in third, third[-3000:]
    # the retraining joins the same run history
    assert len(dg.DagsterInstance.from_config(str(repo / ".dagster_home")).fetch_materializations(
        dg.AssetKey("model"), limit=10).records) == 2
    assert not any(inbox.iterdir())
