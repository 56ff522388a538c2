"""Ray Train + DeepSpeed ZeRO-2: the Pusa VTA fine-tune (LoRA or full) over the latent dataset.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.tiny.yaml

The driver validates the config and the data (a bad config, a missing dataset or one encoded for
another model fails here, before any worker starts), then runs a `TorchTrainer` whose workers each
hold one DeepSpeed rank. The worker function receives the config as a plain dict and validates it
again. When it returns, the driver publishes the final adapter (or model directory) under the
export prefix, committed with a manifest, and prints one summary line.

A run lives at `{run.storage_path}/{run.name}/` (local or s3://). Ray keeps its checkpoint
registry there (`checkpoint_manager_snapshot.json`); each checkpoint is a directory::

    checkpoint-00000030/
        _MANIFEST.json                 written last by rank 0 once every rank's upload is done:
                                       every file with size and sha256, who wrote it, the step
        trainer_state.json             step, restarts, probe losses, ZeRO partition sizes, config
        adapter.safetensors            the LoRA in our format (or transformer/ for full fine-tuning)
        deepspeed/latest
        deepspeed/step-00000030/mp_rank_00_model_states.pt                  rank 0: trained params
        deepspeed/step-00000030/zero_pp_rank_{R}_mp_rank_00_optim_states.pt  rank R: its partition
        samples/step-00000030-{i}.mp4  optional fixed-seed sample videos

DeepSpeed's files are pickles: they are only ever loaded from the run's own storage, as written by
this job (trust the bucket as you trust the code). Resume: each (re)started worker asks
`ray.train.get_checkpoint()` for the latest checkpoint in Ray's registry, downloads the model
states and only its own optimizer partition, and continues at the next step. Worker failures
restart the whole group from there (`FailureConfig(max_failures)`); rerunning the job with the same
run name and storage path after losing the driver does the same.

This module is the Ray layer: the trainer, the worker set-up and loop, and `main`. The Ray-free
parts live in `pusa_ray.training`: config, data order, objective, model, `preflight` (the checks
before any worker starts), `checkpoint` (names, state, manifest, what a rank reads to resume) and
`export` (publishing the result).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import torch
from ray.train.torch.config import TorchConfig, _TorchBackend

from pusa_ray import storage
from pusa_ray.config import PRESETS
from pusa_ray.data.latents import LatentDataset
from pusa_ray.errors import UserInputError
from pusa_ray.training.checkpoint import (
    ADAPTER_FILE,
    CHECKPOINT_KIND,
    DEEPSPEED_DIR,
    SAMPLES_DIR,
    STATE_FILE,
    TRANSFORMER_DIR,
    TrainerState,
    checkpoint_name,
    commit_checkpoint,
    describe_files,
    download_checkpoint,
    local_or_s3,
    read_state,
    run_uri,
)
from pusa_ray.training.config import TrainConfig, load_config
from pusa_ray.training.data import (
    DataLayout,
    ProbeSet,
    build_probe_set,
    load_batch,
    mix_seed,
    split_records,
)
from pusa_ray.training.export import TrainSummary, absolute_paths, export
from pusa_ray.training.model import (
    build_training_model,
    export_adapter,
    export_transformer,
    trainable_parameters,
)
from pusa_ray.training.objective import batch_loss, probe_loss_sum, warmup_factor
from pusa_ray.training.preflight import Preflight, preflight

__all__ = [
    "CHECKPOINT_KIND",
    "Preflight",
    "TrainSummary",
    "build_trainer",
    "checkpoint_name",
    "deepspeed_config",
    "main",
    "preflight",
    "run",
    "run_uri",
    "train_loop_per_worker",
]

logger = logging.getLogger("pusa_ray.train")

_S3_ATTEMPTS = 10  # pyarrow's retries for Ray's checkpoint uploads (botocore's for ours)


# ----------------------------------------------------------------------------------------------
# Driver: checks before any worker starts


# ----------------------------------------------------------------------------------------------
# Driver: the trainer


def storage_for_ray(storage_path: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for `RunConfig`.

    s3:// goes through pyarrow's S3 filesystem with more retries than its default, at the endpoint
    that boto3 would use (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`), so Ray's checkpoint uploads
    reach the same store as our own reads and writes.
    """
    if not storage_path.startswith("s3://"):
        return local_or_s3(storage_path), None
    import pyarrow.fs

    bucket_and_key = storage_path.removeprefix("s3://").rstrip("/")
    options: dict[str, Any] = {
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=_S3_ATTEMPTS)
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif not endpoint:
        options["region"] = pyarrow.fs.resolve_s3_region(bucket_and_key.split("/", 1)[0])
    return bucket_and_key, pyarrow.fs.S3FileSystem(**options)


def _worker_env() -> dict[str, str]:
    """Driver settings the workers must share: where DeepSpeed caches its JIT-built ops."""
    names = ("TORCH_EXTENSIONS_DIR",)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def build_trainer(config: TrainConfig) -> Any:
    """The `TorchTrainer` for `config` (nothing runs until `.fit()`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}  # custom: node placement
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    storage_path, filesystem = storage_for_ray(config.run.storage_path)
    env = _worker_env()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.plain()},
        torch_config=DeviceAwareTorchConfig(),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


class _DeviceAwareTorchBackend(_TorchBackend):
    """Ray's torch backend, with NCCL only if every worker really has CUDA, else gloo.

    Ray picks NCCL whenever GPUs are requested; on fake GPU resources (a CPU cluster that
    advertises GPUs) NCCL cannot start, so the workers are asked first.
    """

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        usable = worker_group.execute(_cuda_usable)
        backend = "nccl" if all(usable) else "gloo"
        super().on_start(worker_group, dataclasses.replace(backend_config, backend=backend))


@dataclasses.dataclass
class DeviceAwareTorchConfig(TorchConfig):
    """`TorchConfig` whose process-group backend follows the workers' devices (NCCL or gloo)."""

    @property
    def backend_cls(self) -> type:
        return _DeviceAwareTorchBackend


# ----------------------------------------------------------------------------------------------
# Worker: set-up


def _log_setup() -> None:
    """INFO lines from this module; a stdout handler on the root logger unless one is configured."""
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)


def _device() -> torch.device:
    """CUDA when the process group is NCCL (every worker has a GPU), else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def deepspeed_config(config: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The generated DeepSpeed config: ZeRO stage 2 (optimizer state and gradients partitioned)."""
    zero: dict[str, Any] = {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": bf16,  # overlaps NCCL with backward; nothing to overlap on CPU
        "reduce_scatter": True,
        "reduce_bucket_size": 200_000_000,
        "allgather_bucket_size": 200_000_000,
        "elastic_checkpoint": False,  # each rank reads only its own optimizer partition
    }
    settings: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation,
        "train_batch_size": config.batch_size * config.gradient_accumulation * world_size,
        "gradient_clipping": config.optimizer.grad_clip or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.optimizer.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}
        settings["zero_force_ds_cpu_optimizer"] = False  # keep torch AdamW as the client optimizer
    return settings


def initialize_engine(config: TrainConfig, model: torch.nn.Module, world_size: int, bf16: bool) -> Any:
    import deepspeed

    parameters = trainable_parameters(model)
    settings = config.optimizer
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(settings.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=parameters,
        config=deepspeed_config(config, world_size, bf16),
    )
    return engine


@dataclasses.dataclass
class Worker:
    """Everything one rank holds during training."""

    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    engine: Any
    dataset: LatentDataset
    layout: DataLayout
    probe: ProbeSet
    run_uri: str
    sampling: Any = None  # rank 0: VAE, tokenizer, text encoder for sample videos, loaded on first use
    null_context: torch.Tensor | None = None  # the empty prompt's embedding, for caption dropout


def _set_up(loop_config: dict[str, Any]) -> Worker:
    import ray.train

    started = time.perf_counter()
    config = TrainConfig.model_validate(loop_config["config"])  # the dict is re-validated here
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, math.floor(config.scaling.cpus_per_worker)))
    device = _device()
    bf16 = device.type == "cuda" and config.precision != "fp32"
    dataset = LatentDataset(config.latents)
    train, probe_indices = split_records(
        len(dataset), config.validation.probe_samples, config.validation.hold_out, config.validation.seed
    )
    layout = DataLayout(
        tuple(train), config.run.seed, world_size, config.batch_size, config.gradient_accumulation
    )
    probe = build_probe_set(dataset, probe_indices, config.validation.seed, config.timesteps)
    data_ready = time.perf_counter()
    model = build_training_model(config, torch.bfloat16 if bf16 else torch.float32)
    model_ready = time.perf_counter()
    engine = initialize_engine(config, model.to(device), world_size, bf16)
    if rank == 0:
        logger.info(
            "set-up %.1f s (data %.1f, model %.1f, deepspeed %.1f) in a worker started %.1f s ago",
            time.perf_counter() - started,
            data_ready - started,
            model_ready - data_ready,
            time.perf_counter() - model_ready,
            _process_age(),
        )
        logger.info(
            "rank 0 of %d on %s (%s, %s): %d trainable of %d parameters, %d training records, %d probe",
            world_size,
            device,
            "bf16" if bf16 else "fp32",
            _backend(),
            sum(p.numel() for p in trainable_parameters(model)),
            sum(p.numel() for p in model.parameters()),
            len(train),
            len(probe_indices),
        )
    worker = Worker(config, rank, world_size, device, engine, dataset, layout, probe, run_uri(config))
    if config.caption_dropout > 0:
        worker.null_context = _null_context(config, dataset.info.context_padded_length)
    return worker


def _null_context(config: TrainConfig, length: int) -> torch.Tensor:
    """The empty prompt's embedding `[length, D]` by the base's text encoder, padded as the dataset's."""
    from pusa_ray.models.loading import load_text_encoder
    from pusa_ray.models.text import encode_prompts

    tokenizer, encoder, max_length = load_text_encoder(config.model.base, torch.device("cpu"))
    embedded = encode_prompts(tokenizer, encoder.float(), [""], max_length)[0]  # [max_length, D]
    if max_length != length:
        raise UserInputError(
            f"the dataset pads prompts to {length} tokens, the base's encoder to {max_length}"
        )
    return embedded.float()


def _process_age() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "none"


# ----------------------------------------------------------------------------------------------
# Worker: steps and validation


def _train_step(worker: Worker, step_index: int) -> float:
    """One optimizer step (all micro-batches) of 0-based step `step_index`; this rank's mean loss."""
    config, engine = worker.config, worker.engine
    torch.manual_seed(mix_seed("step", config.run.seed, step_index, worker.rank))  # LoRA dropout, if any
    losses = []
    for micro in range(config.gradient_accumulation):
        batch = load_batch(
            worker.dataset,
            worker.layout,
            step_index,
            micro,
            worker.rank,
            config.timesteps,
            config.caption_dropout,
            worker.null_context,
        ).to(worker.device)
        loss = batch_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def _probe_loss(worker: Worker) -> float:
    """Mean unweighted loss over the whole probe set (each rank evaluates its share)."""
    import torch.distributed as dist

    module = worker.engine.module
    module.eval()
    shard = worker.probe.shard(worker.rank, worker.world_size)
    total, count = probe_loss_sum(
        module, shard.to(worker.device) if shard else None, worker.config.batch_size
    )
    module.train()
    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=worker.device)
    dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def _zero_partitions(worker: Worker) -> dict[str, Any]:
    """Per-rank sizes of the ZeRO-2 fp32 partitions and of the AdamW state they carry."""
    import torch.distributed as dist

    optimizer = worker.engine.optimizer
    partition = sum(t.numel() for t in getattr(optimizer, "single_partition_of_fp32_groups", []))
    moments = sum(
        state["exp_avg"].numel() for state in optimizer.optimizer.state.values() if "exp_avg" in state
    )
    gathered: list[Any] = [None] * worker.world_size
    dist.all_gather_object(gathered, (partition, moments))
    return {
        "optimizer": type(optimizer).__name__,
        "stage": worker.engine.zero_optimization_stage(),
        "trainable_numel": sum(p.numel() for p in trainable_parameters(worker.engine.module)),
        "partition_numel": [int(p) for p, _ in gathered],
        "exp_avg_numel": [int(m) for _, m in gathered],
    }


# ----------------------------------------------------------------------------------------------
# Worker: checkpoints


def _write_rank_zero_files(worker: Worker, local: Path, state: TrainerState, extra: dict[str, Any]) -> None:
    config, step = worker.config, state.step
    module = worker.engine.module
    if config.method == "lora":
        export_adapter(module, config, local / ADAPTER_FILE, step)
    else:
        export_transformer(module, local / TRANSFORMER_DIR, step)
    document = {**dataclasses.asdict(state), **extra, "config": config.plain()}
    (local / STATE_FILE).write_text(json.dumps(document, indent=1))
    if config.validation.videos is not None:
        _write_sample_videos(worker, local / SAMPLES_DIR, step)


def _save_checkpoint(worker: Worker, state: TrainerState, metrics: dict[str, Any], steps: list[int]) -> None:
    """Save, upload through `ray.train.report`, then commit the directory with our manifest."""
    import ray.train
    import torch.distributed as dist

    name = checkpoint_name(state.step)
    uri = storage.join(worker.run_uri, name)
    tag = f"step-{state.step:08d}"
    zero = _zero_partitions(worker)
    with tempfile.TemporaryDirectory(prefix="pusa_ray_ckpt_", ignore_cleanup_errors=True) as scratch:
        local = Path(scratch)
        (local / DEEPSPEED_DIR / tag).mkdir(parents=True)
        worker.engine.save_checkpoint(str(local / DEEPSPEED_DIR), tag=tag, exclude_frozen_parameters=True)
        if worker.rank == 0:
            extra = {"tag": tag, "world_size": worker.world_size, "steps": steps, "zero": zero}
            _write_rank_zero_files(worker, local, state, extra)
            storage.delete_prefix(uri)  # debris of an attempt that died before Ray registered it
        written = {"rank": worker.rank, "host": socket.gethostname(), "pid": os.getpid()}
        files = describe_files(local, worker.rank)
        gathered: list[Any] = [None] * worker.world_size
        dist.all_gather_object(gathered, (written, files))  # also orders the delete before uploads
        ray.train.report(
            {**metrics, "checkpoint": name, "zero_partition_numel": zero["partition_numel"]},
            checkpoint=ray.train.Checkpoint.from_directory(scratch),
            checkpoint_dir_name=name,
            delete_local_checkpoint_after_upload=False,
        )
    dist.barrier()  # every rank's upload has returned
    if worker.rank == 0:
        commit_checkpoint(uri, state.step, gathered)


def _resume(worker: Worker) -> TrainerState:
    """Load the latest checkpoint in Ray's registry, if any, into the engine; return the state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainerState()
    uri = storage.join(worker.run_uri, PurePosixPath(checkpoint.path).name)
    with tempfile.TemporaryDirectory(prefix="pusa_ray_resume_") as scratch:
        local = Path(scratch)
        download_checkpoint(uri, worker.rank, local)
        saved = json.loads((local / STATE_FILE).read_text())
        if saved["world_size"] != worker.world_size:
            raise UserInputError(
                f"{uri} was written by {saved['world_size']} workers; ZeRO-2 optimizer partitions resume "
                f"only on as many (this run has {worker.world_size}): set scaling.workers accordingly"
            )
        # DeepSpeed's files are pickles: they are read only from this run's own storage.
        loaded, _ = worker.engine.load_checkpoint(
            str(local / DEEPSPEED_DIR), tag=saved["tag"], load_module_strict=False
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {uri}/{DEEPSPEED_DIR}/{saved['tag']}")
    fields = {field.name for field in dataclasses.fields(TrainerState)}
    state = TrainerState(**{key: value for key, value in saved.items() if key in fields})
    state.restarts += 1
    state.resumed_from = state.step
    if worker.rank == 0:
        logger.info("resumed from %s at step %d (restart %d)", uri, state.step, state.restarts)
    return state


def _write_sample_videos(worker: Worker, folder: Path, step: int) -> None:
    """Rank 0: fixed-seed videos from the model being trained (VAE and text encoder loaded once)."""
    from pusa_ray import video
    from pusa_ray.pipeline import SamplingSettings, generate

    settings = worker.config.validation.videos
    components = _sampling_components(worker)
    info = worker.dataset.info
    sampling = SamplingSettings(
        frames=settings.frames or info.frames,
        height=settings.height or info.height,
        width=settings.width or info.width,
        steps=settings.steps,
        guidance=settings.guidance,
        shift=settings.shift,
        seed=settings.seed,
    )
    module = worker.engine.module
    module.eval()
    try:
        for index, prompt in enumerate(settings.prompts):
            result = generate(components, prompt, [], sampling)
            path = folder / f"step-{step:08d}-{index}.mp4"
            video.write_mp4(path, video.tensor_to_frames(result.video), info.fps)
    finally:
        module.train()


def _sampling_components(worker: Worker) -> Any:
    from pusa_ray.config import get_preset
    from pusa_ray.models.loading import Components, load_codec, load_text_encoder

    base = worker.config.model.base
    if worker.sampling is None:
        tokenizer, encoder, length = load_text_encoder(base, worker.device)
        worker.sampling = (load_codec(base, worker.device), tokenizer, encoder, length)
    codec, tokenizer, encoder, length = worker.sampling
    spec = get_preset(base) if base in PRESETS else dataclasses.replace(PRESETS["wan2.1-t2v-1.3b"], name=base)
    spec = dataclasses.replace(spec, text_length=length)
    return Components(spec, worker.engine.module, codec, tokenizer, encoder, worker.device)


# ----------------------------------------------------------------------------------------------
# Worker: the loop


def _step_record(
    worker: Worker, state: TrainerState, local_loss: float, seconds: float, report: bool
) -> tuple[dict[str, Any], bool]:
    """The step's metrics (loss averaged over ranks) and whether rank 0 asks for a report now."""
    import torch.distributed as dist

    values = torch.tensor([local_loss, float(report)], dtype=torch.float64, device=worker.device)
    dist.all_reduce(values)  # one small collective per step: every rank learns rank 0's decision
    grad_norm = worker.engine.get_global_grad_norm()  # already global
    record = {
        "step": state.step,
        "loss": float(values[0]) / worker.world_size,
        "lr": float(worker.engine.get_lr()[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "step_time_s": seconds,
        "samples_per_s": worker.layout.samples_per_step / seconds if seconds > 0 else 0.0,
    }
    return record, bool(values[1] > 0)


def _progress_line(worker: Worker, record: dict[str, Any]) -> None:
    probe = f" probe {record['probe_loss']:.4f}" if "probe_loss" in record else ""
    grad_norm = f"{record['grad_norm']:.3g}" if record["grad_norm"] is not None else "-"
    logger.info(
        "step %d/%d loss %.4f%s lr %.3g grad_norm %s %.3f s/step %.2f samples/s",
        record["step"],
        worker.config.steps,
        record["loss"],
        probe,
        record["lr"],
        grad_norm,
        record["step_time_s"],
        record["samples_per_s"],
    )


def _report_metrics(worker: Worker, state: TrainerState, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest step's metrics, with every step since the previous report under `history`."""
    last_slot = state.step * worker.layout.samples_per_step - 1
    return {
        **history[-1],
        "epoch": worker.layout.epoch_of(last_slot),
        "restarts": state.restarts,
        "probe_loss": state.probe_loss,
        "history": history,
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The per-worker function: set up, resume, train to `steps`, checkpoint on the way.

    Every rank makes the same calls in the same order (reports and collectives are barriers):
    whether to report is rank 0's decision, shared through the per-step all-reduce.
    """
    import ray.train

    _log_setup()
    worker = _set_up(loop_config)
    config = worker.config
    state = _resume(worker)
    if state.initial_probe_loss is None:
        state.initial_probe_loss = state.probe_loss = _probe_loss(worker)
        ray.train.report({"step": 0, "probe_loss": state.probe_loss})
    history: list[dict[str, Any]] = []
    since_checkpoint: list[int] = []
    last_report = previous_end = time.monotonic()
    while state.step < config.steps:
        local_loss = _train_step(worker, state.step)
        # A step's time runs from the end of the previous one: reports, validation and checkpoint
        # saves count, so samples/s is the throughput the run really gets.
        now = time.monotonic()
        seconds, previous_end = now - previous_end, now
        state.step += 1
        state.train_seconds += seconds
        since_checkpoint.append(state.step)
        wants_report = worker.rank == 0 and time.monotonic() - last_report >= config.report_interval_s
        record, report_now = _step_record(worker, state, local_loss, seconds, wants_report)
        if state.step % config.validation.every == 0 or state.step == config.steps:
            state.probe_loss = record["probe_loss"] = _probe_loss(worker)
        history.append(record)
        if worker.rank == 0 and (state.step % config.log_every == 0 or "probe_loss" in record):
            _progress_line(worker, record)
        checkpoint_due = state.step % config.checkpoint.every == 0 or state.step == config.steps
        if checkpoint_due:
            _save_checkpoint(worker, state, _report_metrics(worker, state, history), since_checkpoint)
            since_checkpoint = []
        elif report_now or "probe_loss" in record:
            ray.train.report(_report_metrics(worker, state, history))
        if checkpoint_due or report_now or "probe_loss" in record:
            history, last_report = [], time.monotonic()
    return dataclasses.asdict(state) if worker.rank == 0 else None


# ----------------------------------------------------------------------------------------------
# Driver: running


def run(config: TrainConfig) -> TrainSummary:
    """Check, train on Ray (attaching to the cluster, `ray.init()`), export, summarise."""
    config = absolute_paths(config)
    checked = preflight(config)
    logger.info(
        "dataset %s: %d records (%d train, %d probe), latents %s; %d workers x batch %d x accumulation %d",
        config.latents,
        checked.records,
        checked.train_records,
        checked.probe_records,
        list(checked.latent_shape),
        config.scaling.workers,
        config.batch_size,
        config.gradient_accumulation,
    )
    if checked.resumes_from is not None:
        logger.info("run %s exists: resuming from step %d", run_uri(config), checked.resumes_from)
    import ray

    if not ray.is_initialized():
        ray.init()  # no arguments: attach to the cluster this job runs on (or start a local one)
    result = build_trainer(config).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {config.run.name!r} finished without a checkpoint")
    checkpoint_uri = storage.join(run_uri(config), PurePosixPath(result.checkpoint.path).name)
    state = read_state(checkpoint_uri)
    exported = export(config, checkpoint_uri, state, checked.architecture) if config.export else None
    return TrainSummary(
        steps=state["step"],
        samples_per_step=config.samples_per_step,
        train_seconds=state["train_seconds"],
        initial_probe_loss=state["initial_probe_loss"],
        probe_loss=state["probe_loss"],
        restarts=state["restarts"],
        checkpoint=checkpoint_uri,
        exported=exported,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pusa-ray train",
        description="Fine-tune the VTA DiT (LoRA or full) on latents: Ray Train + DeepSpeed ZeRO-2.",
    )
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/train.*.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 for a bad config or input (one line on stderr), 1 if training failed."""
    args = build_parser().parse_args(argv)
    _log_setup()
    try:
        config = load_config(args.config)
        summary = run(config)
    except UserInputError as error:
        if os.environ.get("PUSA_RAY_DEBUG"):
            raise
        print(f"pusa-ray train: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a failed run: Ray's TrainingFailedError names the worker error
        if os.environ.get("PUSA_RAY_DEBUG") or not type(error).__module__.startswith("ray."):
            raise
        print(f"pusa-ray train: training failed: {error}", file=sys.stderr)
        return 1
    print(summary.line(), flush=True)
    return 0
