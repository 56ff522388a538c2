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
