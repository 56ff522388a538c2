"""The README's quickstart, run as written: the block under "## Quickstart", command by command.

Every line of the block runs with bash in the repo root, as a newcomer types it, with three
documented stand-ins for what would touch other clusters on this machine:

- `source .venv/bin/activate`: the test's environment already has the venv's bin first on PATH;
- `ray start --head ...`: `LocalCluster.start` runs `ray start --head --num-cpus=2` itself, with
  free ports and a temp dir of its own (the block's ports are the defaults, which another cluster
  of this machine may hold); the CLIs find it through RAY_API_SERVER_ADDRESS and
  RAY_DASHBOARD_ADDRESS, which a user's default localhost:8265 stands for;
- `ray stop`: stops that cluster's processes only (`ray stop` would stop every cluster here).

The quickstart's files live under /tmp/pusa-ray (the tiny configs' paths), emptied first. Each
command must exit 0; at the end the adapter's video and the batch outputs must be there.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pusa_ray import video
from tests.cluster_helpers import REPO, LocalCluster, torch_extensions_dir

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]

SCRATCH = Path("/tmp/pusa-ray")  # the tiny configs' and serve/config.local.yaml's paths


def quickstart_commands() -> list[str]:
    """The command lines of the first ``` block after the README's "## Quickstart" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Quickstart", 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S)
    assert block, "no code block under ## Quickstart"
    lines, pending = [], ""
    for line in block.group(1).splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    return lines


def test_the_quickstart_block_names_the_whole_flow():
    commands = quickstart_commands()
    words = [" ".join(command.split()[:2]) for command in commands]
    assert words[:2] == ["source .venv/bin/activate", "ray start"] and words[-1] == "ray stop"
    for needed in ("pusa-ray sample-data", "ray job", "serve deploy", "pusa-ray client"):
        assert needed in words, needed
    assert "--num-cpus 2" in commands[1]


def test_the_readme_quickstart_runs_as_written(tmp_path: Path):
    shutil.rmtree(SCRATCH, ignore_errors=True)
    (REPO / "out" / "quickstart.mp4").unlink(missing_ok=True)
    env = {"TORCH_EXTENSIONS_DIR": torch_extensions_dir(tmp_path), "PUSA_RAY_CACHE": str(tmp_path / "cache")}
    cluster = None
    timings, outputs = [], {}  # outputs: stdout by config file (jobs) or by command
    try:
        for command in quickstart_commands():
            started = time.perf_counter()
            if command.startswith("source "):
                continue
            if command.startswith("ray start"):
                cluster = LocalCluster.start(num_cpus=2, env=env)
                timings.append((command, time.perf_counter() - started, []))
                continue
            if command == "ray stop":
                cluster.stop()
                cluster = None
                continue
            assert cluster is not None, f"{command!r} runs before `ray start`"
            shell = {
                **cluster.env,
                "RAY_API_SERVER_ADDRESS": cluster.dashboard_url,
                "RAY_DASHBOARD_ADDRESS": cluster.dashboard_url,
            }
            shell.pop("RAY_ADDRESS")
            result = subprocess.run(
                ["bash", "-c", command], cwd=REPO, env=shell, capture_output=True, text=True, timeout=900
            )
            output = (result.stdout + result.stderr).strip()
            assert result.returncode == 0, f"{command}\nexited {result.returncode}:\n{output[-4000:]}"
            key = command.split(" --config ")[1].split()[0] if " --config " in command else command
            outputs[key] = result.stdout
            timings.append((command, time.perf_counter() - started, result.stdout.strip().splitlines()[-3:]))
    finally:
        if cluster is not None:
            cluster.stop()
    for command, seconds, last in timings:  # what the README's table reports (pytest -s shows it)
        print(f"{seconds:6.1f} s  {command}", *(f"         | {line}" for line in last), sep="\n")

    preprocessed = outputs["jobs/configs/preprocess.tiny.yaml"]
    assert "preprocess: 32 clips written, 4 skipped, 0 already present;" in preprocessed
    trained = outputs["jobs/configs/train.tiny.yaml"]
    assert "exported /tmp/pusa-ray/adapters/pusa-tiny/adapter.safetensors" in trained
    submitted = next(text for key, text in outputs.items() if key.startswith("pusa-ray client"))
    view = json.loads(submitted[submitted.index("{") :])
    assert view["status"] == "completed"
    assert view["adapter"] == "/tmp/pusa-ray/adapters/pusa-tiny/adapter.safetensors"  # the job used it

    frames, _fps = video.read_video(REPO / "out" / "quickstart.mp4")  # made with the trained adapter
    assert frames.shape[0] == 9 and frames.dtype.name == "uint8"
    errors = (SCRATCH / "latents-tiny" / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 4  # sample-data --with-bad: the job names each broken input
    assert (SCRATCH / "adapters" / "pusa-tiny" / "adapter.safetensors").is_file()
    rows = [json.loads(line) for line in (SCRATCH / "batch" / "results.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows] == ["completed"] * 3
    assert all((SCRATCH / "batch" / f"{row['name']}.mp4").is_file() for row in rows)
