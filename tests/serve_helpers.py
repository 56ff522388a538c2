"""Deploying serve/config.local.yaml on the test cluster, and small HTTP helpers for the Serve tests.

The deployed config is the shipped file with a documented override of its `args` storage and
access settings only (storage root, adapters prefix, allowed input prefixes, API key variable,
model) plus the HTTP port; every deployment option (replicas, autoscaling, shutdown) is used as
written.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml
from PIL import Image

from pusa_ray.parallel_launch import free_port

REPO = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = REPO / "serve" / "config.local.yaml"
API_KEY_ENV = "PUSA_RAY_TEST_API_KEY"
API_KEY = "test-key-0123456789"
APP = "pusa"


@functools.cache
def serve_port() -> int:
    """One HTTP port per process: Serve keeps the port it first started with for the cluster's life."""
    return free_port()


def local_config(port: int, storage_root: str, adapters_prefix: str, inputs_prefix: str, model: str) -> dict:
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(
        model=model,
        storage_root=storage_root,
        adapters_prefix=adapters_prefix,
        allowed_input_prefixes=[inputs_prefix],
        api_key_env=API_KEY_ENV,
    )
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "PUSA_RAY_CACHE",
    )
    env_vars = {name: os.environ[name] for name in names if name in os.environ}
    app["runtime_env"] = {"env_vars": {**env_vars, API_KEY_ENV: API_KEY}}
    return config


def deploy_on(bucket: str, model: str, **settings: Any) -> str:
    """Deploy serve/config.local.yaml with its storage under `bucket` (`serve/`, `adapters/`,
    `inputs/`), the API key on and any other service `settings` given; the service's base URL."""
    port = serve_port()
    config = local_config(
        port,
        storage_root=f"{bucket}/serve",
        adapters_prefix=f"{bucket}/adapters",
        inputs_prefix=f"{bucket}/inputs",
        model=model,
    )
    config["applications"][0]["args"].update(settings)
    deploy(config)
    return f"http://127.0.0.1:{port}"


def deploy(config: dict, timeout_s: float = 180.0) -> None:
    """Deploy a config the way `serve run config.yaml` does, and wait until the app is RUNNING."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    client = serve_api.serve_start(
        http_options=config["http_options"], proxy_location=config["proxy_location"]
    )
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
    wait_for(lambda: _app_status(serve) == "RUNNING", timeout_s, "the Serve app to run", _app_failed(serve))


def _app_status(serve: Any) -> str | None:
    app = serve.status().applications.get(APP)
    return app.status if app else None


def _app_failed(serve: Any) -> Callable[[], None]:
    def check() -> None:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise AssertionError(f"deploy failed: {app.message}")

    return check


def replicas(deployment: str = "Generator") -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, check: Callable[[], None] | None = None
) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Api:
    """A tiny client for the tests: base URL, auth header, and polling."""

    def __init__(self, base: str, key: str | None = API_KEY) -> None:
        self.base = base
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def post(self, body: dict, **kwargs: Any) -> requests.Response:
        return self.session.post(f"{self.base}/v1/videos", json=body, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.get(f"{self.base}{path}", **kwargs)

    def delete(self, job_id: str) -> requests.Response:
        return self.session.delete(f"{self.base}/v1/videos/{job_id}", timeout=60)

    def view(self, job_id: str) -> dict | None:
        """The job's view, or None while the service does not answer (restarting, storage down)."""
        try:
            response = self.get(f"/v1/videos/{job_id}", timeout=10)
        except requests.RequestException:
            return None
        return response.json() if response.status_code == 200 else None

    def wait(
        self, job_id: str, timeout_s: float = 120.0, statuses=("completed", "failed", "cancelled")
    ) -> dict:
        def finished() -> dict | None:
            view = self.view(job_id)
            return view if view is not None and view.get("status") in statuses else None

        return wait_for(finished, timeout_s, f"job {job_id} to reach {statuses}")


def png_b64(seed: int = 0, size: tuple[int, int] = (48, 40)) -> str:

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mp4_bytes(frames: int, tmp: Path, seed: int = 0) -> bytes:

    from pusa_ray import video

    clip = np.zeros((frames, 32, 48, 3), dtype=np.uint8)
    for i in range(frames):
        clip[i, 8:20, (i + seed) % 36 : (i + seed) % 36 + 12] = (200, 40 + seed * 10, 40)
    path = tmp / f"clip-{frames}-{seed}.mp4"
    video.write_mp4(path, clip, fps=16)
    return path.read_bytes()


def moving_square(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: a square crossing a flat background, colours from the seed."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, 3, dtype=np.uint8)
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    clip[:] = background
    size = max(4, min(height, width) // 4)
    for index in range(frames):
        top, left = (seed + index) % (height - size), (3 * seed + 2 * index) % (width - size)
        clip[index, top : top + size, left : left + size] = 255 - background
    return clip


# --- faults: real processes killed, real storage frozen (tests/test_serve_scaling.py, bench/faults.py)


def replica_actor(tag: str, deployment: str = "Generator"):
    """The Ray actor of the Serve replica with this tag (the `replica` of a job's state)."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith("SERVE_REPLICA::") and f"#{deployment}#" in name and name.endswith(f"#{tag}"):
            return ray.get_actor(name, namespace=entry["namespace"])
    raise AssertionError(f"no {deployment} replica actor with tag {tag}")


def replica_tags(deployment: str) -> list[str]:
    import ray

    names = [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)]
    return [n.rsplit("#", 1)[1] for n in names if n.startswith("SERVE_REPLICA::") and f"#{deployment}#" in n]


def sigkill_replica(tag: str, deployment: str = "Generator") -> int:
    """SIGKILL the replica's worker process (as the OOM killer or a lost node would); its pid."""
    import ray

    actor = replica_actor(tag, deployment)
    pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def running_state(
    api: Api, root: str, job_id: str, attempt: int | None = None, timeout_s: float = 120.0
) -> dict:
    """Wait until the job's current attempt (or attempt `attempt`) runs; its state (replica tag, progress)."""
    import json

    from pusa_ray import storage

    def running() -> dict | None:
        view = api.view(job_id)
        if view is None or view.get("status") != "in_progress":
            return None
        if attempt is not None and view["attempts"] != attempt:
            return None
        uri = storage.join(root, "jobs", job_id, "attempts", str(view["attempts"]), "state.json")
        return json.loads(storage.read_bytes(uri))

    return wait_for(running, timeout_s, f"job {job_id} to run")


def submit_all(api: Api, bodies: list[dict]) -> list[str]:
    ids = []
    for body in bodies:
        response = api.post(body)
        if response.status_code != 202:
            raise AssertionError(f"submit refused: {response.status_code} {response.text}")
        ids.append(response.json()["id"])
    return ids


def final_views(api: Api, ids: list[str], timeout_s: float) -> list[dict]:
    """Each job's final view, polling through restarts and outages."""
    deadline = time.time() + timeout_s
    return [api.wait(job_id, timeout_s=max(1.0, deadline - time.time())) for job_id in ids]


def first_running(api: Api, root: str, ids: list[str], timeout_s: float = 120.0) -> tuple[str, dict]:
    """The first of `ids` seen running, and its state."""

    def any_running() -> tuple[str, dict] | None:
        for job_id in ids:
            view = api.view(job_id)
            if view is not None and view.get("status") == "in_progress":
                return job_id, running_state(api, root, job_id, timeout_s=10)
        return None

    return wait_for(any_running, timeout_s, "a job to run")


def sigkill_descendant(fragment: str, timeout_s: float = 120.0) -> int:
    """SIGKILL a process of this test's own Ray cluster whose title holds `fragment` (a Ray Data
    actor is titled after its class, e.g. `ray::MapWorker(MapBatches(Generate))`); its pid."""
    import psutil

    def find() -> psutil.Process | None:
        for process in psutil.Process().children(recursive=True):
            try:
                if fragment in " ".join(process.cmdline()):
                    return process
            except psutil.Error:
                continue
        return None

    process = wait_for(find, timeout_s, f"a process titled {fragment!r}")
    process.send_signal(signal.SIGKILL)
    return process.pid
