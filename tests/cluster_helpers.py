"""Ray clusters of a test's own, started with `ray start` beside the session's in-process cluster, and
configs derived from the shipped YAML files.

Never `ray stop` (nor `AutoscalingCluster.start/shutdown`, which run `ray stop --force`): it kills
every Ray process of the user on the machine, other sessions' clusters included. A `LocalCluster`
starts its head in a new session, under its own temp dir, with a marker variable in its
environment. Everything the head starts (GCS, raylet, dashboard, the autoscaler and the fake nodes
it launches, their workers) stays in that session; job drivers start sessions of their own but keep
the marker. `stop()` ends exactly those processes, and `processes()` lets a test check none is left.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.serve_helpers import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `serve` and the jobs' `python`
MARKER = "PUSA_RAY_TEST_CLUSTER"
_PREBUILD = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"


# ----------------------------------------------------------------------------------------------
# Configs derived from the shipped files


def shipped(path: str) -> dict[str, Any]:
    """A YAML file of the repo (e.g. "jobs/configs/train.tiny.yaml"), parsed."""
    return yaml.safe_load((REPO / path).read_text())


def derive(config: Mapping[str, Any] | str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A shipped config (or its path) with the named keys replaced; every other key as shipped.

    Keys are dotted paths ("run.storage_path", "scaling.workers"), and each must already exist in
    the shipped file: an override never adds a key, so a test cannot drift from what is shipped by
    inventing settings, and a renamed key fails here.
    """
    derived = copy.deepcopy(shipped(config) if isinstance(config, str) else dict(config))
    for dotted, value in overrides.items():
        *parents, name = dotted.split(".")
        node = derived
        for part in parents:
            node = node[part] if isinstance(node, dict) else node[int(part)]
        if isinstance(node, list):
            node[int(name)] = value
            continue
        if name not in node:
            raise KeyError(f"{dotted!r} is not a key of the shipped config")
        node[name] = value
    return derived


def write_yaml(path: Path, config: Mapping[str, Any]) -> str:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return str(path)


def torch_extensions_dir(scratch: Path) -> str:
    """DeepSpeed's CPU shm_comm op, JIT-built once (about 40 s) into a cache the job workers share.

    Built with the clusters' PATH (the venv's bin first), so with the venv's `ninja`: the system's
    (1.11 here) and the venv's (1.13) hash build commands differently, and each rebuilds a cache the
    other wrote. Hence a cache of its own under the .venv, beside tests/test_train.py's (whose
    in-process cluster keeps the test process's PATH); it survives sessions.
    """
    venv = REPO / ".venv"
    folder = venv / "torch_extensions-cluster" if venv.is_dir() else scratch / "torch_extensions"
    env = {**os.environ, "PATH": _venv_path(), "TORCH_EXTENSIONS_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", _PREBUILD], env=env, check=True, capture_output=True, timeout=900)
    return str(folder)


def _venv_path() -> str:
    return f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


# ----------------------------------------------------------------------------------------------
# A cluster of the test's own


@dataclass
class LocalCluster:
    """A head node started by `ray start --head` in its own session and temp dir."""

    temp_dir: Path
    session_id: int
    gcs_address: str
    dashboard_url: str | None
    env: dict[str, str] = field(repr=False)  # for CLI calls and drivers: venv first, auth off, marker

    @classmethod
    def start(
        cls,
        num_cpus: float,
        *,
        resources: Mapping[str, float] | None = None,
        dashboard: bool = True,
        autoscaling_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        object_store_mb: int = 256,
    ) -> LocalCluster:
        """Start a head with `num_cpus` logical CPUs and custom `resources`; `env` is added to the
        environment of every process of the cluster.

        With `autoscaling_config` (a cluster config dict for the fake multi-node provider, see
        `fake_cluster_config`), the head's autoscaler launches fake worker nodes on this machine.
        """
        # A short root: Ray's socket paths under it must stay below the 107-byte AF_UNIX limit.
        temp_dir = Path(tempfile.mkdtemp(prefix="prc-", dir="/tmp"))
        port = free_port()
        cluster_env = {
            **os.environ,
            **(env or {}),
            "PATH": _venv_path(),  # the jobs' `python` is the venv's (DESIGN.md)
            "RAY_AUTH_MODE": "disabled",  # DESIGN.md: else `ray job submit` may meet InvalidAuthToken
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: str(temp_dir),
        }
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # never the session's in-process cluster
            cluster_env.pop(name, None)
        command = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            # Fixed default ports would collide with other clusters on this machine.
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        if resources:
            command.append(f"--resources={json.dumps(dict(resources))}")
        dashboard_port = free_port() if dashboard else None
        if dashboard_port:
            command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        else:
            command += ["--include-dashboard=false"]
        if autoscaling_config is not None:
            config_path = temp_dir / "autoscaling.yaml"
            config = copy.deepcopy(dict(autoscaling_config))
            config["provider"]["gcs_address"] = f"{node_ip()}:{port}"  # the provider's default: 6379
            config_path.write_text(yaml.safe_dump(config))
            command.append(f"--autoscaling-config={config_path}")
            cluster_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        # The `ray start` process leads a new session and exits; what it started keeps the session id.
        starter = subprocess.Popen(
            command,
            env=cluster_env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cluster = cls(
            temp_dir=temp_dir,
            session_id=starter.pid,
            gcs_address=f"{node_ip()}:{port}",
            dashboard_url=f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None,
            env={**cluster_env, "RAY_ADDRESS": f"{node_ip()}:{port}"},
        )
        try:
            output, _ = starter.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            cluster.stop()
            raise
        if starter.returncode != 0:
            cluster.stop()
            raise RuntimeError(f"ray start failed ({starter.returncode}): {output[-3000:]}")
        return cluster

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: in the head's session, or carrying its marker.

        The session id (the exited `ray start`'s pid) stays taken while any member lives, and pids
        are handed out in sequence, so no stranger can hold it while a test looks.
        """
        found = []
        for process in psutil.process_iter():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                if os.getsid(process.pid) == self.session_id or (
                    process.pid != os.getpid() and process.environ().get(MARKER) == str(self.temp_dir)
                ):
                    found.append(process)
            except (psutil.Error, OSError):
                continue  # gone, or not ours to read
        return found

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM this cluster's processes, SIGKILL what is left after `grace_s`; remove the temp dir."""
        for _ in range(3):  # a dying raylet may still spawn a worker: look again
            processes = self.processes()
            if not processes:
                break
            for process in processes:
                _signal(process, signal.SIGTERM)
            _, alive = psutil.wait_procs(processes, timeout=grace_s)
            for process in alive:
                _signal(process, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def cli(self, *args: str, timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run a CLI of the venv (`ray ...`, `serve ...`) against this cluster."""
        result = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and result.returncode != 0:
            output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            raise AssertionError(f"{' '.join(args[:3])} exited {result.returncode}:\n{output}")
        return result

    def driver(self, *args: str, log: Path) -> subprocess.Popen:
        """Start a Python driver (a script and its arguments) attached to this cluster; output to `log`."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                [str(BIN / "python"), *args],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def run_driver(self, *args: str, log: Path, timeout_s: float = 600) -> str:
        """Run a driver to its end; its output, or an AssertionError with its tail if it failed."""
        process = self.driver(*args, log=log)
        try:
            process.wait(timeout=timeout_s)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        output = log.read_text(errors="replace")
        if process.returncode != 0:
            raise AssertionError(f"{' '.join(args)[:200]} exited {process.returncode}:\n{output[-6000:]}")
        return output


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.Error:
        pass


def node_ip() -> str:
    """The address Ray gives this machine's nodes (the GCS listens there)."""
    import ray.util

    return ray.util.get_node_ip_address()


# ----------------------------------------------------------------------------------------------
# The fake multi-node autoscaler (Ray's `fake_multinode` provider)

# Ray's AutoscalingCluster reads ray/autoscaler/_private/fake_multi_node/example.yaml, which the
# 2.60 wheel does not ship; this is that file's content minus its node types.
FAKE_CLUSTER_BASE: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",  # the provider names its head so
    "auth": {},
    "upscaling_speed": 1.0,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def fake_cluster_config(
    cluster: Mapping[str, Any],
    scale: Callable[[str, dict[str, float]], dict[str, float]],
    idle_timeout_minutes: float,
    object_store_mb: int = 100,
) -> dict[str, Any]:
    """A fake multi-node config from a cluster launcher config (cluster.yaml).

    Worker node types keep their names and min/max workers; `scale(name, resources)` gives each
    type's (logical) resources on this machine. The head becomes the provider's `ray.head.default`
    with the scaled head resources. Only the idle timeout is replaced.
    """
    head_type = cluster["head_node_type"]
    nodes = cluster["available_node_types"]
    types: dict[str, Any] = {
        "ray.head.default": {
            "resources": scale(head_type, dict(nodes[head_type]["resources"])),
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, node in nodes.items():
        if name == head_type:
            continue
        types[name] = {
            "resources": {
                **scale(name, dict(node["resources"])),
                "object_store_memory": object_store_mb << 20,
            },
            "node_config": {},
            "min_workers": node["min_workers"],
            "max_workers": node["max_workers"],
        }
    return {
        **copy.deepcopy(FAKE_CLUSTER_BASE),
        "max_workers": cluster["max_workers"],
        "idle_timeout_minutes": idle_timeout_minutes,
        "available_node_types": types,
    }


def nodes_by_type(cluster: LocalCluster) -> dict[str, int]:
    """Alive fake worker nodes per node type, as the autoscaler launched them."""
    counts: dict[str, int] = {}
    for process in cluster.processes():
        try:
            if process.name() != "raylet":
                continue
            node_type = process.environ().get("RAY_NODE_TYPE_NAME")
        except psutil.Error:
            continue
        if node_type:
            counts[node_type] = counts.get(node_type, 0) + 1
    return counts


def wait_for_nodes(cluster: LocalCluster, expected: dict[str, int], timeout_s: float, what: str) -> None:
    """Poll until the alive fake nodes per type are exactly `expected` (types not named: 0)."""
    wanted = {name: count for name, count in expected.items() if count}

    def matches() -> bool:
        return nodes_by_type(cluster) == wanted

    try:
        wait_for(matches, timeout_s, what)
    except AssertionError as error:
        raise AssertionError(
            f"{error}: nodes by type {nodes_by_type(cluster)}, expected {expected}"
        ) from None


def job_status(cluster: LocalCluster, submission_id: str) -> str:
    """`ray job status` of a job on this cluster: SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING."""
    output = cluster.cli("ray", "job", "status", "--address", cluster.dashboard_url, submission_id).stdout
    final = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}  # the CLI's words
    for words, status in final.items():
        if f"Job '{submission_id}' {words}" in output:
            return status
    for status in ("RUNNING", "PENDING"):
        if f"Status for job '{submission_id}': {status}" in output:
            return status
    raise AssertionError(f"no status in `ray job status` output: {output[-2000:]}")
