"""The Serve app end to end over real HTTP: local Ray, CPU replicas, tiny preset, moto S3."""

from __future__ import annotations

import base64
import uuid

import pytest
import torch
from safetensors.torch import load as load_safetensors

from pusa_ray import storage, video
from pusa_ray.checkpoints import adapters as published
from pusa_ray.checkpoints import lora
from pusa_ray.cli import main as cli_main
from pusa_ray.config import PRESETS
from tests.serve_helpers import (
    API_KEY,
    Api,
    deploy_on,
    mp4_bytes,
    png_b64,
)

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]

SMALL = {"frames": 17, "height": 32, "width": 48, "steps": 2}


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    name = f"serve-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def api(ray_cluster, bucket) -> Api:
    from ray import serve

    # the service's step-cache default for requests that name none: threshold 0, which reuses
    # nothing (so every other check here holds as without it) but shows that the default arrives
    yield Api(deploy_on(bucket, "tiny", cache="first-block:0"))
    serve.delete("pusa")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("clips")
    return {
        "clip": base64.b64encode(mp4_bytes(25, tmp)).decode(),
        "other": base64.b64encode(mp4_bytes(21, tmp, seed=3)).decode(),
    }


def task_bodies(bucket: str, clips: dict[str, str]) -> dict[str, dict]:
    storage.write_bytes(f"{bucket}/inputs/first.png", base64.b64decode(png_b64(7)))
    image, end = {"data": png_b64(1)}, {"data": png_b64(2)}
    return {
        "t2v": {},
        "i2v": {"image": image, "noise": [0.2]},
        "i2v-s3": {"task": "i2v", "image": {"uri": f"{bucket}/inputs/first.png"}},
        "start-end": {"image": image, "end_image": end},
        "keyframes": {
            "keyframes": [
                {"position": "0", "image": image, "noise": 0.0},
                {"position": "f:8", "image": end, "noise": 0.3},
                {"position": "-1", "image": image, "noise": 0.5},
            ]
        },
        "extend": {"video": {"data": clips["clip"]}, "cond_frames": 5},
        "complete": {"video": {"data": clips["clip"]}, "cond_frames": 5, "end_frames": 4},
        "transition": {
            "video": {"data": clips["clip"]},
            "end_video": {"data": clips["other"]},
            "cond_frames": 5,
            "end_frames": 4,
        },
    }


def test_health_and_models(api):
    assert api.get("/healthz").json()["status"] == "ok"
    models = api.get("/v1/models").json()
    assert models["model"]["id"] == "tiny" and models["model"]["architecture"]["num_layers"] == 2
    # what a request leaves out, the service's bounds and each task's inputs (the studio page reads them)
    tiny = PRESETS["tiny"]
    assert models["defaults"] == {
        "frames": tiny.frames,
        "height": tiny.height,
        "width": tiny.width,
        "steps": 4,
        "guidance": 3.0,
        "shift": 5.0,
        "schedule": "sync",
        "cache": "first-block:0",  # the service's default (see the fixture), not the preset's "off"
        "fps": tiny.fps,
        "negative_prompt": tiny.negative_prompt,
        "seed": 0,
    }
    assert models["limits"]["max_frames"] == 33 and models["limits"]["max_steps"] == 50
    assert models["tasks"]["transition"] == {
        "needs": ["video", "end_video"],
        "optional": ["cond_frames", "end_frames"],
    }
    assert api.get("/openapi.json").status_code == 200


def test_every_task_end_to_end(api, bucket, clips, tmp_path):
    bodies = task_bodies(bucket, clips)
    submitted = {}
    for name, extra in bodies.items():
        body = {"task": name, "prompt": f"a red square, {name}", **SMALL, "seed": 1, **extra}
        response = api.post(body)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        submitted[name] = response.json()["id"]
    for name, job_id in submitted.items():
        view = api.wait(job_id)
        assert view["status"] == "completed", (name, view)
        assert view["progress"] == 100.0 and view["parameters"]["frames"] == 17
        content = api.get(f"/v1/videos/{job_id}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(content.content)
        assert video.probe_video(path) == {"frames": 17, "height": 32, "width": 48, "fps": 16.0}
    listed = api.get("/v1/videos", params={"limit": 100}).json()["data"]
    assert set(submitted.values()) <= {job["id"] for job in listed}


def test_same_seed_gives_the_cli_latents(api, tmp_path):
    body = {"prompt": "a blue circle", "frames": 9, "height": 32, "width": 32, "steps": 3, "seed": 7}
    body["schedule"] = "lead"  # a sampling field the request passes through, not the tiny default
    job_id = api.post(body).json()["id"]
    assert api.wait(job_id)["status"] == "completed"
    served = load_safetensors(api.get(f"/v1/videos/{job_id}/content", params={"variant": "latents"}).content)
    argv = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a blue circle",
        "--frames",
        "9",
        "--height",
        "32",
        "--width",
        "32",
    ]
    argv += ["--steps", "3", "--seed", "7", "--schedule", "lead", "--quiet", "--out", str(tmp_path / "a.mp4")]
    assert cli_main([*argv, "--save-latents", str(tmp_path / "a.safetensors")]) == 0
    local = load_safetensors((tmp_path / "a.safetensors").read_bytes())["latents"]
    # Ray pins each replica's torch threads, so the sums run in another order: equal to float tolerance.
    torch.testing.assert_close(served["latents"], local, rtol=1e-4, atol=1e-4)


def test_the_cache_field_reaches_the_sampler(api):
    body = {"prompt": "a blue circle", **SMALL, "steps": 6, "seed": 4}
    ids = {
        cache: api.post({**body, "cache": cache} if cache else body).json()["id"]
        for cache in (None, "off", "first-block:0.9")
    }
    views = {cache: api.wait(job_id) for cache, job_id in ids.items()}
    # a request without a cache gets the service's default (the fixture's); one that names one, its own
    assert [view["parameters"]["cache"] for view in views.values()] == [
        "first-block:0",
        "off",
        "first-block:0.9",
    ]
    assert views[None]["parameters"]["speed"]["attention_backend"] == "native"  # the replica's levers
    latents = {
        cache: load_safetensors(
            api.get(f"/v1/videos/{job_id}/content", params={"variant": "latents"}).content
        )["latents"]
        for cache, job_id in ids.items()
    }
    # a threshold of 0 reuses nothing (equal to float tolerance: the jobs may run on two replicas)
    torch.testing.assert_close(latents[None], latents["off"], rtol=0, atol=1e-5)
    assert (latents["first-block:0.9"] - latents["off"]).abs().max() > 1e-3  # a loose one reused steps


def test_eight_concurrent_jobs_complete(api):
    ids = [api.post({"prompt": f"job {i}", **SMALL, "seed": i}).json()["id"] for i in range(8)]
    views = [api.wait(job_id) for job_id in ids]
    assert [view["status"] for view in views] == ["completed"] * 8
    latents = [
        api.get(f"/v1/videos/{job_id}/content", params={"variant": "latents"}).content for job_id in ids
    ]
    assert len(set(latents)) == 8


def test_idempotency_key_returns_the_same_job(api):
    headers = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = api.post({"prompt": "once", **SMALL}, headers=headers).json()
    second = api.post({"prompt": "once", **SMALL}, headers=headers).json()
    assert first["id"] == second["id"]
    assert api.wait(first["id"])["status"] == "completed"


def test_delete_cancels_and_removes_everything(api, bucket):
    job_id = api.post({"prompt": "soon gone", "frames": 33, "height": 128, "width": 128, "steps": 50}).json()[
        "id"
    ]
    deleted = api.delete(job_id)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert api.get(f"/v1/videos/{job_id}").status_code == 404
    prefix = f"{bucket}/serve/jobs/{job_id}"
    from tests.serve_helpers import wait_for

    wait_for(lambda: storage.list_files(prefix) == [], 60, "the job's files to be deleted")


def test_api_key_is_enforced(api):
    anonymous, wrong = Api(api.base, key=None), Api(api.base, key="nope")
    for client in (anonymous, wrong):
        response = client.post({"prompt": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["field"] == "authorization"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/v1/videos").status_code == 401
    assert anonymous.get("/healthz").status_code == 200
    assert Api(api.base, key=API_KEY).get("/v1/videos").status_code == 200


def bad_requests(bucket: str) -> list[tuple[str, dict, int, str]]:
    image = {"data": png_b64()}
    return [
        ("no prompt", {"frames": 9}, 400, "prompt"),
        ("blank prompt", {"prompt": "   "}, 400, "prompt"),
        ("unknown task", {"prompt": "x", "task": "morph"}, 400, "task"),
        ("unknown field", {"prompt": "x", "colour": "red"}, 400, "colour"),
        ("frames not 1+4k", {"prompt": "x", "frames": 8}, 400, "frames"),
        ("frames over limit", {"prompt": "x", "frames": 81}, 400, "frames"),
        ("height not /16", {"prompt": "x", "height": 40}, 400, "height"),
        ("width over schema bound", {"prompt": "x", "width": 4096}, 400, "width"),
        ("too many pixels", {"prompt": "x", "height": 256, "width": 256}, 400, "height"),
        ("zero steps", {"prompt": "x", "steps": 0}, 400, "steps"),
        ("steps over limit", {"prompt": "x", "steps": 60}, 400, "steps"),
        ("negative guidance", {"prompt": "x", "guidance": -1}, 400, "guidance"),
        ("zero shift", {"prompt": "x", "shift": 0}, 400, "shift"),
        ("unknown schedule", {"prompt": "x", "schedule": "late"}, 400, "schedule"),
        ("negative seed", {"prompt": "x", "seed": -1}, 400, "seed"),
        ("zero fps", {"prompt": "x", "fps": 0}, 400, "fps"),
        ("noise outside [0,1]", {"prompt": "x", "task": "i2v", "image": image, "noise": [1.5]}, 400, "noise"),
        ("i2v without image", {"prompt": "x", "task": "i2v"}, 400, "image"),
        ("t2v with image", {"prompt": "x", "image": image}, 400, "image"),
        (
            "data and uri",
            {"prompt": "x", "task": "i2v", "image": {**image, "uri": f"{bucket}/inputs/a.png"}},
            400,
            "image",
        ),
        ("not base64", {"prompt": "x", "task": "i2v", "image": {"data": "@@@"}}, 400, "image.data"),
        (
            "uri outside allowed",
            {"prompt": "x", "task": "i2v", "image": {"uri": "s3://elsewhere/a.png"}},
            403,
            "image",
        ),
        (
            "keyframe out of range",
            {
                "prompt": "x",
                "task": "keyframes",
                "keyframes": [{"position": "99", "image": image, "noise": 0}],
            },
            400,
            "keyframes",
        ),
        (
            "two keyframes on one latent",
            {
                "prompt": "x",
                "task": "keyframes",
                "keyframes": [
                    {"position": "0", "image": image, "noise": 0},
                    {"position": "f:0", "image": image, "noise": 0},
                ],
            },
            400,
            "keyframes",
        ),
        (
            "start-end noise count",
            {
                "prompt": "x",
                "task": "start-end",
                "image": image,
                "end_image": image,
                "noise": [0.1, 0.2, 0.3],
            },
            400,
            "noise",
        ),
        ("unknown adapter", {"prompt": "x", "adapter": "nobody"}, 404, "adapter"),
        ("adapter path escape", {"prompt": "x", "adapter": "../x"}, 400, "adapter"),
        ("alpha too large", {"prompt": "x", "adapter_alpha": 9}, 400, "adapter_alpha"),
        ("unknown cache policy", {"prompt": "x", "cache": "fast"}, 400, "cache"),
        (
            "media too large",
            {"prompt": "x", "task": "i2v", "image": {"data": base64.b64encode(b"\0" * 5_000_000).decode()}},
            413,
            "image",
        ),
    ]


def test_bad_requests_get_a_4xx_naming_the_field(api, bucket):
    cases = bad_requests(bucket)
    assert len(cases) >= 20
    for name, body, status, field in cases:
        response = api.post(body)
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["field"] == field, (name, error)
        assert error["message"], name
    not_json = api.session.post(
        f"{api.base}/v1/videos", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert api.get("/v1/videos/vid_0123").status_code == 404
    assert api.get("/v1/videos/../etc").status_code == 404
    assert api.get("/v1/videos/vid_0123/content").status_code == 404
    assert api.get("/v1/videos", params={"after": "vid_nope"}).json()["error"]["field"] == "after"
    assert api.get("/v1/videos", params={"limit": 0}).json()["error"]["field"] == "limit"


def _publish(bucket: str, tmp_path, name: str, architecture: dict) -> None:
    from pusa_ray.models.loading import load_components
    from tests.test_lora import pusa_state

    tiny = load_components("tiny", device="cpu")
    torch.save(pusa_state(tiny.model.transformer), tmp_path / f"{name}.pt")
    adapter = lora.load_adapter(tmp_path / f"{name}.pt")
    local = lora.save_adapter(
        tmp_path / f"{name}.safetensors",
        adapter.weights,
        rank=adapter.rank,
        lora_alpha=float(adapter.rank),
        base_model="tiny",
        architecture=architecture,
        target_modules=adapter.modules,
    )
    metadata = {"base_model": "tiny", "architecture": architecture, "rank": adapter.rank, "step": 0}
    published.publish_adapter(local, f"{bucket}/adapters", name, metadata)


def test_adapters_change_the_output_and_alpha_zero_is_the_base(api, bucket, tmp_path):
    from pusa_ray.config import PRESETS

    _publish(bucket, tmp_path, "pusa-tiny", PRESETS["tiny"].architecture)
    _publish(bucket, tmp_path, "for-14b", PRESETS["wan2.1-t2v-14b"].architecture)
    listed = {item["id"]: item for item in api.get("/v1/models").json()["adapters"]}
    assert listed["pusa-tiny"]["rank"] == 4 and "for-14b" in listed

    body = {"prompt": "a green cube", **SMALL, "seed": 3}
    runs = {
        "base": {},
        "zero": {"adapter": "pusa-tiny", "adapter_alpha": 0.0},
        "lora": {"adapter": "pusa-tiny"},
    }
    ids = {name: api.post({**body, **extra}).json()["id"] for name, extra in runs.items()}
    latents = {}
    for name, job_id in ids.items():
        assert api.wait(job_id)["status"] == "completed", name
        latents[name] = api.get(f"/v1/videos/{job_id}/content", params={"variant": "latents"}).content
    assert load_safetensors(latents["zero"])["latents"].equal(load_safetensors(latents["base"])["latents"])
    assert latents["lora"] != latents["base"]
    # the base again after an adapter ran: the base weights did not drift
    again = api.post(body).json()["id"]
    api.wait(again)
    assert api.get(f"/v1/videos/{again}/content", params={"variant": "latents"}).content == latents["base"]

    wrong = api.post({**body, "adapter": "for-14b"})
    assert wrong.status_code == 400 and wrong.json()["error"]["field"] == "adapter"
    assert "architecture" in wrong.json()["error"]["message"]


def test_the_client_submits_waits_and_downloads(api, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (48, 32), (200, 30, 30)).save(tmp_path / "first.png")
    common = ["client", "--url", api.base, "--api-key", API_KEY]
    argv = [
        *common,
        "submit",
        "--task",
        "i2v",
        "--prompt",
        "a red frame",
        "--image",
        str(tmp_path / "first.png"),
    ]
    argv += [
        "--frames",
        "9",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "2",
        "--wait",
        "--out",
        str(tmp_path / "a.mp4"),
    ]
    assert cli_main(argv) == 0
    view = __import__("json").loads(capsys.readouterr().out)
    assert view["status"] == "completed" and view["task"] == "i2v" and view["prompt"] == "a red frame"
    assert video.probe_video(tmp_path / "a.mp4")["frames"] == 9
    assert (
        cli_main([*common, "download", view["id"], "--variant", "latents", "--out", str(tmp_path / "l.st")])
        == 0
    )
    assert load_safetensors((tmp_path / "l.st").read_bytes())["latents"].shape == (1, 16, 3, 4, 6)
    assert (
        cli_main(
            [*common, "download", view["id"], "--variant", "thumbnail", "--out", str(tmp_path / "t.png")]
        )
        == 0
    )
    assert Image.open(tmp_path / "t.png").size == (48, 32)
    thumbnail = api.get(f"/v1/videos/{view['id']}/content", params={"variant": "thumbnail"})
    assert thumbnail.headers["content-type"] == "image/png"
    assert thumbnail.headers["content-disposition"] == f'inline; filename="{view["id"]}.png"'
    capsys.readouterr()
    assert cli_main(["client", "--url", api.base, "status", view["id"]]) == 2  # no key
    assert "HTTP 401" in capsys.readouterr().err
    assert cli_main(["client", "status", view["id"], "--url", api.base, "--api-key", API_KEY]) == 0
    assert __import__("json").loads(capsys.readouterr().out)["status"] == "completed"  # flags after it
