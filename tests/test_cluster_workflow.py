"""The whole workflow through the real CLIs, on a local cluster with a job server (issue 7).

Raw mp4 clips with .txt captions in the moto S3 server -> `ray job submit --working-dir <repo> --
python jobs/preprocess.py` -> latents in S3 -> `ray job submit ... jobs/train.py` -> an adapter
published in S3 -> `serve deploy` of serve/config.local.yaml with that adapters prefix -> one HTTP
generation with the adapter -> its mp4 in S3. Tiny preset, CPU.

The cluster is the test's own `ray start --head` (the dashboard is the job server; 4 logical CPUs
on 2 cores, DESIGN.md), never the session's in-process cluster, and is torn down by killing only
its own processes (tests/cluster_helpers.py). The configs are the shipped files with a documented
override of paths and run length only (`derive`):

- jobs/configs/preprocess.tiny.yaml: `input.uri`, `output` (S3 paths); resources as shipped.
- jobs/configs/train.tiny.yaml: `latents`, `run.storage_path`, `export.prefix` (S3 paths), and
  `steps` 60 -> 4 (run length); resources as shipped.
- serve/config.local.yaml: serve_helpers.local_config's override (storage paths, HTTP port,
  the S3 environment and API key); deployments as shipped.

The derived job configs are files in a temp folder of this machine, which the job drivers share
(on a real cluster they would travel in the working dir).
"""

from __future__ import annotations

import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pusa_ray import storage, video
from pusa_ray.data.latents import LatentDataset
from tests.cluster_helpers import (
    REPO,
    LocalCluster,
    derive,
    job_status,
    torch_extensions_dir,
    write_yaml,
)
from tests.serve_helpers import APP, Api, free_port, local_config, moving_square, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.s3]

CLIPS = 4
CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH = 24, 64, 80  # 1.5 s at 16 fps: the tiny config samples 17 frames
TRAIN_STEPS = 4
ADAPTER = "pusa-tiny"  # train.tiny.yaml's export.name, as shipped


@pytest.fixture(scope="module")
def bucket(s3_server: Any) -> str:
    name = f"workflow-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def cluster(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The test's own head with a job server; its processes inherit the S3 endpoint's variables."""
    scratch = tmp_path_factory.mktemp("workflow-cluster")
    env = {"TORCH_EXTENSIONS_DIR": torch_extensions_dir(scratch), "PUSA_RAY_CACHE": str(scratch / "cache")}
    cluster = LocalCluster.start(num_cpus=4, env=env)
    try:
        yield cluster
    finally:
        cluster.stop()
    assert cluster.processes() == [], "processes of the test's cluster outlived it"


def submit(cluster: LocalCluster, script: str, config: str, name: str) -> tuple[str, str]:
    """`ray job submit --working-dir <repo> -- python <script> --config <config>`; (id, CLI output)."""
    submission_id = f"{name}-{uuid.uuid4().hex[:8]}"
    result = cluster.cli(
        "ray",
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),  # .gitignore'd paths (.venv, out/) and .git stay behind: under 1 MB goes up
        "--",
        "python",
        script,
        "--config",
        config,
        check=False,
    )
    return submission_id, result.stdout + result.stderr


def job_logs(cluster: LocalCluster, submission_id: str) -> str:
    return cluster.cli("ray", "job", "logs", "--address", cluster.dashboard_url, submission_id).stdout


@pytest.fixture(scope="module")
def raw_videos(bucket: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder of mp4 clips with .txt caption sidecars in S3 (the `sidecar` input format)."""
    folder = tmp_path_factory.mktemp("raw")
    for index in range(CLIPS):
        path = folder / f"clip{index}.mp4"
        video.write_mp4(path, moving_square(CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH, index), 16)
        storage.write_bytes(f"{bucket}/raw/clip{index}.mp4", path.read_bytes())
        storage.write_bytes(f"{bucket}/raw/clip{index}.txt", f"a square crossing, number {index}".encode())
    return f"{bucket}/raw/"


@pytest.fixture(scope="module")
def preprocessing(cluster: LocalCluster, raw_videos: str, bucket: str, tmp_path_factory) -> dict[str, Any]:
    overrides = {"input.uri": raw_videos, "output": f"{bucket}/latents/tiny"}
    config = derive("jobs/configs/preprocess.tiny.yaml", overrides)
    path = write_yaml(tmp_path_factory.mktemp("configs") / "preprocess.yaml", config)
    started = time.perf_counter()
    submission_id, output = submit(cluster, "jobs/preprocess.py", path, "preprocess")
    return {"id": submission_id, "output": output, "dataset": config["output"], "seconds": _since(started)}


@pytest.fixture(scope="module")
def training(
    cluster: LocalCluster, preprocessing: dict[str, Any], bucket: str, tmp_path_factory
) -> dict[str, Any]:
    overrides = {
        "latents": preprocessing["dataset"],
        "run.storage_path": f"{bucket}/runs",
        "export.prefix": f"{bucket}/adapters",
        "steps": TRAIN_STEPS,
    }
    config = derive("jobs/configs/train.tiny.yaml", overrides)
    path = write_yaml(tmp_path_factory.mktemp("configs") / "train.yaml", config)
    started = time.perf_counter()
    submission_id, output = submit(cluster, "jobs/train.py", path, "train")
    return {"id": submission_id, "output": output, "config": config, "seconds": _since(started)}


@pytest.fixture(scope="module")
def service(cluster: LocalCluster, training: dict[str, Any], bucket: str, tmp_path_factory) -> Api:
    """serve/config.local.yaml deployed with `serve deploy`, adapters read from the training export."""
    port = free_port()
    config = local_config(
        port,
        storage_root=f"{bucket}/serve",
        adapters_prefix=training["config"]["export"]["prefix"],
        inputs_prefix=f"{bucket}/inputs",
        model="tiny",
    )
    path = write_yaml(tmp_path_factory.mktemp("configs") / "serve.yaml", config)
    cluster.cli("serve", "deploy", "--address", cluster.dashboard_url, path)
    wait_for(lambda: app_status(cluster) == "RUNNING", 300, "the Serve app to run")
    return Api(f"http://127.0.0.1:{port}")


def app_status(cluster: LocalCluster) -> str | None:
    output = cluster.cli("serve", "status", "--address", cluster.dashboard_url, timeout_s=60).stdout
    app = (yaml.safe_load(output) or {}).get("applications", {}).get(APP) or {}
    if app.get("status") == "DEPLOY_FAILED":
        raise AssertionError(f"the Serve app failed to deploy: {app.get('message')}")
    return app.get("status")


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 1)


def test_the_working_dir_upload_leaves_ignored_paths_behind(tmp_path: Path) -> None:
    """What `--working-dir <repo>` uploads (Ray's own packaging): no .venv, .git or out/, a few MB at most."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    # As `ray job submit` packs it: .gitignore honoured, plus Ray's default excludes (.git, .venv, ...).
    package = tmp_path / "package.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    with zipfile.ZipFile(package) as archive:
        names = archive.namelist()
    assert "jobs/train.py" in names and "pusa_ray/distributed/train.py" in names
    assert not [name for name in names if name.split("/")[0] in (".venv", ".git", "out")]
    assert package.stat().st_size < 8 * 1024 * 1024, package.stat().st_size


def test_the_preprocessing_job_encodes_the_s3_videos(cluster: LocalCluster, preprocessing: dict) -> None:
    assert job_status(cluster, preprocessing["id"]) == "SUCCEEDED", preprocessing["output"][-6000:]
    logs = job_logs(cluster, preprocessing["id"])
    assert f"preprocess: {CLIPS} clips written, 0 skipped" in logs, logs[-3000:]
    dataset = LatentDataset(preprocessing["dataset"])
    assert len(dataset) == CLIPS
    print(f"preprocessing job: {preprocessing['seconds']} s")


def test_the_training_job_trains_on_them_and_publishes_an_adapter(
    cluster: LocalCluster, training: dict, bucket: str
) -> None:
    assert job_status(cluster, training["id"]) == "SUCCEEDED", training["output"][-6000:]
    logs = job_logs(cluster, training["id"])
    exported = f"{bucket}/adapters/{ADAPTER}/adapter.safetensors"
    assert f"train: {TRAIN_STEPS} steps" in logs and f"exported {exported}" in logs, logs[-3000:]
    assert storage.exists(exported)
    print(f"training job: {training['seconds']} s")


def test_the_served_adapter_generates_a_video_over_http(
    cluster: LocalCluster, service: Api, bucket: str, tmp_path: Path
) -> None:
    started = time.perf_counter()
    listed = [adapter["id"] for adapter in service.get("/v1/models").json()["adapters"]]
    assert ADAPTER in listed
    body = {
        "prompt": "a square crossing",
        "frames": 17,
        "height": 64,
        "width": 64,
        "steps": 2,
        "adapter": ADAPTER,
    }
    response = service.post(body)
    assert response.status_code == 202, response.text
    view = service.wait(response.json()["id"], timeout_s=300)
    assert view["status"] == "completed", view
    assert view["adapter"] == f"{bucket}/adapters/{ADAPTER}/adapter.safetensors"  # the job used it
    attempt = view["attempts"]  # the job store keeps each attempt's outputs apart (serving/jobs.py)
    stored = f"{bucket}/serve/jobs/{view['id']}/attempts/{attempt}/outputs/video.mp4"
    path = tmp_path / "video.mp4"
    path.write_bytes(storage.read_bytes(stored))
    assert video.probe_video(path)["frames"] == 17
    print(f"serve deploy + generation: {_since(started)} s")
