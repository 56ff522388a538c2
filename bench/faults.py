"""Fault cases against a running service, one line each, ending `lost K of N`.

    python bench/faults.py [--jobs 16] [--freeze-s 10]

It starts what it breaks: a local Ray cluster (2 CPUs), moto's S3 server on loopback (the job
store lives there, so the storage fault is real S3 going silent) and serve/config.local.yaml on
the tiny-wide preset (jobs of a second or two). For each fault it submits a burst of jobs, waits
until one runs, injects the fault and polls every job to its end through restarts and outages:

- replica SIGKILL: the process of the Generator replica running a job (as the OOM killer would)
- ingress SIGKILL: the Ingress replica's process, with every job accepted
- storage freeze: the S3 server SIGSTOPped for --freeze-s seconds (accepts connections, never
  answers), with a status request in a loop during it (503 count and slowest answer reported)

A job is lost when it does not end `completed`. The same cases run in the test suite
(tests/test_serve_scaling.py) with assertions; this prints the figures for the README.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

JOB = {"frames": 17, "height": 64, "width": 64, "steps": 8, "guidance": 3.0}


def kill_replica(api, root: str, ids: list[str]) -> str:
    from tests.serve_helpers import first_running, sigkill_replica

    job_id, state = first_running(api, root, ids)
    sigkill_replica(state["replica"])
    return f"killed the replica running {job_id}"


def kill_ingress(api, root: str, ids: list[str]) -> str:
    from tests.serve_helpers import first_running, replica_tags, sigkill_replica

    first_running(api, root, ids)
    [ingress] = replica_tags("Ingress")
    sigkill_replica(ingress, "Ingress")
    return "killed the ingress"


def freeze_storage(server, seconds: float) -> Callable:
    def fault(api, root: str, ids: list[str]) -> str:
        from tests.serve_helpers import first_running

        first_running(api, root, ids)
        answers = []
        with server.paused():
            until = time.time() + seconds
            while time.time() < until:
                start = time.time()
                status = api.get(f"/v1/videos/{ids[-1]}", timeout=60).status_code
                answers.append((status, time.time() - start))
                time.sleep(0.05)
        refused = sum(status == 503 for status, _ in answers)
        others = sorted({status for status, _ in answers} - {200, 503})
        times = sorted(took for _, took in answers)
        median, slowest = times[len(times) // 2], times[-1]
        return (
            f"froze S3 {seconds:g} s: {refused} of {len(answers)} status requests answered 503"
            f"{f', others {others}' if others else ''}, median answer {median:.2f} s, slowest {slowest:.1f} s"
        )

    return fault


def run_case(api, root: str, name: str, fault: Callable, jobs: int) -> int:
    from tests.serve_helpers import final_views, submit_all, wait_for

    wait_for(lambda: api.get("/healthz").json()["active_jobs"] == 0, 300, "earlier jobs to drain")
    start = time.time()
    ids = submit_all(api, [{"prompt": f"{name} {i}", **JOB, "seed": i} for i in range(jobs)])
    what = fault(api, root, ids)
    views = final_views(api, ids, timeout_s=900)
    completed = sum(view["status"] == "completed" for view in views)
    retried = sum(view["attempts"] > 1 for view in views)
    lost = jobs - completed
    print(
        f"{name}: {what}; {completed} completed, {retried} on a later attempt, "
        f"{time.time() - start:.0f} s; lost {lost} of {jobs}",
        flush=True,
    )
    return lost


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=16, help="jobs per fault (max_queue is 16)")
    parser.add_argument("--freeze-s", type=float, default=10.0, help="how long S3 stays frozen")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from pusa_ray import storage
    from pusa_ray.models.loading import load_components, save_model_dir
    from tests.conftest import running_s3_server
    from tests.serve_helpers import Api, deploy, local_config, serve_port

    with tempfile.TemporaryDirectory() as scratch, running_s3_server(Path(scratch)) as server:
        bucket = f"faults-{uuid.uuid4().hex[:12]}"
        storage.s3_client().create_bucket(Bucket=bucket)
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
            runtime_env={"env_vars": {name: os.environ[name] for name in names}},
        )
        model = save_model_dir(load_components("tiny-wide", device="cpu"), Path(scratch) / "wide")
        root = f"s3://{bucket}/serve"
        port = serve_port()
        deploy(local_config(port, root, f"s3://{bucket}/adapters", f"s3://{bucket}/inputs", model))
        api = Api(f"http://127.0.0.1:{port}")
        cases = {
            "replica SIGKILL": kill_replica,
            "ingress SIGKILL": kill_ingress,
            "storage freeze": freeze_storage(server, args.freeze_s),
        }
        lost = sum(run_case(api, root, name, fault, args.jobs) for name, fault in cases.items())
        serve.shutdown()
        ray.shutdown()
    total = args.jobs * len(cases)
    print(f"all faults: lost {lost} of {total}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
