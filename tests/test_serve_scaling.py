"""The Serve app under load and failure: autoscaling 1 -> 2 -> 1, a full queue, and faults that
must lose nothing: replica processes SIGKILLed (once, on every attempt, under load), the ingress
SIGKILLed under load, and the S3 endpoint frozen for 10 s under load.

Jobs must last seconds here, so the app serves the `tiny-wide` preset (a 4-layer, dim-512 DiT over
the tiny codec and text encoder), saved as a model directory: real code paths, no test hooks.
"""

from __future__ import annotations

import time
import uuid

import pytest

from pusa_ray import storage, video
from pusa_ray.models.loading import load_components, save_model_dir
from tests.serve_helpers import (
    Api,
    deploy_on,
    final_views,
    first_running,
    replica_tags,
    replicas,
    running_state,
    sigkill_replica,
    submit_all,
    wait_for,
)

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
    client = Api(deploy_on(bucket, slow_model))
    client.bucket, client.root = bucket, f"{bucket}/serve"
    yield client
    serve.delete("pusa")


def test_a_burst_scales_the_generator_to_two_replicas_and_back(api):
    assert replicas() == 1
    ids = [api.post({"prompt": f"burst {i}", **SLOW_JOB, "seed": i}).json()["id"] for i in range(6)]
    wait_for(lambda: replicas() == 2, 120, "the generator to scale up to 2 replicas")
    views = [api.wait(job_id, timeout_s=300) for job_id in ids]
    assert [view["status"] for view in views] == ["completed"] * 6
    wait_for(lambda: replicas() == 1, 120, "the generator to scale back down to 1 replica")


LOAD_JOB = {"frames": 17, "height": 64, "width": 64, "steps": 8, "guidance": 3.0}


def drained(api: Api) -> None:
    wait_for(lambda: api.get("/healthz").json()["active_jobs"] == 0, 120, "the earlier jobs to drain")


def assert_valid_video(api: Api, job_id: str, frames: int) -> None:
    response = api.get(f"/v1/videos/{job_id}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    pixels, _fps = video.read_video(response.content)
    assert pixels.shape[0] == frames


def test_a_sigkilled_replica_job_completes_on_its_second_attempt(api):
    job_id = api.post({"prompt": "survive", **SLOW_JOB, "steps": 30}).json()["id"]
    state = running_state(api, api.root, job_id)
    sigkill_replica(state["replica"])
    view = api.wait(job_id, timeout_s=300)
    assert (view["status"], view["attempts"]) == ("completed", 2), view
    assert_valid_video(api, job_id, SLOW_JOB["frames"])


def test_a_job_whose_replica_is_killed_on_every_attempt_fails_naming_each(api):
    job_id = api.post({"prompt": "doomed", **SLOW_JOB, "steps": 30}).json()["id"]
    for attempt in (1, 2, 3):  # max_attempts in serve/config.local.yaml
        sigkill_replica(running_state(api, api.root, job_id, attempt=attempt, timeout_s=180)["replica"])
    view = api.wait(job_id, timeout_s=300)
    assert view["status"] == "failed" and view["attempts"] == 3, view
    assert view["error"].startswith("gave up after 3 failed attempts: attempt 1: "), view["error"]
    assert "; attempt 2: " in view["error"] and "; attempt 3: " in view["error"]


def _load(api: Api, name: str) -> list[str]:
    drained(api)
    return submit_all(api, [{"prompt": f"{name} {i}", **LOAD_JOB, "seed": i} for i in range(16)])


def test_under_load_a_replica_kill_loses_no_job(api):
    ids = _load(api, "replica kill")
    killed, state = first_running(api, api.root, ids)
    sigkill_replica(state["replica"])
    views = final_views(api, ids, timeout_s=600)
    assert [view["status"] for view in views] == ["completed"] * 16  # lost 0 of 16
    assert views[ids.index(killed)]["attempts"] == 2
    assert_valid_video(api, killed, LOAD_JOB["frames"])


def test_under_load_an_ingress_kill_loses_no_job(api):
    ids = _load(api, "ingress kill")
    first_running(api, api.root, ids)
    [ingress] = replica_tags("Ingress")
    sigkill_replica(ingress, "Ingress")
    views = final_views(api, ids, timeout_s=600)
    assert [view["status"] for view in views] == ["completed"] * 16  # lost 0 of 16
    assert all(view["error"] is None for view in views)
    assert replica_tags("Ingress") != [ingress]  # Serve started a new one


def test_a_storage_freeze_under_load_answers_503_and_loses_no_job(api, s3_server):
    ids = _load(api, "freeze")
    first_running(api, api.root, ids)
    answers = []
    with s3_server.paused():  # 10 s of an endpoint that accepts connections and never answers
        until = time.time() + 10
        while time.time() < until:
            start = time.time()
            response = api.get(f"/v1/videos/{ids[-1]}", timeout=30)
            answers.append((response.status_code, time.time() - start, response))
            time.sleep(0.05)
        health = api.get("/healthz", timeout=30)
    refused = [response for status, _seconds, response in answers if status == 503]
    assert len(refused) >= 10, [status for status, _s, _r in answers]  # most at once, not after 5 s each
    assert {status for status, _s, _r in answers} <= {200, 503}  # never a 500, never a hang
    assert max(seconds for _status, seconds, _r in answers) < 10  # storage_timeout_s (5 s) + slack
    error = refused[-1].json()["error"]
    assert error["field"] == "storage" and int(refused[-1].headers["Retry-After"]) > 0
    assert health.status_code == 503 and health.json()["storage"] == "unreachable"
    views = final_views(api, ids, timeout_s=600)
    assert [view["status"] for view in views] == ["completed"] * 16  # lost 0 of 16
    assert api.get("/healthz").json()["storage"] == "ok"


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
