"""The training job's typed configuration (YAML -> pydantic, unknown keys are errors).

The same model validates the YAML on the driver and, as a plain dict, again on every Ray worker
(`TrainConfig.model_validate(config.model_dump(mode="json"))` round-trips). Defaults follow the
Pusa V1 recipe: LoRA rank 512, alpha 512 on every attention projection and both FFN linears,
AdamW at lr 1e-5, independent per-frame timesteps (`p_async = 1`), batch 1 per worker.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from pusa_ray import config
from pusa_ray.checkpoints.lora import PUSA_TARGET_MODULES
from pusa_ray.config import PlainName, StorageUri, StrictModel, validate_config
from pusa_ray.timesteps import sample_training_sigmas

__all__ = [
    "CheckpointSettings",
    "ExportSettings",
    "LoraSettings",
    "ModelSettings",
    "OptimizerSettings",
    "RunSettings",
    "ScalingSettings",
    "SampleVideoSettings",
    "TimestepSettings",
    "TrainConfig",
    "ValidationSettings",
    "load_config",
    "parse_config",
]


class ModelSettings(StrictModel):
    """The base model: a preset name, a model directory (diffusers Wan layout) or an s3:// URI."""

    base: str = "tiny"
    init: Literal["pretrained", "random"] = Field(
        default="pretrained",
        description="random: fresh weights from the run seed, to train a small base from scratch",
    )


class LoraSettings(StrictModel):
    """The adapter: peft LoRA on the diffusers DiT; scale = alpha / rank (the paper: 512 / 512)."""

    rank: int = Field(default=512, ge=1)
    alpha: float = Field(default=512.0, gt=0)
    target_modules: tuple[str, ...] = Field(default=tuple(PUSA_TARGET_MODULES), min_length=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class OptimizerSettings(StrictModel):
    """torch AdamW (DeepSpeed's client optimizer) with a linear warm-up, then a constant rate."""

    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global grad norm; null: none")
    offload: bool = Field(default=False, description="ZeRO-Offload: optimizer state in CPU memory")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class TimestepSettings(StrictModel):
    """Training-time per-frame timesteps (see `pusa_ray.timesteps.sample_training_sigmas`)."""

    p_async: float = Field(default=1.0, ge=0.0, le=1.0, description="1: independent per frame (Pusa)")
    mode: Literal["uniform", "shifted-grid"] = "uniform"
    shift: float = Field(default=5.0, gt=0, description="shifted-grid only")
    p_condition: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of samples laid out as a conditioned generation"
    )
    condition_shift: float = Field(default=1.0, gt=0, description="shift of a conditioned layout's sigma")
    p_lead: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of samples laid out as the lead schedule's first half"
    )

    @model_validator(mode="after")
    def _grid_is_already_shifted(self) -> TimestepSettings:
        if self.mode == "shifted-grid" and self.condition_shift != 1.0:
            raise ValueError("condition_shift must be 1 with mode shifted-grid (its grid is already shifted)")
        return self

    def draw(self, batch: int, frames: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [B, F], loss weights [B, F]) as these settings say."""
        return sample_training_sigmas(
            batch,
            frames,
            self.p_async,
            generator,
            self.mode,
            self.shift,
            self.p_condition,
            self.condition_shift,
            self.p_lead,
        )


class SampleVideoSettings(StrictModel):
    """Fixed-seed sample videos written into each checkpoint (rank 0)."""

    prompts: tuple[str, ...] = Field(min_length=1)
    frames: int | None = Field(default=None, description="default: the dataset's")
    height: int | None = None
    width: int | None = None
    steps: int = Field(default=10, ge=1)
    guidance: float = Field(default=3.0, ge=0)
    shift: float = Field(default=5.0, gt=0)
    seed: int = 0


class ValidationSettings(StrictModel):
    """A fixed probe set (records, noise and per-frame timesteps from `seed`) and its loss."""

    every: int = Field(default=50, ge=1, description="steps between probe losses")
    probe_samples: int = Field(default=8, ge=1)
    hold_out: bool = Field(default=True, description="keep the probe records out of training")
    seed: int = 1234
    videos: SampleVideoSettings | None = None


class ScalingSettings(StrictModel):
    """Ray Train workers: one DeepSpeed rank each."""

    workers: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0.0, ge=0, description="0: CPU workers")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker asks for besides CPU/GPU, e.g. {train_node: 0.125}: "
        "only nodes that advertise them (cluster.yaml's gpu_train) take training ranks",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r} is not a custom resource: set cpus_per_worker / gpus_per_worker")
            if amount <= 0:
                raise ValueError(f"{name!r}: the amount must be > 0, got {amount}")
        return value


class CheckpointSettings(StrictModel):
    every: int = Field(default=100, ge=1, description="steps between checkpoints (and at the end)")
    num_to_keep: int | None = Field(default=3, ge=1, description="null: keep all")


class RunSettings(StrictModel):
    """Where the run lives: `{storage_path}/{name}/`. Same name + storage path = resume."""

    name: PlainName
    storage_path: StorageUri
    max_failures: int = Field(default=3, ge=-1, description="worker-group restarts; -1: unlimited")
    seed: int = 0


class ExportSettings(StrictModel):
    """The final result at a stable URI: `{prefix}/{name}/adapter.safetensors` (LoRA, what
    `pusa-ray generate --lora` and the Serve app read) or a model directory `{prefix}/{name}/`."""

    prefix: StorageUri
    name: PlainName


class TrainConfig(StrictModel):
    """The training job's YAML. See jobs/configs/train.*.yaml and docs/training.md."""

    latents: StorageUri = Field(description="the committed latent dataset (preprocessing output)")
    model: ModelSettings = ModelSettings()
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    steps: int = Field(default=900, ge=1, description="optimizer steps")
    batch_size: int = Field(default=1, ge=1, description="clips per worker per micro-step")
    gradient_accumulation: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPUs, fp32 on CPUs (bf16 is used on GPUs only)"
    )
    timesteps: TimestepSettings = TimestepSettings()
    caption_dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="probability a clip trains on the empty prompt instead of its caption (what classifier-"
        "free guidance needs of a base trained from scratch; fine-tunes of a guided base keep 0). Each "
        "rank then loads the base's text encoder once to embed the empty prompt",
    )
    validation: ValidationSettings = ValidationSettings()
    scaling: ScalingSettings = ScalingSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    run: RunSettings
    export: ExportSettings | None = None
    log_every: int = Field(default=1, ge=1, description="steps between progress lines in the log")
    report_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="seconds between ray.train.report calls; each carries every step's metrics since "
        "the last one (Ray Train's controller takes one report per worker every 2 s, so reporting "
        "each step would stall fast steps)",
    )

    @model_validator(mode="after")
    def _lora_only_with_lora(self) -> TrainConfig:
        if self.method == "full" and self.lora != LoraSettings():
            raise ValueError("lora settings differ from the defaults but method is 'full' (remove them)")
        return self

    @property
    def samples_per_step(self) -> int:
        """Clips per optimizer step over all workers."""
        return self.scaling.workers * self.batch_size * self.gradient_accumulation

    def plain(self) -> dict[str, Any]:
        """The config as plain JSON types: what crosses to the Ray workers."""
        return self.model_dump(mode="json")


def parse_config(data: Any, source: str = "config") -> TrainConfig:
    """Validate a config mapping; every problem is listed in one UserInputError."""
    return validate_config(TrainConfig, data, source, "train")


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate a YAML config file."""
    return config.load_config(TrainConfig, path, "train")
