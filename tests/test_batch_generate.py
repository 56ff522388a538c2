"""jobs/generate.py: a JSONL of requests through Ray Data actors into S3, resumable."""

import base64
import json
import threading

import pytest
import yaml

from pusa_ray import storage, video
from pusa_ray.distributed.batch import main
from tests.serve_helpers import png_b64

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(600)]


def test_batch_generation_writes_outputs_results_and_resumes(ray_cluster, s3_bucket, tmp_path):
    small = {"frames": 9, "height": 32, "width": 32, "steps": 2}
    storage.write_bytes(f"{s3_bucket}/inputs/first.png", base64.b64decode(png_b64(3)))
    lines = [
        {"name": "red", "prompt": "a red circle", **small},
        {"name": "i2v-inline", "task": "i2v", "prompt": "x", "image": {"data": png_b64(1)}, **small},
        {"task": "i2v", "prompt": "from s3", "image": {"uri": f"{s3_bucket}/inputs/first.png"}, **small},
        {"name": "bad", "prompt": "x", "frames": 8},
        {
            "name": "missing",
            "task": "i2v",
            "prompt": "x",
            "image": {"uri": f"{s3_bucket}/inputs/none.png"},
            **small,
        },
        {"prompt": "x", "colour": "red"},
        {"name": "typo", "prompt": "x", "stpes": 4},
        "not an object",
        {"name": "cached", "prompt": "a red circle", **small, "cache": "first-block:0"},  # reuses nothing
        {"name": "bad-cache", "prompt": "x", "cache": "fast"},
    ]
    storage.write_bytes(
        f"{s3_bucket}/prompts.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode()
    )
    config = yaml.safe_load(open("jobs/configs/generate.tiny.yaml"))
    config.update(input=f"{s3_bucket}/prompts.jsonl", output=f"{s3_bucket}/batch", num_cpus_per_actor=0.5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    assert main(["--config", str(tmp_path / "config.yaml")]) == 1  # six of ten fail
    rows = [json.loads(line) for line in storage.read_bytes(f"{s3_bucket}/batch/results.jsonl").splitlines()]
    results = {row["name"]: row for row in rows}
    assert len(rows) == len(results) == 10
    assert (
        results["red"]["status"]
        == results["i2v-inline"]["status"]
        == results["000003"]["status"]
        == "completed"
    )
    assert results["bad"]["status"] == "failed" and "frames" in results["bad"]["error"]
    assert results["000006"]["status"] == "failed" and "colour" in results["000006"]["error"]
    assert (results["typo"]["status"], results["typo"]["line"]) == ("failed", 7)  # keeps its name
    assert "stpes" in results["typo"]["error"]
    assert results["line-8"]["status"] == "failed" and "JSON object" in results["line-8"]["error"]
    assert results["missing"]["status"] == "failed" and "none.png" in results["missing"]["error"]
    assert results["bad-cache"]["status"] == "failed" and "cache" in results["bad-cache"]["error"]
    # the request's cache setting reaches the actor's sampler: threshold 0 is the uncached video
    assert results["cached"]["status"] == "completed"
    assert storage.read_bytes(f"{s3_bucket}/batch/cached.safetensors") == storage.read_bytes(
        f"{s3_bucket}/batch/red.safetensors"
    )
    local = tmp_path / "red.mp4"
    local.write_bytes(storage.read_bytes(f"{s3_bucket}/batch/red.mp4"))
    assert video.probe_video(local)["frames"] == 9
    manifest = storage.read_manifest(f"{s3_bucket}/batch")
    assert {"red.mp4", "red.safetensors", "results.jsonl"} <= {entry.path for entry in manifest.files}

    before = storage.read_bytes(f"{s3_bucket}/batch/red.mp4")
    assert (
        main(["--config", str(tmp_path / "config.yaml")]) == 1
    )  # the failed ones fail again; others skipped
    assert storage.read_bytes(f"{s3_bucket}/batch/red.mp4") == before
    rerun_rows = [
        json.loads(line) for line in storage.read_bytes(f"{s3_bucket}/batch/results.jsonl").splitlines()
    ]
    rerun = {row["name"]: row for row in rerun_rows}
    assert len(rerun_rows) == 10  # the rejected lines are reported again, not twice
    assert rerun["red"] == results["red"] and rerun["typo"] == results["typo"]


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("input: a.jsonl\noutput: out\ncolour: red\n")
    assert main(["--config", str(tmp_path / "config.yaml")]) == 2
    assert "colour" in capsys.readouterr().err


def test_a_killed_actor_is_replaced_and_every_output_is_written_once(ray_cluster, s3_bucket):
    from pusa_ray.distributed.batch import BatchConfig, run
    from tests.serve_helpers import sigkill_descendant, wait_for

    bucket = s3_bucket[len("s3://") :]
    client = storage.s3_client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    small = {"frames": 9, "height": 32, "width": 32, "steps": 8}
    names = [f"clip{i}" for i in range(6)]
    lines = "".join(
        json.dumps({"name": n, "prompt": f"clip {n}", "seed": i, **small}) + "\n" for i, n in enumerate(names)
    )
    storage.write_bytes(f"{s3_bucket}/prompts.jsonl", lines.encode())
    output = f"{s3_bucket}/batch"
    config = BatchConfig(input=f"{s3_bucket}/prompts.jsonl", output=output, num_cpus_per_actor=0.5)

    summary: dict = {}
    job = threading.Thread(target=lambda: summary.update(run(config)))
    job.start()
    wait_for(
        lambda: any(storage.exists(f"{output}/{n}.mp4") for n in names) or not job.is_alive(), 240, "a video"
    )
    assert job.is_alive(), "the batch finished before its actor could be killed"
    sigkill_descendant("MapBatches(Generate)")  # the one Ray Data actor, mid-batch
    job.join(timeout=400)

    assert summary == {"completed": 6, "failed": 0, "skipped": 0}  # Ray Data replaced the actor
    rows = [json.loads(line) for line in storage.read_bytes(f"{output}/results.jsonl").splitlines()]
    assert sorted(row["name"] for row in rows) == names and {row["status"] for row in rows} == {"completed"}
    versions = client.list_object_versions(Bucket=bucket, Prefix="batch/")["Versions"]
    videos = sorted(entry["Key"] for entry in versions if entry["Key"].endswith(".mp4"))
    assert videos == [f"batch/{n}.mp4" for n in names]  # each video written exactly once
    listed = {entry.path for entry in storage.read_manifest(output).files}
    assert {f"{n}.{ext}" for n in names for ext in ("mp4", "safetensors")} <= listed
