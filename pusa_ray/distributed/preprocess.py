"""Ray Data preprocessing: raw videos + captions -> the latent dataset of `pusa_ray.data.latents`.

    ray job submit --working-dir . -- python jobs/preprocess.py --config jobs/configs/preprocess.tiny.yaml

This module is the Ray layer (the actors, the pipeline, the job's entry point); the Ray-free steps
live in `pusa_ray.preprocessing` (config, model, plan, decode, commit). Three steps:

1. **Plan** (the driver, no Ray). List the clips (a JSONL/CSV manifest, a folder with DiffSynth's
   ``metadata.csv``, or a folder of videos with sidecar ``.txt`` captions), stat each source (size
   and ETag on S3, size and mtime locally) and derive its key from its content identity and the
   encoding settings. Read what the output already holds: every complete shard's keys (from the
   sidecars) and the previous errors report. Clips already encoded are not redone; clips that
   failed for a reason their bytes determine (corrupt, too short, too wide) are not retried unless
   ``retry_skipped``. A bad config or a missing input fails here, before Ray starts, and a rerun
   with nothing left to do never starts Ray at all.
2. **Encode** (Ray Data, streaming, order irrelevant). Rows ``(key, uri, caption, start)`` flow
   through a decode actor pool (fetch, decode, sample at the target fps from ``start``, centre-crop
   and resize; a bad clip is written to an errors part file and dropped), a VAE actor pool (``[-1,
   1]`` pixels -> normalised latents), a text-encoder actor pool (prompt embeddings, unpadded; the
   UMT5 encoder lives only there) and a writer actor pool (one parquet shard + sidecar per
   ``shard_records`` records). The driver only receives one small row per shard written.
3. **Commit** (the driver). Index every clip of this input found in a complete shard, each key once
   (first shard by name wins), write the errors report, and commit the manifest last. The previous
   manifest stays valid until the new one replaces it.

A clip's key is ``sha256(format version, uri, size, ETag or mtime, start, caption, encoding
fingerprint)``; the fingerprint covers the model's VAE and text encoder (not the DiT), frames, fps,
size and storage dtypes. Shards are never overwritten (names carry the run id and a random part),
so a run killed at any point leaves only complete shards with sidecars, or debris without one that
the next commit deletes. One job per output prefix at a time.

Driver memory grows with the number of clips (their URIs, captions and keys), not with their
latents; a worker holds at most one batch of decoded pixels per actor plus Ray Data's buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pusa_ray import storage, video
from pusa_ray.data.latents import (
    SHARD_DIR,
    encode_prompts_unpadded,
    tensor_to_bytes,
    write_shard,
)
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import ModelDescription, describe_model
from pusa_ray.models.loading import load_codec, load_text_encoder, parts_source
from pusa_ray.preprocessing.commit import Summary, commit, run_work_uri
from pusa_ray.preprocessing.config import PoolResources, PreprocessConfig, load_config
from pusa_ray.preprocessing.decode import ClipError, decode_row
from pusa_ray.preprocessing.plan import PlannedClip, error_record, plan

logger = logging.getLogger(__name__)

MAX_INPUT_BLOCKS = 4096


# ----------------------------------------------------------------------------------------------
# Ray Data UDFs. Configs arrive as plain dicts and are validated again here.


def _device(pool: PoolResources) -> torch.device:
    return torch.device("cuda" if pool.num_gpus > 0 else "cpu")


class DecodeClips:
    """Actor: rows (key, uri, caption, start, ...) -> the same rows with ``pixels`` uint8
    ``[B, F, H, W, 3]``. Bad clips are written to an errors part file under the run's work dir and
    dropped from the batch."""

    def __init__(self, config: dict[str, Any], work_uri: str) -> None:
        self.config = PreprocessConfig.model_validate(config)
        self.work_uri = work_uri
        torch.set_num_threads(self.config.resources.decode.threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        config = self.config
        kept: dict[str, list[Any]] = {
            name: [] for name in ("key", "uri", "caption", "start", "size", "version")
        }
        pixels, errors = [], []
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            try:
                clip = decode_row(row, config)  # [F, H, W, 3]
            except ClipError as error:
                errors.append(
                    error_record(
                        str(row["uri"]),
                        error.kind,
                        error.reason,
                        key=str(row["key"]),
                        start=float(row["start"]),
                        caption=str(row["caption"]),
                        permanent=error.permanent,
                        **error.details,
                    )
                )
                continue
            for name in kept:
                kept[name].append(row[name])
            pixels.append(clip)
        if errors:
            lines = "".join(json.dumps(record) + "\n" for record in errors)
            storage.write_bytes(
                storage.join(self.work_uri, f"errors-{secrets.token_hex(8)}.jsonl"), lines.encode()
            )
        if not pixels:
            return  # nothing usable: no output batch (an empty tensor column has no Arrow type)
        output = {name: np.array(values, dtype=object) for name, values in kept.items()}
        output["start"] = np.array(kept["start"], dtype=np.float64)
        output["size"] = np.array(kept["size"], dtype=np.int64)
        output["pixels"] = np.stack(pixels)  # [B, F, H, W, 3] uint8
        yield output


class EncodeLatents:
    """Actor holding only the VAE: pixels uint8 ``[B, F, H, W, 3]`` -> normalised latents
    ``[B, C, F_lat, h, w]``, stored as bytes in ``latents_dtype``. Returns an Arrow table."""

    def __init__(self, config: dict[str, Any], model: dict[str, Any]) -> None:
        self.config = PreprocessConfig.model_validate(config)
        pool = self.config.resources.vae
        torch.set_num_threads(pool.threads())
        self.codec = load_codec(self.config.model, _device(pool))
        mean = self.codec.latents_mean.flatten().tolist()
        std = (1.0 / self.codec.inverse_std.flatten()).tolist()
        expected = model["vae"]
        if not (
            np.allclose(mean, expected["latents_mean"])
            and np.allclose(std, expected["latents_std"], rtol=1e-5)
        ):
            raise RuntimeError(
                f"the VAE loaded from {self.config.model!r} has latents mean/std {mean}/{std}, "
                f"but its config says {expected['latents_mean']}/{expected['latents_std']}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        config = self.config
        rows = len(batch["key"])
        if rows:
            pixels = torch.stack(
                [video.frames_to_tensor(clip) for clip in batch["pixels"]]
            )  # [B, 3, F, H, W]
            latents = self.codec.encode(pixels)  # [B, C, F_lat, h, w] float32
        blobs = [tensor_to_bytes(latents[index], config.latents_dtype) for index in range(rows)]
        shapes = [list(latents.shape[1:]) for _ in range(rows)] if rows else []
        return pa.table(
            {
                "key": pa.array(batch["key"].tolist(), pa.string()),
                "uri": pa.array(batch["uri"].tolist(), pa.string()),
                "caption": pa.array(batch["caption"].tolist(), pa.string()),
                "start": pa.array(batch["start"].tolist(), pa.float64()),
                "source_size": pa.array(batch["size"].tolist(), pa.int64()),
                "source_version": pa.array(batch["version"].tolist(), pa.string()),
                "latents": pa.array(blobs, pa.binary()),
                "latents_dtype": pa.array([config.latents_dtype] * rows, pa.string()),
                "latents_shape": pa.array(shapes, pa.list_(pa.int32())),
            }
        )


class EncodeText:
    """Actor holding only the tokenizer and text encoder: captions -> unpadded prompt embeddings
    ``[L_i, D]`` stored as bytes in ``context_dtype``, with their length and width."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = PreprocessConfig.model_validate(config)
        pool = self.config.resources.text
        torch.set_num_threads(pool.threads())
        self.tokenizer, self.encoder, self.max_length = load_text_encoder(self.config.model, _device(pool))

    def __call__(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption").to_pylist()
        contexts = (
            encode_prompts_unpadded(self.tokenizer, self.encoder, captions, self.max_length)
            if captions
            else []
        )  # each [L_i, D]
        dtype = self.config.context_dtype
        return (
            table.append_column(
                "context", pa.array([tensor_to_bytes(c, dtype) for c in contexts], pa.binary())
            )
            .append_column("context_dtype", pa.array([dtype] * len(contexts), pa.string()))
            .append_column("context_length", pa.array([c.shape[0] for c in contexts], pa.int32()))
            .append_column("context_dim", pa.array([c.shape[1] for c in contexts], pa.int32()))
        )


class WriteShards:
    """Actor: each batch of finished records becomes one shard (+ sidecar); returns one summary row."""

    def __init__(self, output: str, run: str) -> None:
        self.output, self.run = output, run

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        if table.num_rows == 0:
            return {"shard": np.array([], dtype=object), "records": np.array([], dtype=np.int64)}
        path = f"{SHARD_DIR}/{self.run}-{secrets.token_hex(8)}.parquet"
        info = write_shard(table, self.output, path, self.run)
        return {"shard": np.array([info.path], dtype=object), "records": np.array([len(info.keys)])}


def build_pipeline(
    config: PreprocessConfig, todo: Sequence[PlannedClip], model: ModelDescription, run: str
) -> Any:
    """The streaming Ray Data pipeline over ``todo``: decode -> VAE -> text -> shard writer."""
    import ray

    resources = config.resources
    plain = config.model_dump(mode="json")  # crosses to the workers as a plain dict
    rows = [clip.row() for clip in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), MAX_INPUT_BLOCKS)))
    pools = (
        (DecodeClips, resources.decode, {"config": plain, "work_uri": run_work_uri(config.output, run)}),
        (EncodeLatents, resources.vae, {"config": plain, "model": dataclasses.asdict(model)}),
        (EncodeText, resources.text, {"config": plain}),
    )
    for udf, pool, arguments in pools:
        dataset = dataset.map_batches(
            udf,
            fn_constructor_kwargs=arguments,
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            batch_size=pool.batch_size,
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            resources=pool.resources or None,
            batch_format="pyarrow" if udf is EncodeText else "numpy",
        )
    return dataset.map_batches(
        WriteShards,
        fn_constructor_kwargs={"output": config.output, "run": run},
        compute=ray.data.ActorPoolStrategy(size=resources.writer.actors),
        batch_size=config.shard_records,
        num_cpus=resources.writer.num_cpus,
        resources=resources.writer.resources or None,
        batch_format="pyarrow",
    )


# ----------------------------------------------------------------------------------------------
# The job


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def run(config: PreprocessConfig, run_id: str | None = None) -> Summary:
    """Plan, encode what is missing on Ray (started with ``ray.init()`` if needed), commit."""
    started = time.perf_counter()
    run_id = run_id or new_run_id()
    parts_source(config.model)  # the actors can load its codec and text encoder
    model = describe_model(config.model)
    model.check_video(config.frames, config.height, config.width)
    planned = plan(config, model)
    logger.info(
        "plan: %d clips, %d already present, %d to encode, %d skipped, %d duplicate rows ignored",
        len(planned.clips),
        planned.already_present,
        len(planned.todo),
        len(planned.errors),
        planned.duplicates,
    )
    written = 0
    if planned.todo:
        import ray

        if not ray.is_initialized():
            ray.init()  # no arguments: attach to the cluster this job runs on (or start a local one)
        ray.data.DataContext.get_current().execution_options.preserve_order = False  # keys identify records
        for row in build_pipeline(config, planned.todo, model, run_id).iter_rows():
            written += int(row["records"])
            logger.info(
                "wrote %s (%d records, %d/%d clips)", row["shard"], row["records"], written, len(planned.todo)
            )
    return commit(config, model, planned, run_id, written, time.perf_counter() - started)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pusa-ray preprocess",
        description="Encode videos and captions into a latent dataset (Ray Data job).",
    )
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/preprocess.*.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns 0 on success, 2 for bad configs or inputs (one line on stderr)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        summary = run(config)
    except (UserInputError, storage.UncommittedError) as error:
        if os.environ.get("PUSA_RAY_DEBUG"):
            raise
        print(f"pusa-ray preprocess: error: {error}", file=sys.stderr)
        return 2
    print(summary.line(), flush=True)
    return 0
