"""Raw datasets in the graph: a LOCO archive downloaded from a local server, verified, extracted
once, restructured into two views, evaluated with LOCO's own metrics and reported apart."""
import hashlib
import json
import tarfile

import dagster as dg
import pytest
import yaml

from ad_models.data.layout import read_inputs_record, read_manifest
from pipelines.definitions import build_definitions
from pipelines.params import ParamsError, load_params
from pipelines.partitions import model_partition_key
from test_mvtec_folder import build_mvtec_tree, write_image
from test_mvtec_loco import CATEGORY, build_loco_tree


@pytest.fixture
def loco_params(tmp_path, http_server):
    tree = build_loco_tree(tmp_path / "tree")
    archive = http_server.root / "mvtec_loco_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(tree / "mvtec_loco_anomaly_detection", arcname="mvtec_loco_anomaly_detection")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    params = {
        "data_root": "data",
        "datasets": {"loco": {"source": "mvtec_loco",
                              "options": {"url": f"{http_server.url}/{archive.name}", "sha256": sha256}},
                     "synthetic": {"source": "synthetic",
                                   "options": {"n_train": 6, "n_test_good": 2, "n_test_defect": 4, "size": 32}}},
        "categories": [f"loco/{CATEGORY}", f"loco/{CATEGORY}.structural", "synthetic/granite"],
        "methods": ["mean_image"],
        "method_config": {"mean_image": {"image_size": 32}},
        "defect_bank": {"image_size": 32, "min_holdout": 2},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path), http_server


def _materialize(defs, selection, partition_key=None):
    return dg.materialize(defs.assets, selection=[dg.AssetKey(s) for s in selection], partition_key=partition_key,
                          resources=defs.resources, instance=dg.DagsterInstance.ephemeral())


def test_raw_partitions_and_mapping(loco_params):
    params, _ = loco_params
    assert params.raw_datasets() == ["loco"]  # synthetic is generated: no raw partition
    defs = build_definitions(params, progress=False)
    graph = defs.resolve_asset_graph()
    dataset = graph.get(dg.AssetKey("dataset"))
    # the raw download and the goods ingested from the inbox feed the dataset
    assert {k.to_user_string() for k in dataset.parent_keys} == {"raw_dataset", "ingested_goods"}


def test_loco_through_the_graph(loco_params):
    params, server = loco_params
    defs = build_definitions(params, progress=False)

    raw = _materialize(defs, ["raw_dataset"], "loco")
    meta = raw.asset_materializations_for_node("raw_dataset")[0].metadata
    assert meta["files"].value > 10
    assert "sha256" in meta["verified_checksum"].value
    downloads = [r for r in server.requests if r.endswith(".tar.xz")]
    assert len(downloads) == 1

    for category in params.categories[:2]:
        result = _materialize(defs, ["dataset", "defect_bank"], category)
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["manifest_is_valid"].passed
        # the test tree is a few images per folder: far from the published counts, and the check says so
        assert not checks["counts_as_published"].passed
        assert "expected" in checks["counts_as_published"].metadata["problems"].value
        meta = result.asset_materializations_for_node("dataset")[0].metadata
        assert meta["samples"].value.startswith("![samples](data:image/png;base64,")
    assert len([r for r in server.requests if r.endswith(".tar.xz")]) == 1  # extracted once, reused

    structural = params.dataset_dir(f"loco/{CATEGORY}.structural")
    types = set(__import__("pandas").read_csv(structural / "manifest.csv").defect_type)
    assert types == {"good", "structural_anomalies"}

    for category in params.categories[:2]:
        key = model_partition_key(category, "mean_image")
        assert _materialize(defs, ["model", "evaluation"], key).success
    metrics = json.loads((params.eval_dir("mean_image", f"loco/{CATEGORY}") / "metrics.json").read_text())
    for key in ("auspro_0.05", "auspro_0.3", "image_auroc_logical", "image_auroc_structural"):
        assert 0.0 <= metrics[key] <= 1.0, key
    view = json.loads((params.eval_dir("mean_image", f"loco/{CATEGORY}.structural") / "metrics.json").read_text())
    assert view["image_auroc_logical"] is None  # NaN in the file: no logical images in this view
    assert 0.0 <= view["auspro_0.3_structural"] <= 1.0

    for category in params.categories[2:]:
        _materialize(defs, ["dataset", "defect_bank"], category)
        _materialize(defs, ["model", "evaluation"], model_partition_key(category, "mean_image"))
    assert _materialize(defs, ["report"]).success
    html = (params.report_dir / "report.html").read_text()
    assert "sPRO@0.05" in html and "logical_anomalies" in html and "structural_anomalies" in html


def test_unknown_view_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "datasets": {"loco": {"source": "mvtec_loco"}},
        "categories": [f"loco/{CATEGORY}.sideways"], "methods": ["mean_image"]}))
    with pytest.raises(ParamsError, match="unknown view 'sideways'.*structural"):
        load_params(path)


def test_user_mvtec_folder_through_the_graph(tmp_path):
    """A user's MVTec-layout folder per category ({category} in source_dir) becomes the dataset asset
    with the user's split, then trains and evaluates; a change of the user's files shows."""
    lines = tmp_path / "lines"
    for name in ("capacitor", "resistor"):
        build_mvtec_tree(lines / name)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "data_root": "data",
        "datasets": {"mine": {"source": "mvtec_folder", "options": {"source_dir": "lines/{category}"}}},
        "categories": ["mine/capacitor", "mine/resistor"],
        "methods": ["mean_image"],
        "method_config": {"mean_image": {"image_size": 32}},
        "defect_bank": {"image_size": 32, "min_holdout": 2}}))
    params = load_params(path)
    assert params.raw_datasets() == []  # one folder per category: nothing dataset-wide to fetch first
    defs = build_definitions(params, progress=False)

    def dataset_run():
        result = _materialize(defs, ["dataset"], "mine/capacitor")
        materialization = result.asset_materializations_for_node("dataset")[0]
        return result, materialization.metadata, materialization.tags["dagster/data_version"]

    result, meta, version = dataset_run()
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["manifest_is_valid"].passed and checks["counts_as_published"].passed  # none published
    assert (meta["train_good"].value, meta["validation_good"].value, meta["test_good"].value,
            meta["test_defective"].value) == (4, 1, 2, 3)
    folder = params.dataset_dir("mine/capacitor")
    assert set(read_manifest(folder).defect_type) == {"good", "broken_large", "scratch"}
    inputs = read_inputs_record(folder)
    assert meta["inputs_sha256"].value == inputs["sha256"][:16] and meta["inputs_files"].value == inputs["files"]

    write_image(lines / "capacitor" / "test" / "good" / "002.png")  # a new test image: not a training change
    _, _, same_version = dataset_run()
    assert same_version == version and read_inputs_record(folder)["sha256"] != inputs["sha256"]
    write_image(lines / "capacitor" / "train" / "good" / "004.png")  # a new training image: models go stale
    _, meta, new_version = dataset_run()
    assert new_version != version and meta["train_good"].value == 5

    key = model_partition_key("mine/capacitor", "mean_image")
    assert _materialize(defs, ["defect_bank"], "mine/capacitor").success
    assert _materialize(defs, ["model", "evaluation"], key).success
    metrics = json.loads((params.eval_dir("mean_image", "mine/capacitor") / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0
