"""Training throughput: a bare single-process torch loop vs the Ray Train + DeepSpeed job, 1 and 2 workers.

The tiny recipe (jobs/configs/train.tiny.yaml: LoRA rank 16 on the `tiny` DiT, batch 1 per worker,
gradient checkpointing, half a CPU and one torch thread per worker) on latents of its shape (17
frames at 64x64 -> [16, 5, 8, 8]), random values. The bare loop does the same work per step on the
same model and batch: read the record, draw noise and per-frame timesteps, forward, backward,
clip, AdamW, warm-up schedule; one torch thread.

Figures:
  steady samples/s   samples per step / mean step time, the first `--warmup` steps left out. A
                     step of the job runs from the end of the previous one, so the per-step
                     all-reduce, Ray reports and DeepSpeed's step all count.
  end to end         samples / wall time of the whole run (the job: cluster attach, worker start,
                     model build, DeepSpeed set-up, the final checkpoint and export included)
  overhead           job step time (1 worker) / bare step time, same model and batch
  scaling            2-worker samples/s / 1-worker samples/s (2 cores: at most 2)

    python bench/train.py [--steps 200] [--base tiny] [--report-interval 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pusa_ray import storage
from pusa_ray.data.latents import tensor_to_bytes, write_shard
from pusa_ray.distributed import train as job
from pusa_ray.models.description import describe_model
from pusa_ray.preprocessing import commit as committing
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import plan as planning
from pusa_ray.training import checkpoint as train_checkpoint
from pusa_ray.training.config import TrainConfig, load_config
from pusa_ray.training.data import DataLayout, load_batch, split_records
from pusa_ray.training.model import build_training_model, trainable_parameters
from pusa_ray.training.objective import batch_loss, warmup_factor

REPO = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 17, 64


def make_dataset(output: str, clips: int) -> str:
    """A committed latent dataset of random records of the tiny recipe's shape."""
    generator = torch.Generator().manual_seed(0)
    shape = (16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    keys = [f"clip{index}" for index in range(clips)]
    lengths = [8 + index for index in range(clips)]
    table = pa.table(
        {
            "key": keys,
            "uri": [f"/raw/{key}.mp4" for key in keys],
            "caption": [f"caption {key}" for key in keys],
            "start": [0.0] * clips,
            "source_size": [1] * clips,
            "source_version": ["1"] * clips,
            "latents": [tensor_to_bytes(torch.randn(shape, generator=generator), "float32") for _ in keys],
            "latents_dtype": ["float32"] * clips,
            "latents_shape": [list(shape)] * clips,
            "context": [tensor_to_bytes(torch.randn(n, 32, generator=generator), "float32") for n in lengths],
            "context_dtype": ["float32"] * clips,
            "context_length": lengths,
            "context_dim": [32] * clips,
        }
    )
    write_shard(table, output, "shards/bench.parquet", "bench")
    config = prep_config.parse_config(
        {"input": "/unused", "output": output, "frames": FRAMES, "height": SIZE, "width": SIZE}
    )
    planned = [planning.PlannedClip(key, f"/raw/{key}.mp4", f"caption {key}", 0.0, 1, "1") for key in keys]
    plan = planning.Plan(clips=planned, todo=[], errors=[], already_present=0, duplicates=0)
    committing.commit(config, describe_model("tiny"), plan, "bench", 0, 1.0)
    return output


def make_config(
    latents: str, root: Path, workers: int, steps: int, base: str, interval: float
) -> TrainConfig:
    """The shipped tiny recipe, pointed at the bench's data, one checkpoint and probe at the end."""
    recipe = load_config(REPO / "jobs/configs/train.tiny.yaml").plain()
    recipe.update(
        latents=latents,
        model={"base": base, "init": "pretrained"},
        steps=steps,
        export=None,
        log_every=10**9,
        report_interval_s=interval,
    )
    recipe["validation"].update(every=steps, videos=None)
    recipe["checkpoint"].update(every=steps, num_to_keep=1)
    recipe["scaling"].update(workers=workers)
    recipe["run"].update(name=f"bench-{workers}w-{time.time_ns()}", storage_path=str(root / "runs"))
    return TrainConfig.model_validate(recipe)


def bare_loop(config: TrainConfig, steps: int) -> tuple[dict[int, float], float]:
    """(step times, wall time incl. model build): the same work as a job step, one process, no Ray."""
    from pusa_ray.data.latents import LatentDataset

    started = time.perf_counter()
    torch.set_num_threads(1)
    model = build_training_model(config)
    parameters = trainable_parameters(model)
    settings = config.optimizer
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(settings.warmup_steps))
    dataset = LatentDataset(config.latents)
    train, _ = split_records(len(dataset), 4, config.validation.hold_out, config.validation.seed)
    layout = DataLayout(tuple(train), config.run.seed, 1, config.batch_size, 1)
    times = {}
    for step in range(steps):
        begun = time.perf_counter()
        batch = load_batch(dataset, layout, step, 0, 0, config.timesteps)
        batch_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times[step + 1] = time.perf_counter() - begun
    return times, time.perf_counter() - started


def job_run(config: TrainConfig) -> tuple[dict[int, float], float, job.TrainSummary]:
    """(step times from the reported per-step metrics, wall time, summary) of one job run."""
    started = time.perf_counter()
    summary = job.run(config)
    wall = time.perf_counter() - started
    snapshot = json.loads(
        storage.read_bytes(storage.join(train_checkpoint.run_uri(config), "checkpoint_manager_snapshot.json"))
    )
    history = snapshot["latest_checkpoint_result"]["metrics"]["history"]  # the steps since the last report
    return {record["step"]: record["step_time_s"] for record in history}, wall, summary


def steady(times: dict[int, float], warmup: int, samples_per_step: int) -> float:
    return samples_per_step / statistics.mean(seconds for step, seconds in times.items() if step > warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of steady figures")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--base", default="tiny", help="preset (tiny, tiny-wide) under the tiny recipe")
    parser.add_argument("--report-interval", type=float, default=5.0, help="the job's report_interval_s")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if (REPO / ".venv").is_dir():  # DeepSpeed's JIT-built CPU op, shared with the tests' cache
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="pusa_bench_train_") as scratch:
        root = Path(scratch)
        latents = make_dataset(str(root / "latents"), args.clips)
        one = make_config(latents, root, 1, args.steps, args.base, args.report_interval)
        bare_times, bare_wall = bare_loop(one, args.steps)
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=256 * 1024**2)
        results: dict[int, Any] = {}
        for workers in (1, 2):
            config = make_config(latents, root, workers, args.steps, args.base, args.report_interval)
            results[workers] = (*job_run(config), config.samples_per_step)
        ray.shutdown()

    bare = steady(bare_times, args.warmup, 1)
    print(
        f"tiny recipe, base {args.base}, {args.steps} steps, batch 1 per worker, 1 torch thread per process"
    )
    print(f"{'variant':<28}{'steady samples/s':>18}{'end-to-end samples/s':>22}{'wall s':>9}")
    print(f"{'bare torch loop':<28}{bare:>18.1f}{args.steps / bare_wall:>22.1f}{bare_wall:>9.1f}")
    for workers, (times, wall, _, per_step) in results.items():
        rate = steady(times, args.warmup, per_step)
        label = f"Ray Train + DeepSpeed, {workers}w"
        print(f"{label:<28}{rate:>18.1f}{args.steps * per_step / wall:>22.1f}{wall:>9.1f}")
    one_rate = steady(results[1][0], args.warmup, 1)
    two_rate = steady(results[2][0], args.warmup, 2)
    print(f"overhead (job 1w step time / bare step time): {bare / one_rate:.2f}x")
    print(f"scaling (2 workers / 1 worker, steady samples/s): {two_rate / one_rate:.2f}x")


if __name__ == "__main__":
    main()
