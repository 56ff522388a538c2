"""Serve benchmarks, side by side in one run on a local cluster (CPU; ratios are what count).

(a) end-to-end HTTP (submit -> poll -> content) / a direct `generate` call of the same job in
    one process, on the tiny-wide preset (a job of a few seconds; goal <= 1.10)
(b) jobs per minute with 1 vs 2 generator replicas, for a burst of jobs

    python bench/serve.py [--jobs 3] [--burst 6]

Each generator replica is one Ray actor with 1 CPU (one torch thread); the direct call is pinned
to one thread as well. The deployment is serve/config.local.yaml with its autoscaling replaced
by a fixed replica count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

JOB = {
    "prompt": "a red circle moves right",
    "frames": 33,
    "height": 128,
    "width": 128,
    "steps": 10,
    "seed": 0,
}


def direct_seconds(jobs: int) -> float:
    import torch

    from pusa_ray import video
    from pusa_ray.models.loading import load_components
    from pusa_ray.pipeline import default_settings, generate

    torch.set_num_threads(1)
    components = load_components("tiny-wide", device="cpu")
    fields = {key: JOB[key] for key in ("frames", "height", "width", "steps", "seed")}
    settings = default_settings(components, **fields)
    generate(components, JOB["prompt"], [], settings)  # warm-up
    times = []
    for _ in range(jobs):
        start = time.perf_counter()
        result = generate(components, JOB["prompt"], [], settings)
        with tempfile.TemporaryDirectory() as scratch:  # the service writes its mp4 too
            video.write_mp4(Path(scratch) / "a.mp4", video.tensor_to_frames(result.video), 16)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def deploy_fixed(replicas: int, root: str, port: int) -> None:
    from tests.serve_helpers import deploy, local_config

    config = local_config(port, f"{root}/serve", f"{root}/adapters", "s3://unused/inputs", "tiny-wide")
    generator = config["applications"][0]["deployments"][1]
    generator.pop("autoscaling_config")
    generator["num_replicas"] = replicas
    generator["ray_actor_options"]["num_cpus"] = 0.9  # two fit beside the ingress on 2 CPUs
    deploy(config)


def http_job(api, body: dict) -> float:
    start = time.perf_counter()
    job_id = api.post(body).json()["id"]
    while api.get(f"/v1/videos/{job_id}").json()["status"] not in ("completed", "failed"):
        time.sleep(0.02)
    api.get(f"/v1/videos/{job_id}/content").raise_for_status()
    return time.perf_counter() - start


def burst_minutes(api, count: int) -> float:
    start = time.perf_counter()
    ids = [api.post({**JOB, "seed": i}).json()["id"] for i in range(count)]
    for job_id in ids:
        api.wait(job_id, timeout_s=1200)
    return (time.perf_counter() - start) / 60


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3, help="sequential jobs timed for (a)")
    parser.add_argument("--burst", type=int, default=6, help="jobs in the burst for (b)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from tests.serve_helpers import Api, serve_port

    direct = direct_seconds(args.jobs)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024, log_to_driver=False)
    rates = {}
    port = serve_port()
    with tempfile.TemporaryDirectory() as root:
        for replicas in (1, 2):
            deploy_fixed(replicas, root, port)
            api = Api(f"http://127.0.0.1:{port}")
            if replicas == 1:
                http_job(api, JOB)  # warm-up
                served = statistics.median(http_job(api, JOB) for _ in range(args.jobs))
            rates[replicas] = args.burst / burst_minutes(api, args.burst)
            serve.delete("pusa")
    ray.shutdown()
    print(
        f"(a) HTTP submit->content {served:.2f} s / direct generate {direct:.2f} s = {served / direct:.3f}"
        "   (tiny-wide, 33x128x128, 10 steps, CFG; goal <= 1.10)"
    )
    print(
        f"(b) {args.burst}-job burst: 1 replica {rates[1]:.1f} jobs/min, 2 replicas {rates[2]:.1f} jobs/min"
        f" = {rates[2] / rates[1]:.2f}x   (2 CPU cores, one per replica)"
    )


if __name__ == "__main__":
    main()
