"""Batch generation: many prompts/conditions from a JSONL file through Ray Data GPU actors to storage.

Each input line is a request in the HTTP API's schema (`pusa_ray.video_request.VideoRequest`),
plus an optional `name`; media are s3:// URIs or inline base64. Outputs go to
`{output}/{name}.mp4` and `{output}/{name}.safetensors` (the latents), with `results.jsonl`
(one line per input: status, error, seconds) and a manifest written last. An item's video is
written after its latents, so a video in storage marks the item done: a rerun skips those names
(an interrupted batch resumes where it stopped), and so does a task that Ray Data retries after
its actor died, so no output is generated twice.

    ray job submit --working-dir . -- python jobs/generate.py --config CONFIG.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import ray
import yaml
from pydantic import Field, ValidationError

from pusa_ray import storage
from pusa_ray.config import StrictModel, check_plain_name
from pusa_ray.errors import UserInputError
from pusa_ray.models.speed import SpeedSettings


class AdapterRef(StrictModel):
    uri: str
    alpha: float = Field(default=1.4, ge=0.0, le=4.0)


class BatchConfig(StrictModel):
    """The job's YAML; unknown keys are errors."""

    input: str = Field(description="JSONL of requests, local or s3://")
    output: str = Field(description="output prefix, local or s3://")
    model: str = "tiny"
    device: str | None = None
    adapters: list[AdapterRef] = Field(default_factory=list, description="merged into every actor's model")
    actors: int = Field(default=1, ge=1)
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)
    speed: SpeedSettings = Field(default_factory=SpeedSettings, description="each actor's model")


def read_requests(config: BatchConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Valid items `{name, request}` and result rows for the lines that are not valid requests."""
    from pusa_ray.video_request import VideoRequest

    items, rejected, seen = [], [], set()
    for number, line in enumerate(storage.read_bytes(config.input).decode().splitlines(), start=1):
        if not line.strip():
            continue
        name = f"line-{number}"  # until the line says otherwise
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            name = str(raw.pop("name", f"{number:06d}"))
            check_plain_name(name, "name")
            if name in seen:
                raise ValueError(f"name {name!r} is used twice")
            VideoRequest.model_validate(raw)
        except (ValueError, ValidationError) as error:
            message = str(error).splitlines()[0] if not isinstance(error, ValidationError) else _first(error)
            row = {"name": name, "line": number, "status": "failed", "error": message, "seconds": 0.0}
            rejected.append(row)
            continue
        seen.add(name)
        items.append({"name": name, "request": json.dumps(raw)})
    return items, rejected


def _first(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"


class Generate:
    """A Ray Data actor: one model (with the batch's adapters merged), one request at a time."""

    def __init__(self, config: dict[str, Any]) -> None:
        from pusa_ray.models.loading import apply_adapters, load_components
        from pusa_ray.models.speed import apply_speed_settings

        self.config = BatchConfig.model_validate(config)
        self.components = load_components(self.config.model, device=self.config.device)
        apply_adapters(self.components, [(ref.uri, ref.alpha) for ref in self.config.adapters])
        apply_speed_settings(self.components, self.config.speed)

    def _generate(self, text: str, video_uri: str, latents_uri: str) -> None:
        from pusa_ray.pipeline import settings_from
        from pusa_ray.video_request import VideoRequest, run_request, write_outputs

        request = VideoRequest.model_validate_json(text)
        settings = settings_from(self.components, request)
        result = run_request(self.components, request, settings)
        write_outputs(result, request.fps or self.components.spec.fps, video_uri, latents_uri)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {"name": [], "status": [], "error": [], "seconds": []}
        for name, text in zip(batch["name"], batch["request"], strict=True):
            start = time.time()
            status, error = "completed", ""
            video_uri = storage.join(self.config.output, f"{name}.mp4")
            try:
                if not storage.exists(video_uri):  # else a retried task whose actor died after writing
                    self._generate(text, video_uri, storage.join(self.config.output, f"{name}.safetensors"))
            except (UserInputError, FileNotFoundError, ValueError) as failure:
                status, error = "failed", str(failure)
            for key, value in (("name", str(name)), ("status", status), ("error", error)):
                rows[key].append(value)
            rows["seconds"].append(round(time.time() - start, 3))
        return rows


def run(config: BatchConfig) -> dict[str, int]:
    """Generate every item not generated yet; write results and commit the output prefix."""
    items, results = read_requests(config)
    todo = [item for item in items if not storage.exists(storage.join(config.output, f"{item['name']}.mp4"))]
    skipped = len(items) - len(todo)
    print(f"batch: {len(items)} requests ({skipped} already done, {len(results)} invalid lines)", flush=True)
    if todo:
        dataset = ray.data.from_items(todo).map_batches(
            Generate,
            fn_constructor_kwargs={"config": config.model_dump(mode="json")},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_gpus=config.num_gpus_per_actor or None,
            num_cpus=config.num_cpus_per_actor,
        )
        results += dataset.take_all()
    results_uri = storage.join(config.output, "results.jsonl")
    # A rerun keeps earlier rows of requests; lines that never became one (they carry their line
    # number, and keep whatever name they gave) are read again from this input.
    merged = {row["name"]: row for row in _previous_results(results_uri) if "line" not in row}
    done = {item["name"] for item in items} - {item["name"] for item in todo}
    for name in sorted(done - set(merged)):  # done by a run that died before it wrote its results
        merged[name] = {"name": name, "status": "completed", "error": "", "seconds": 0.0}
    merged.update({row["name"]: row for row in results if "line" not in row})
    rows = [*merged.values(), *(row for row in results if "line" in row)]
    fields = ("name", "line", "status", "error", "seconds")
    lines = "".join(json.dumps({key: row[key] for key in fields if key in row}) + "\n" for row in rows)
    storage.write_bytes(results_uri, lines.encode())
    storage.commit_dir(
        config.output, extra={"kind": "pusa_ray.batch_generation", "model": config.model}, hashes=False
    )
    summary = {
        "completed": sum(row["status"] == "completed" for row in results),
        "failed": sum(row["status"] == "failed" for row in results),
        "skipped": skipped,
    }
    print(f"batch done: {json.dumps(summary)}", flush=True)
    return summary


def _previous_results(uri: str) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/generate.*.yaml)")
    args = parser.parse_args(argv)
    try:
        config = BatchConfig.model_validate(yaml.safe_load(storage.read_bytes(args.config)))
    except (ValidationError, FileNotFoundError, yaml.YAMLError) as error:
        print(f"generate: bad config {args.config!r}: {error}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init()
    summary = run(config)
    return 1 if summary["failed"] else 0
