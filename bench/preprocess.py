"""Preprocessing throughput: a plain single-process loop vs the Ray Data job with 1 and 2 VAE actors.

Tiny preset on the CPU; clips large enough that VAE encoding, not scheduling, dominates (33 frames
at 192x192 by default: ~1.5 s of encoding per clip against ~0.1 s of decoding). Torch is pinned to
one thread per actor and one for the plain loop, so the figures measure the pipeline rather than
thread contention. Both do the same work per clip: fetch, decode, sample, crop/resize, VAE, text
encoder, parquet shard of one record.

Two figures per variant:
  end to end    clips / wall time of the whole run (Ray: actor start-up and model loading included)
  steady state  clips after every encoder delivered its first one / the time they took
                (start-up and pipeline fill excluded)
Goals (steady state): 2 actors / 1 actor >= 1.6; the 1-actor job / the plain loop >= 0.8.

    python bench/preprocess.py [--clips 24] [--frames 33] [--size 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pusa_ray import video
from pusa_ray.data.latents import encode_prompts_unpadded, tensor_to_bytes, write_shard
from pusa_ray.distributed import preprocess
from pusa_ray.models.description import describe_model
from pusa_ray.models.loading import load_codec, load_text_encoder
from pusa_ray.preprocessing import commit as committing
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import decode as decoding
from pusa_ray.preprocessing import plan as planning


def make_clips(folder: Path, count: int, frames: int, size: int) -> None:
    """`count` mp4 clips with moving squares, each with a .txt caption beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng(index)
        clip = np.empty((frames, size, size, 3), dtype=np.uint8)
        clip[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        square = size // 4
        for frame in range(frames):
            top, left = (index + 2 * frame) % (size - square), (3 * index + 3 * frame) % (size - square)
            clip[frame, top : top + square, left : left + square] = rng.integers(0, 256, 3, dtype=np.uint8)
        video.write_mp4(folder / f"clip{index:03d}.mp4", clip, 16)
        (folder / f"clip{index:03d}.txt").write_text(f"a square, clip {index}, moving right and down")


def make_config(
    raw: Path, output: Path, frames: int, size: int, vae_actors: int
) -> prep_config.PreprocessConfig:
    return prep_config.parse_config(
        {
            "input": str(raw),
            "output": str(output),
            "model": "tiny",
            "frames": frames,
            "height": size,
            "width": size,
            "shard_records": 1,
            "resources": {
                "decode": {"actors": 1, "num_cpus": 0.25, "torch_threads": 1},
                "vae": {"actors": vae_actors, "num_cpus": 0.5, "torch_threads": 1},
                "text": {"actors": 1, "num_cpus": 0.25, "batch_size": 1, "torch_threads": 1},
                "writer": {"num_cpus": 0.25},
            },
        }
    )


def plain_loop(config: prep_config.PreprocessConfig) -> tuple[float, list[float]]:
    """Everything in this process, one clip at a time: (wall seconds, time of each shard written)."""
    started = time.perf_counter()
    model = describe_model(config.model)
    todo = planning.plan(config, model).todo
    device = torch.device("cpu")
    codec = load_codec(config.model, device)
    tokenizer, encoder, length = load_text_encoder(config.model, device)
    stamps = []
    for clip in todo:
        frames = decoding.prepare_clip(
            clip.uri,
            clip.start,
            config.frames,
            config.fps,
            config.height,
            config.width,
            config.max_crop_discard,
        )  # [F, H, W, 3]
        latents = codec.encode(video.frames_to_tensor(frames)[None])[0]  # [C, F_lat, h, w]
        (context,) = encode_prompts_unpadded(tokenizer, encoder, [clip.caption], length)  # [L, D]
        record = {
            "key": [clip.key],
            "uri": [clip.uri],
            "caption": [clip.caption],
            "start": [clip.start],
            "source_size": [clip.size],
            "source_version": [clip.version],
            "latents": [tensor_to_bytes(latents, config.latents_dtype)],
            "latents_dtype": [config.latents_dtype],
            "latents_shape": [list(latents.shape)],
            "context": [tensor_to_bytes(context, config.context_dtype)],
            "context_dtype": [config.context_dtype],
            "context_length": [context.shape[0]],
            "context_dim": [context.shape[1]],
        }
        write_shard(pa.table(record), config.output, f"shards/plain-{clip.key}.parquet")
        stamps.append(time.perf_counter())
    return time.perf_counter() - started, stamps


def ray_job(config: prep_config.PreprocessConfig) -> tuple[float, list[float]]:
    """The job's own plan -> pipeline -> commit, timing each shard as the driver receives it."""
    started = time.perf_counter()
    model = describe_model(config.model)
    planned = planning.plan(config, model)
    run = preprocess.new_run_id()
    stamps = [
        time.perf_counter() for _ in preprocess.build_pipeline(config, planned.todo, model, run).iter_rows()
    ]
    committing.commit(config, model, planned, run, len(stamps), time.perf_counter() - started)
    return time.perf_counter() - started, stamps


def rates(clips: int, wall: float, stamps: list[float], encoders: int) -> tuple[float, float]:
    """(end to end, steady state) clips/s; steady state starts when each encoder has delivered a clip."""
    settled = stamps[encoders - 1 :]
    steady = (len(settled) - 1) / (settled[-1] - settled[0]) if len(settled) > 1 else float("nan")
    return clips / wall, steady


VARIANTS = (
    ("plain loop", plain_loop, 1),
    ("ray, 1 VAE actor", ray_job, 1),
    ("ray, 2 VAE actors", ray_job, 2),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all variants; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    load_before = os.getloadavg()[0]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="pusa_ray_bench_") as scratch:
        root = Path(scratch)
        make_clips(root / "raw", args.clips, args.frames, args.size)
        make_clips(root / "warm", 2, args.frames, args.size)
        ray_job(make_config(root / "warm", root / "out-warm", args.frames, args.size, 1))  # warm the workers
        # Rounds alternate the variants, so a noisy neighbour slows all of them, not one.
        for round_index in range(args.repeats):
            for name, runner, actors in VARIANTS:
                output = root / f"out-{round_index}-{actors}-{runner.__name__}"
                wall, stamps = runner(make_config(root / "raw", output, args.frames, args.size, actors))
                assert len(stamps) == args.clips, f"{name} wrote {len(stamps)} of {args.clips} clips"
                results[name].append(rates(args.clips, wall, stamps, actors))
    ray.shutdown()

    shape = f"{args.frames} frames at {args.size}x{args.size}"
    print(f"{args.clips} clips of {shape}, tiny preset, CPU, {os.cpu_count()} cores, one torch thread each")
    print(f"load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"{'clips/s':22s} {'end to end':>12s} {'steady state':>14s}   (best of {args.repeats}; all rounds)")
    best = {name: tuple(max(run[i] for run in runs) for i in range(2)) for name, runs in results.items()}
    for name, runs in results.items():
        rounds = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in runs)
        print(f"{name:22s} {best[name][0]:12.3f} {best[name][1]:14.3f}   ({rounds})")
    plain, one, two = best.values()
    for label, index in (("end to end", 0), ("steady state", 1)):
        print(
            f"{label}: 2 actors / 1 actor = {two[index] / one[index]:.2f} (goal >= 1.6); "
            f"1-actor job / plain loop = {one[index] / plain[index]:.2f} (goal >= 0.8)"
        )


if __name__ == "__main__":
    main()
