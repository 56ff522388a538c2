"""Every shipped config validates against Ray's own schemas and our typed configs."""

from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent


def load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    validate_config(prepare_config(config))  # Ray's ray-schema.json plus its own checks
    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"  # pinned to our Ray, not ray-ml
    nodes = config["available_node_types"]
    gpu_types = [name for name, node in nodes.items() if node["resources"].get("GPU")]
    assert {"gpu_train", "gpu_serve"} <= set(gpu_types)
    assert all(nodes[name]["min_workers"] == 0 for name in gpu_types)  # scale from zero
    assert nodes["gpu_train"]["resources"]["GPU"] == 8 and nodes["gpu_serve"]["resources"]["GPU"] == 1
    assert config["idle_timeout_minutes"] > 0
    text = (REPO / "cluster.yaml").read_text()
    assert "aws_access_key" not in text.lower() and "AKIA" not in text  # instance profiles, not keys
    assert all("IamInstanceProfile" in node["node_config"] for node in nodes.values())


@pytest.mark.parametrize("path", ["serve/config.yaml", "serve/config.local.yaml"])
def test_serve_configs_validate(path):
    from ray.serve.schema import ServeDeploySchema

    from pusa_ray.serving.settings import ServiceSettings

    config = ServeDeploySchema.model_validate(load(path))
    (app,) = config.applications
    assert app.import_path == "pusa_ray.serving.app:build_app"
    ServiceSettings.model_validate(app.args)
    deployments = {deployment.name: deployment for deployment in app.deployments}
    generator = deployments["Generator"]
    assert generator.max_ongoing_requests == 1
    assert generator.autoscaling_config["target_ongoing_requests"] == 1
    assert generator.graceful_shutdown_timeout_s >= 120


def test_serve_gpu_config_targets_the_serving_nodes():
    generator = load("serve/config.yaml")["applications"][0]["deployments"][1]
    serve_node = load("cluster.yaml")["available_node_types"]["gpu_serve"]["resources"]
    assert generator["ray_actor_options"]["num_gpus"] <= serve_node["GPU"]
    assert set(generator["ray_actor_options"]["resources"]) <= set(serve_node)


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(REPO)) for p in (REPO / "jobs/configs").glob("generate.*.yaml"))
)
def test_batch_generation_configs_validate(path):
    from pusa_ray.distributed.batch import BatchConfig

    BatchConfig.model_validate(load(path))


def test_unknown_service_settings_are_refused():
    from pydantic import ValidationError

    from pusa_ray.serving.settings import ServiceSettings

    with pytest.raises(ValidationError, match="colour"):
        ServiceSettings.model_validate({"storage_root": "/tmp/x", "colour": "red"})


# --- KubeRay variant (k8s/): the same images, configs and scaling as cluster.yaml and serve/ -----

K8S_MANIFESTS = {"k8s/rayjob-train.yaml": "RayJob", "k8s/rayservice.yaml": "RayService"}


def k8s_documents(path: str) -> list[dict]:
    return [document for document in yaml.safe_load_all((REPO / path).read_text()) if document]


def k8s_object(path: str, kind: str) -> dict:
    (found,) = [document for document in k8s_documents(path) if document["kind"] == kind]
    return found


def ray_cluster_spec(path: str) -> dict:
    """The RayCluster spec inside a RayJob (rayClusterSpec) or a RayService (rayClusterConfig)."""
    spec = k8s_object(path, K8S_MANIFESTS[path])["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def pod_templates(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]


def group_gpus(group: dict) -> int:
    ray_container = group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first
    return int(ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def autoscaler_node_types(cluster: dict) -> dict:
    """What Ray's own KubeRay autoscaler reads from this RayCluster spec (validated by Ray on the way)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {"metadata": {"name": "pusa", "namespace": "default"}, "spec": cluster}
    return _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]


def nodes_launched_for(node_types: dict, head_type: str, demands: list[dict]) -> dict:
    """The node types Ray's autoscaler would add for `demands` on a cluster holding only its head."""
    import functools

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    added, unmet = get_nodes_for(node_types, {head_type: 1}, head_type, 100, demands, scorer)
    assert unmet == [], f"no node type fits {unmet}"
    return dict(added)


@pytest.mark.parametrize("path", sorted(K8S_MANIFESTS))
def test_k8s_manifests_parse_into_ray_io_v1_objects(path):
    documents = k8s_documents(path)
    assert {(document["apiVersion"], document["kind"]) for document in documents} == {
        ("v1", "ServiceAccount"),
        ("ray.io/v1", K8S_MANIFESTS[path]),
    }
    assert all(document["metadata"]["name"] for document in documents)
    cluster = ray_cluster_spec(path)
    node_types = autoscaler_node_types(cluster)  # raises if Ray's autoscaler could not read the spec
    assert set(node_types) == {"headgroup"} | {group["groupName"] for group in cluster["workerGroupSpecs"]}


@pytest.mark.parametrize("path", sorted(K8S_MANIFESTS))
def test_k8s_images_are_cluster_yaml_image_and_installed_ray(path):
    image = load("cluster.yaml")["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"
    cluster = ray_cluster_spec(path)
    assert cluster["rayVersion"] == ray.__version__
    for template in pod_templates(cluster):
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            assert container["image"] == image, container["name"]


@pytest.mark.parametrize("path", sorted(K8S_MANIFESTS))
def test_k8s_gpu_groups_start_at_zero_and_autoscale(path):
    cluster = ray_cluster_spec(path)
    assert cluster["enableInTreeAutoscaling"] is True  # else a group at 0 replicas never grows
    assert (
        cluster["autoscalerOptions"]["idleTimeoutSeconds"]
        == load("cluster.yaml")["idle_timeout_minutes"] * 60
    )
    gpu_groups = [group for group in cluster["workerGroupSpecs"] if group_gpus(group)]
    assert gpu_groups
    for group in gpu_groups:
        assert group["replicas"] == 0 and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    assert group_gpus({"template": cluster["headGroupSpec"]["template"]}) == 0  # a CPU head, as cluster.yaml


@pytest.mark.parametrize("path", sorted(K8S_MANIFESTS))
def test_k8s_s3_access_through_a_service_account_not_keys(path):
    (account,) = [document for document in k8s_documents(path) if document["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for template in pod_templates(ray_cluster_spec(path)):
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    text = (REPO / path).read_text()
    assert "AWS_ACCESS_KEY" not in text.upper() and "AWS_SECRET" not in text.upper() and "AKIA" not in text


def test_rayjob_runs_the_shipped_train_config_on_an_8_gpu_group():
    import shlex

    from ray.runtime_env import RuntimeEnv

    from pusa_ray.training.config import load_config

    job = k8s_object("k8s/rayjob-train.yaml", "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    RuntimeEnv(**yaml.safe_load(job["runtimeEnvYAML"]))  # Ray's own runtime_env validation
    python, script, flag, config_path = shlex.split(job["entrypoint"])
    assert (python, script, flag) == ("python", "jobs/train.py", "--config")
    assert config_path == "jobs/configs/train.wan14b.yaml"
    assert (REPO / script).is_file() and (REPO / config_path).is_file()
    config = load_config(REPO / config_path)  # our typed train config, unknown keys refused
    cluster = job["rayClusterSpec"]
    (gpu_group,) = [group for group in cluster["workerGroupSpecs"] if group_gpus(group)]
    assert (
        group_gpus(gpu_group) == load("cluster.yaml")["available_node_types"]["gpu_train"]["resources"]["GPU"]
    )
    # The trainer's workers (build_trainer's resources_per_worker) launch exactly that group.
    scaling = config.scaling
    worker = {"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker, **scaling.resources_per_worker}
    added = nodes_launched_for(autoscaler_node_types(cluster), "headgroup", [worker] * scaling.workers)
    assert (
        set(added) == {gpu_group["groupName"]} and added[gpu_group["groupName"]] <= gpu_group["maxReplicas"]
    )


def test_rayservice_serves_exactly_serve_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    from pusa_ray.serving.settings import ServiceSettings

    service = k8s_object("k8s/rayservice.yaml", "RayService")["spec"]
    served = yaml.safe_load(service["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(served).applications
    ServiceSettings.model_validate(app.args)
    shipped = load("serve/config.yaml")
    assert served["applications"] == shipped["applications"]  # the two cannot drift
    assert served == shipped
    # The Generator's replicas (num_gpus, num_cpus, serve_node) land on the GPU group, and only there.
    generator = {deployment.name: deployment for deployment in app.deployments}["Generator"]
    options = generator.ray_actor_options
    demand = {"CPU": options.num_cpus, "GPU": options.num_gpus, **options.resources}
    cluster = service["rayClusterConfig"]
    (gpu_group,) = [group for group in cluster["workerGroupSpecs"] if group_gpus(group)]
    replicas = generator.autoscaling_config["max_replicas"]
    added = nodes_launched_for(autoscaler_node_types(cluster), "headgroup", [demand] * replicas)
    assert added == {gpu_group["groupName"]: replicas} and gpu_group["maxReplicas"] >= replicas
    # The Ingress runs on the head group only: no GPU node is kept from scaling down by it.
    ingress = {deployment.name: deployment for deployment in app.deployments}["Ingress"].ray_actor_options
    hosts = [
        name
        for name, node_type in autoscaler_node_types(cluster).items()
        if all(node_type["resources"].get(key, 0) >= need for key, need in ingress.resources.items())
    ]
    assert ingress.resources and hosts == ["headgroup"]
    # api_key_env: the Ingress refuses to start without the key.
    for template in pod_templates(cluster):
        env = {item["name"]: item for item in template["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env[app.args["api_key_env"]]["valueFrom"]


def test_the_shipped_gpu_workflow_configs_agree_on_every_uri():
    """preprocess -> train -> serve / batch generation: each step reads what the one before writes."""
    preprocess = load("jobs/configs/preprocess.wan14b.yaml")
    generate = load("jobs/configs/generate.wan14b.yaml")
    app = load("serve/config.yaml")["applications"][0]["args"]
    model = preprocess["model"]
    for path in ("jobs/configs/train.wan14b.yaml", "jobs/configs/train.wan1.3b.yaml"):
        train = load(path)
        assert train["latents"] == preprocess["output"], path  # 1.3B and 14B share the VAE and UMT5
        assert train["export"]["prefix"] == app["adapters_prefix"], path
    assert (
        load("jobs/configs/train.wan14b.yaml")["model"]["base"] == model == app["model"] == generate["model"]
    )
    assert all(adapter["uri"].startswith(app["adapters_prefix"] + "/") for adapter in generate["adapters"])


def test_the_preprocessing_job_brings_up_one_training_node_not_serving_nodes():
    """Ray's bin-packing over cluster.yaml's node types, fed the shipped GPU preprocessing config's actors."""
    from pusa_ray.preprocessing.config import load_config

    config = load_config(REPO / "jobs/configs/preprocess.wan14b.yaml")
    demands = []
    for pool in (config.resources.decode, config.resources.vae, config.resources.text):
        demand = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
        demands += [demand] * pool.actors
    writer = config.resources.writer
    demands += [{"CPU": writer.num_cpus, **writer.resources}] * writer.actors
    cluster = load("cluster.yaml")
    assert nodes_launched_for(cluster["available_node_types"], cluster["head_node_type"], demands) == {
        "gpu_train": 1
    }


def test_every_service_setting_is_in_the_reference_table():
    from pusa_ray.models.speed import SpeedSettings
    from pusa_ray.serving.settings import Limits, ServiceSettings

    text = (REPO / "docs" / "reference.md").read_text()
    names = [n for n in ServiceSettings.model_fields if n not in ("limits", "speed")]
    names += [f"limits.{n}" for n in Limits.model_fields] + [f"speed.{n}" for n in SpeedSettings.model_fields]
    missing = [name for name in names if f"| `{name}` |" not in text]
    assert missing == []
