"""The Serve app under load and failure: autoscaling 1 -> 2 -> 1, a killed replica, a full queue.

Jobs must last seconds here, so the app serves the `tiny-wide` preset (a 4-layer, dim-512 DiT over
the tiny codec and text encoder), saved as a model directory: real code paths, no test hooks.
"""

from __future__ import annotations

import json
import uuid

import pytest
import ray

from pusa_ray import storage
from pusa_ray.models.loading import load_components, save_model_dir
from tests.serve_helpers import Api, deploy, local_config, replicas, serve_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]

SLOW_JOB = {"frames": 33, "height": 128, "width": 128, "steps": 12, "guidance": 3.0}


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """The tiny-wide preset saved as a model directory: the service loads a directory here."""
    return save_model_dir(
        load_components("tiny-wide", device="cpu"), tmp_path_factory.mktemp("models") / "wide"
    )


@pytest.fixture(scope="module")
def api(ray_cluster, s3_server, slow_model) -> Api:
    from ray import serve

    bucket = f"s3://scale-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket[5:])
    port = serve_port()
    config = local_config(
        port,
        storage_root=f"{bucket}/serve",
        adapters_prefix=f"{bucket}/adapters",
        inputs_prefix=f"{bucket}/inputs",
        model=slow_model,
    )
    deploy(config)
    client = Api(f"http://127.0.0.1:{port}")
    client.bucket = bucket
    yield client
    serve.delete("pusa")


def test_a_burst_scales_the_generator_to_two_replicas_and_back(api):
    assert replicas() == 1
    ids = [api.post({"prompt": f"burst {i}", **SLOW_JOB, "seed": i}).json()["id"] for i in range(6)]
    wait_for(lambda: replicas() == 2, 120, "the generator to scale up to 2 replicas")
    views = [api.wait(job_id, timeout_s=300) for job_id in ids]
    assert [view["status"] for view in views] == ["completed"] * 6
    wait_for(lambda: replicas() == 1, 120, "the generator to scale back down to 1 replica")


def _replica_actor(tag: str):
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA::") and entry["name"].endswith(f"#{tag}"):
            return ray.get_actor(entry["name"], namespace=entry["namespace"])
    raise AssertionError(f"no replica actor with tag {tag}")


def test_a_killed_replica_ends_with_a_retried_or_failed_job(api):
    job_id = api.post({"prompt": "survive", **SLOW_JOB, "steps": 30}).json()["id"]
    api.wait(job_id, timeout_s=120, statuses=("in_progress",))
    state = storage.read_bytes(f"{api.bucket}/serve/jobs/{job_id}/state.json")
    tag = json.loads(state)["replica"]
    ray.kill(_replica_actor(tag), no_restart=True)
    view = api.wait(job_id, timeout_s=300)
    if view["status"] == "completed":
        assert view["attempts"] >= 2  # it ran again on a new replica
    else:
        assert view["status"] == "failed" and "attempts" in view["error"]


def test_a_full_queue_answers_429_with_retry_after(api):
    ids, refused = [], None
    for i in range(40):
        response = api.post({"prompt": f"flood {i}", **SLOW_JOB, "steps": 50})
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    assert refused is not None, "the queue never filled"
    assert len(ids) == 16  # max_queue in serve/config.local.yaml
    assert int(refused.headers["Retry-After"]) > 0 and "queue is full" in refused.json()["error"]["message"]
    for job_id in ids:
        assert api.delete(job_id).json()["deleted"] is True
    wait_for(lambda: api.get("/healthz").json()["active_jobs"] == 0, 60, "the cancelled jobs to drain")
