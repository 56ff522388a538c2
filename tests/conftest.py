"""S3 fixtures: moto's S3 server as a real process on loopback, and a fresh bucket per test.

The server is a separate process (not moto's in-process mock, not its threaded server) so a test
can freeze it with SIGSTOP to simulate a stalled endpoint. boto3 finds it the standard way, through
AWS_ENDPOINT_URL, which the session fixture sets for the duration of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pusa_ray.parallel_launch import free_port

_STARTUP_TIMEOUT_S = 30.0


@dataclass
class S3Server:
    """A running moto S3 server process on 127.0.0.1."""

    endpoint_url: str
    port: int
    pid: int
    log_path: Path

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are still accepted by the kernel, never answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the server frozen inside the block, and never leave it frozen after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()


def _wait_until_answering(endpoint_url: str, process: subprocess.Popen, log_path: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"moto server exited with code {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            with opener.open(f"{endpoint_url}/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server at {endpoint_url} did not answer within {_STARTUP_TIMEOUT_S} s"
                ) from None
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


_UNSET_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",  # would win over AWS_ENDPOINT_URL
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


@contextlib.contextmanager
def running_s3_server(workdir: Path) -> Iterator[S3Server]:
    """`python -m moto.server` on a free loopback port, with boto3 pointed at it through the env
    for the duration of the block (tests' session fixture, bench/faults.py)."""
    from pusa_ray import storage  # here, so the fast core tests never import boto3

    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads: a full pipe blocks the server
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_answering(endpoint_url, process, log_path)
        with pytest.MonkeyPatch.context() as env:
            for name in _UNSET_ENV:
                env.delenv(name, raising=False)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", endpoint_url)
            env.setenv("AWS_CONFIG_FILE", str(workdir / "no-config"))
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-credentials"))
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
            env.setenv("NO_PROXY", no_proxy)
            env.setenv("no_proxy", no_proxy)
            storage.reset_client()
            try:
                yield S3Server(endpoint_url=endpoint_url, port=port, pid=process.pid, log_path=log_path)
            finally:
                storage.reset_client()
        storage.reset_client()  # again, now that the environment is restored
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for the whole session (see `running_s3_server`)."""
    with running_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket; yields its URI, ``s3://<name>``."""
    from pusa_ray import storage

    name = f"test-{uuid.uuid4().hex[:16]}"
    storage.s3_client().create_bucket(Bucket=name)
    yield f"s3://{name}"
    with contextlib.suppress(Exception):  # the server may be gone; it holds everything in memory
        client = storage.s3_client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[None]:
    """A local Ray cluster (2 logical CPUs, no GPUs, no dashboard) whose workers see the S3 endpoint.

    It depends on `s3_server` so that the AWS variables are set before Ray starts its workers.
    Actors in tests ask for fractional CPUs: with whole ones, Ray Data's read tasks starve (DESIGN.md).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    env_vars = {name: os.environ[name] for name in names}
    env_vars["PUSA_RAY_CACHE"] = str(s3_server.log_path.parent / "worker-cache")
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        runtime_env={"env_vars": env_vars},
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty download cache for one test (PUSA_RAY_CACHE)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PUSA_RAY_CACHE", str(cache))
    return cache


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A base URI to write under: a local directory, or a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


PREBUILD = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"


@pytest.fixture(scope="session")
def torch_extensions(tmp_path_factory: pytest.TempPathFactory) -> str:
    """DeepSpeed's CPU shm_comm op, JIT-built once (about 40 s of CPU) into a cache the workers share.

    Under the repo's .venv the build survives sessions (`make clean` removes it).
    """
    venv = Path(__file__).resolve().parent.parent / ".venv"
    folder = venv / "torch_extensions" if venv.is_dir() else tmp_path_factory.mktemp("torch_extensions")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", PREBUILD], env=env, check=True, capture_output=True, timeout=900)
    return str(folder)
