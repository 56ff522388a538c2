"""A finished run's result, without Ray: its summary, the published adapter (or model
directory), and configs made absolute for workers that run elsewhere."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from pusa_ray import storage
from pusa_ray.config import PRESETS
from pusa_ray.training.checkpoint import (
    ADAPTER_FILE,
    TRANSFORMER_DIR,
    local_or_s3,
)
from pusa_ray.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What the run did, read from its final checkpoint."""

    steps: int
    samples_per_step: int
    train_seconds: float
    initial_probe_loss: float | None
    probe_loss: float | None
    restarts: int
    checkpoint: str
    exported: str | None

    @property
    def samples_per_second(self) -> float:
        return self.steps * self.samples_per_step / self.train_seconds if self.train_seconds > 0 else 0.0

    def line(self) -> str:
        probe = (
            f"probe loss {self.initial_probe_loss:.4f} -> {self.probe_loss:.4f}; "
            if self.initial_probe_loss is not None and self.probe_loss is not None
            else ""
        )
        exported = f"; exported {self.exported}" if self.exported else ""
        return (
            f"train: {self.steps} steps, {self.samples_per_second:.2f} samples/s over "
            f"{self.train_seconds:.1f} s of training; {probe}{self.restarts} restarts; "
            f"checkpoint {self.checkpoint}{exported}"
        )


def export(
    config: TrainConfig, checkpoint_uri: str, state: dict[str, Any], architecture: dict[str, Any]
) -> str:
    """Publish the final adapter (or model directory) under the export prefix; returns its URI."""
    if config.export is None:
        raise ValueError("export() needs config.export")
    with tempfile.TemporaryDirectory(prefix="pusa_ray_export_") as scratch:
        if config.method == "lora":
            from pusa_ray.checkpoints.adapters import publish_adapter

            local = storage.download_file(
                storage.join(checkpoint_uri, ADAPTER_FILE), Path(scratch) / ADAPTER_FILE
            )
            metadata = {
                "base_model": config.model.base,
                "architecture": architecture,
                "rank": config.lora.rank,
                "lora_alpha": config.lora.alpha,
                "step": state["step"],
                "run": config.run.name,
                "checkpoint": checkpoint_uri,
            }
            return publish_adapter(local, config.export.prefix, config.export.name, metadata)
        return _export_model_dir(config, checkpoint_uri, Path(scratch), state["step"])


def _export_model_dir(config: TrainConfig, checkpoint_uri: str, scratch: Path, step: int) -> str:
    """The base's VAE, text encoder and tokenizer with the trained DiT, as a committed model directory."""
    from diffusers import WanTransformer3DModel

    from pusa_ray.models.loading import load_components, save_model_dir
    from pusa_ray.models.vta import VTAWanTransformer

    for relative in storage.list_files(storage.join(checkpoint_uri, TRANSFORMER_DIR)):
        source = storage.join(checkpoint_uri, TRANSFORMER_DIR, relative)
        storage.download_file(source, scratch / TRANSFORMER_DIR / relative)
    components = load_components(config.model.base, device="cpu", dtype=torch.float32)
    transformer = WanTransformer3DModel.from_pretrained(scratch / TRANSFORMER_DIR, torch_dtype=torch.float32)
    components.model = VTAWanTransformer(transformer)
    components.spec = dataclasses.replace(components.spec, name=config.export.name)
    destination = storage.join(config.export.prefix, config.export.name)
    return save_model_dir(components, destination)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute against the driver's directory: Ray Train workers run elsewhere."""

    def local(value: str) -> str:
        return value if value.startswith("s3://") else local_or_s3(value)

    base = config.model.base
    model = config.model
    if base not in PRESETS and not base.startswith("s3://"):
        model = model.model_copy(update={"base": local(base)})
    update: dict[str, Any] = {
        "latents": local(config.latents),
        "model": model,
        "run": config.run.model_copy(update={"storage_path": local(config.run.storage_path)}),
    }
    if config.export is not None:
        update["export"] = config.export.model_copy(update={"prefix": local(config.export.prefix)})
    return config.model_copy(update=update)
