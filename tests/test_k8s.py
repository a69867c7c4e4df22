"""Kubernetes without a cluster: the Job specs dagster-k8s builds for our steps (as its launch_step
does), the executor's config, and the shipped Helm values."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines.definitions import build_definitions
from pipelines.execution import build_executor, k8s_config
from pipelines.params import ParamsError, load_params
from tests.tiny_project import write_params

pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed (the `scale` extra)")
from dagster._config import validate_config  # noqa: E402
from dagster_k8s import k8s_job_executor  # noqa: E402
from dagster_k8s.container_context import K8sContainerContext  # noqa: E402
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = {"image": "registry.example/adpipe:1.0", "namespace": "adpipe", "data_volume_claim": "adpipe-data",
       "gpu_node_selector": {"nvidia.com/gpu.present": "true"},
       "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}

# what the chart's K8sRunLauncher contributes to every step Job (its settings, no cluster needed)
CHART_RUN_LAUNCHER = SimpleNamespace(job_image=None, dagster_home="/opt/dagster/dagster_home",
                                     instance_config_map="adpipe-dagster-instance",
                                     postgres_password_secret="dagster-postgresql-secret")


def step_job(params, step: str) -> dict:
    """The Job a k8s_job_executor launches for `step`: executor config merged with the step's tags."""
    asset = next(a for a in build_definitions(params).assets if a.key.path[0] == step)
    config = k8s_config(params)
    context = K8sContainerContext(namespace=config["job_namespace"], env_vars=config["env_vars"],
                                  volumes=config.get("volumes"), volume_mounts=config.get("volume_mounts"))
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(asset.op.tags)))
    job = construct_dagster_k8s_job(context.get_k8s_job_config(config["job_image"], CHART_RUN_LAUNCHER),
                                    args=["dagster", "api", "execute_step"], job_name=f"dagster-step-{step}",
                                    user_defined_k8s_config=context.run_k8s_config, component="step_worker")
    return job.to_dict()


def test_a_training_step_asks_for_a_gpu_node_and_a_dataset_step_does_not(tmp_path):
    params = load_params(write_params(tmp_path, execution={"executor": "k8s", "k8s": K8S}))
    train, dataset = step_job(params, "model"), step_job(params, "dataset")
    for job in (train, dataset):
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/adpipe:1.0"
        assert container["args"] == ["dagster", "api", "execute_step"]
        assert {"name": "ADPIPE_PARAMS", "value": str(params.file)} in [
            {"name": e["name"], "value": e["value"]} for e in container["env"]]
        assert container["volume_mounts"][0]["mount_path"] == str(params.data_root)
        assert job["spec"]["template"]["spec"]["volumes"][0]["persistent_volume_claim"]["claim_name"] == "adpipe-data"
    [gpu_container] = train["spec"]["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"] == {"nvidia.com/gpu": "1"}  # a Kubernetes quantity
    assert train["spec"]["template"]["spec"]["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert train["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    [cpu_container] = dataset["spec"]["template"]["spec"]["containers"]
    assert not (cpu_container.get("resources") or {}).get("limits")
    assert not dataset["spec"]["template"]["spec"].get("node_selector")


def test_the_k8s_executor_config_is_valid_and_required_settings_are_named(tmp_path):
    params = load_params(write_params(tmp_path, execution={"executor": "k8s", "k8s": K8S, "max_concurrent": 4}))
    assert build_executor(params).name == "k8s"
    checked = validate_config(k8s_job_executor.config_schema.config_type, k8s_config(params))
    assert checked.success, checked.errors
    with pytest.raises(ParamsError, match="execution.k8s.image"):
        load_params(write_params(tmp_path, execution={"executor": "k8s"}))
    with pytest.raises(ParamsError, match="execution.k8s takes"):
        load_params(write_params(tmp_path, execution={"k8s": {"gpus": 1}}))


def test_the_helm_values_run_the_code_location_of_the_dockerfile():
    values = yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {deployment['port']}" in dockerfile and "pip install" in dockerfile
