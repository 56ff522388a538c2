"""Autoscaling from zero on Ray's fake multi-node provider, node types derived from cluster.yaml (issue 7).

The head's autoscaler launches "nodes" (a raylet each, on this machine) of cluster.yaml's own node
types: names, min/max workers and custom resources as shipped, CPUs and GPUs scaled down (`SCALED`),
a short idle timeout. GPUs are logical here: nothing has CUDA, and the code falls back to the CPU
(gloo and CPU tensors in training, a CPU generator in Serve). The tests assert node counts by type,
polled with generous deadlines, never timings:

- the training job (jobs/train.py, 2 one-GPU workers asking `train_node` as train.wan14b.yaml does)
  launches one `gpu_train` node and no `gpu_serve` node, trains, and the node is released;
- the Serve app of serve/config.yaml (Generator: one GPU and `serve_node` per replica) launches one
  `gpu_serve` node per replica, generates over HTTP, and the nodes are released once it is deleted.

Ray's `AutoscalingCluster` is not used: its start/shutdown run `ray stop --force`, which kills every
Ray process of the user on the machine, and it reads an example config the 2.60 wheel lacks. The
head is started by tests/cluster_helpers.py the same way (RAY_FAKE_CLUSTER=1, a 1 s update
interval) and only its own processes are ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch

from pusa_ray import video
from pusa_ray.data.latents import encode_prompts_unpadded, tensor_to_bytes, write_shard
from pusa_ray.models.description import describe_model
from pusa_ray.models.loading import load_components
from pusa_ray.preprocessing import commit as committing
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import plan as planning
from tests.cluster_helpers import (
    LocalCluster,
    derive,
    fake_cluster_config,
    nodes_by_type,
    shipped,
    torch_extensions_dir,
    wait_for_nodes,
    write_yaml,
)
from tests.serve_helpers import API_KEY, Api, free_port, moving_square

pytestmark = [pytest.mark.ray]

# cluster.yaml's node types scaled to this machine (shipped: head 8 CPUs; gpu_train 192 CPUs and
# 8 GPUs; gpu_serve 16 CPUs and 1 GPU); custom resources (train_node, serve_node, the head's) and
# min/max workers as shipped.
SCALED = {"head": {"CPU": 2}, "gpu_train": {"CPU": 1, "GPU": 2}, "gpu_serve": {"CPU": 1, "GPU": 1}}
IDLE_TIMEOUT_MINUTES = 0.1  # shipped: 10
LAUNCH_S, RELEASE_S = 240, 240  # generous deadlines: other work shares these 2 cores
FRAMES, HEIGHT, WIDTH, CLIPS = 17, 32, 48, 4
# Drivers on the test's cluster (never the session's in-process one): deploy a config the way
# `serve run` does and wait until it runs (its replicas need new nodes first); delete the app.
DEPLOY = (
    "import json, sys, ray; from tests.serve_helpers import deploy; "
    "ray.init(); deploy(json.load(open(sys.argv[1])), timeout_s=420)"
)
DELETE = "import ray; from ray import serve; ray.init(); serve.delete('pusa')"


def scaled(node_type: str, resources: dict[str, float]) -> dict[str, float]:
    return {**resources, **SCALED[node_type]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    scratch = tmp_path_factory.mktemp("autoscaling")
    config = fake_cluster_config(shipped("cluster.yaml"), scaled, IDLE_TIMEOUT_MINUTES)
    env = {
        "TORCH_EXTENSIONS_DIR": torch_extensions_dir(scratch),
        "PUSA_RAY_CACHE": str(scratch / "cache"),
        shipped("serve/config.yaml")["applications"][0]["args"]["api_key_env"]: API_KEY,
    }
    head = dict(config["available_node_types"]["ray.head.default"]["resources"])
    cluster = LocalCluster.start(
        head.pop("CPU"), resources=head, dashboard=False, autoscaling_config=config, env=env
    )
    try:
        yield cluster
    finally:
        cluster.stop()
    assert cluster.processes() == [], "processes of the test's cluster outlived it"


def tiny_latent_dataset(output: Path) -> str:
    """A committed latent dataset of a few clips, written with the preprocessing job's own writer."""
    tiny = load_components("tiny", device="cpu")
    keys = [f"clip{index}" for index in range(CLIPS)]
    captions = [f"a square crossing, number {index}" for index in range(CLIPS)]
    pixels = torch.stack(
        [video.frames_to_tensor(moving_square(FRAMES, HEIGHT, WIDTH, i)) for i in range(CLIPS)]
    )
    latents = tiny.codec.encode(pixels)  # [N, C, F, h, w]
    contexts = encode_prompts_unpadded(tiny.tokenizer, tiny.text_encoder, captions)
    records = pa.table(
        {
            "key": keys,
            "uri": [f"/raw/{key}.mp4" for key in keys],
            "caption": captions,
            "start": [0.0] * CLIPS,
            "source_size": [1] * CLIPS,
            "source_version": ["1"] * CLIPS,
            "latents": [tensor_to_bytes(latent, "float32") for latent in latents],
            "latents_dtype": ["float32"] * CLIPS,
            "latents_shape": [list(latents.shape[1:])] * CLIPS,
            "context": [tensor_to_bytes(context, "float32") for context in contexts],
            "context_dtype": ["float32"] * CLIPS,
            "context_length": [context.shape[0] for context in contexts],
            "context_dim": [context.shape[1] for context in contexts],
        }
    )
    write_shard(records, str(output), "shards/run-1-a.parquet", "run-1")
    config = prep_config.parse_config(
        {"input": "/unused", "output": str(output), "frames": FRAMES, "height": HEIGHT, "width": WIDTH}
    )
    clips = [
        planning.PlannedClip(k, f"/raw/{k}.mp4", c, 0.0, 1, "1") for k, c in zip(keys, captions, strict=True)
    ]
    plan = planning.Plan(clips=clips, todo=[], errors=[], already_present=0, duplicates=0)
    committing.commit(config, describe_model("tiny"), plan, "run-1", 0, 1.0)
    return str(output)


def watch_nodes(cluster: LocalCluster, process: Any, timeout_s: float) -> list[dict[str, int]]:
    """Node counts by type, sampled until `process` ends."""
    seen, deadline = [], time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        seen.append(nodes_by_type(cluster))
        time.sleep(0.5)
    return seen


def test_training_demand_launches_a_gpu_train_node_which_is_released_when_idle(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    wait_for_nodes(cluster, {}, LAUNCH_S, "no worker node at rest (min_workers: 0)")
    # The tiny recipe, with the GPU shape of train.wan14b.yaml: one GPU and the shipped train_node
    # share per worker (CPUs scaled to the fake node); 2 workers fill one scaled gpu_train node.
    gpu_scaling = shipped("jobs/configs/train.wan14b.yaml")["scaling"]
    overrides = {
        "latents": tiny_latent_dataset(tmp_path / "latents"),
        "steps": 2,
        "validation.videos": None,
        "scaling.workers": 2,
        "scaling.gpus_per_worker": gpu_scaling["gpus_per_worker"],
        "scaling.cpus_per_worker": 0.5,
        "scaling.resources_per_worker": gpu_scaling["resources_per_worker"],
        "run.storage_path": str(tmp_path / "runs"),
        "export.prefix": str(tmp_path / "adapters"),
    }
    config = write_yaml(tmp_path / "train.yaml", derive("jobs/configs/train.tiny.yaml", overrides))
    log = tmp_path / "train.log"
    job = cluster.driver("jobs/train.py", "--config", config, log=log)
    try:
        wait_for_nodes(cluster, {"gpu_train": 1}, LAUNCH_S, "a gpu_train node for the training workers")
        seen = watch_nodes(cluster, job, timeout_s=600)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait(timeout=60)
    output = log.read_text(errors="replace")
    assert job.returncode == 0, output[-6000:]
    assert "train: 2 steps" in output, output[-3000:]
    assert "rank 0 of 2 on cpu (fp32, gloo)" in output, output[-3000:]  # logical GPUs, no CUDA: the CPU
    assert all(counts.get("gpu_serve", 0) == 0 and counts.get("gpu_train", 0) <= 1 for counts in seen), seen
    wait_for_nodes(cluster, {}, RELEASE_S, "the idle gpu_train node to be released")


def test_generator_replicas_launch_gpu_serve_nodes_which_are_released_when_idle(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    wait_for_nodes(cluster, {}, RELEASE_S, "no worker node at rest")
    port = free_port()
    generator = "applications.0.deployments.1"
    assert shipped("serve/config.yaml")["applications"][0]["deployments"][1]["name"] == "Generator"
    overrides = {
        # Fake nodes share this machine's network: one proxy, on a free loopback port.
        "proxy_location": "HeadOnly",
        "http_options.host": "127.0.0.1",
        "http_options.port": port,
        # Storage and model: local paths and the tiny preset.
        "applications.0.args.model": "tiny",
        "applications.0.args.storage_root": str(tmp_path / "serve"),
        "applications.0.args.adapters_prefix": str(tmp_path / "adapters"),
        "applications.0.args.allowed_input_prefixes": [],
        # Resources and replicas: half of a scaled gpu_serve node's CPU (shipped: 8 of 16); GPU and
        # serve_node as shipped; two replicas (shipped: 0..8, from zero on demand).
        f"{generator}.ray_actor_options.num_cpus": 0.5,
        f"{generator}.autoscaling_config.min_replicas": 2,
        f"{generator}.autoscaling_config.max_replicas": 2,
    }
    config = derive("serve/config.yaml", overrides)
    (tmp_path / "serve.json").write_text(json.dumps(config))
    cluster.run_driver("-c", DEPLOY, str(tmp_path / "serve.json"), log=tmp_path / "deploy.log", timeout_s=600)
    wait_for_nodes(cluster, {"gpu_serve": 2}, LAUNCH_S, "one gpu_serve node per one-GPU replica")

    api = Api(f"http://127.0.0.1:{port}", key=API_KEY)
    response = api.post({"prompt": "a red square", "frames": 9, "height": 32, "width": 32, "steps": 2})
    assert response.status_code == 202, response.text
    view = api.wait(response.json()["id"], timeout_s=300)
    assert view["status"] == "completed", view  # a generator on a logical-GPU node ran on the CPU

    cluster.run_driver("-c", DELETE, log=tmp_path / "delete.log", timeout_s=300)
    wait_for_nodes(cluster, {}, RELEASE_S, "the idle gpu_serve nodes to be released")
