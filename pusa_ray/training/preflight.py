"""The training job's checks before any worker starts (no Ray): the model, the dataset and its
split, the export, and whether an existing run of the same name can be resumed."""

from __future__ import annotations

import dataclasses
from typing import Any

from pusa_ray import storage
from pusa_ray.config import PRESETS
from pusa_ray.data.latents import LatentDataset
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import parts_source
from pusa_ray.training.checkpoint import latest_checkpoint, read_state, run_uri
from pusa_ray.training.config import TimestepSettings, TrainConfig
from pusa_ray.training.data import (
    split_records,
)
from pusa_ray.training.model import (
    base_architecture,
    check_lora_targets,
)


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What the driver learnt about the data and the model, without loading weights."""

    architecture: dict[str, Any]
    records: int
    train_records: int
    probe_records: int
    latent_shape: tuple[int, ...]
    resumes_from: int | None  # the step an existing run continues from


def _has_codec(base: str) -> bool:
    """Whether the base brings a VAE and text encoder (a seeded or embedded preset, a model directory)."""
    return base not in PRESETS or PRESETS[base].weights in ("seeded", "embedded")


def preflight(config: TrainConfig) -> Preflight:
    """Every check that needs no worker: model, dataset, split, export. Raises UserInputError."""
    base, init = config.model.base, config.model.init
    if init == "pretrained":  # its weights are installed (or built in code) and it is a base
        parts_source(base, "model.base", ", or model.init to random")
    architecture = base_architecture(base)
    if config.method == "lora":
        check_lora_targets(list(config.lora.target_modules))
    try:
        dataset = LatentDataset(config.latents)
    except storage.UncommittedError:
        raise UserInputError(
            f"latent dataset {config.latents!r} does not exist or is not committed (no _MANIFEST.json): "
            "run the preprocessing job first"
        ) from None
    dataset.check_architecture(architecture)
    train, probe = split_records(
        len(dataset), config.validation.probe_samples, config.validation.hold_out, config.validation.seed
    )
    if not train:
        raise UserInputError(
            f"latent dataset {config.latents!r} has {len(dataset)} records; holding out "
            f"{len(probe)} for validation leaves none to train on (validation.hold_out: false, or "
            "fewer validation.probe_samples)"
        )
    if config.validation.videos is not None and not _has_codec(base):
        raise UserInputError(
            f"validation.videos needs a base model with a VAE and text encoder; {base!r} has none"
        )
    if config.export is not None and config.method == "full" and not _has_codec(base):
        raise UserInputError(
            f"exporting a fully fine-tuned model needs the VAE and text encoder of its base; {base!r} "
            "has none (use a model directory as model.base)"
        )
    resuming = check_resumable(config)
    return Preflight(architecture, len(dataset), len(train), len(probe), dataset.info.latent_shape, resuming)


def check_resumable(config: TrainConfig) -> int | None:
    """The step an existing run resumes from; UserInputError if its checkpoint cannot be resumed."""
    checkpoint = latest_checkpoint(config)
    if checkpoint is None:
        return None
    try:
        saved = read_state(checkpoint)
    except FileNotFoundError:
        raise UserInputError(
            f"run {run_uri(config)!r}: its latest checkpoint {checkpoint!r} is gone"
        ) from None
    before, now = saved["config"], config.plain()
    if saved["world_size"] != config.scaling.workers:
        raise UserInputError(
            f"run {run_uri(config)!r} resumes from {checkpoint}, written by {saved['world_size']} workers; "
            f"ZeRO-2 partitions resume only on as many (scaling.workers is {config.scaling.workers})"
        )
    # What makes it another run: the model trained and how its timesteps are drawn (a resumed run
    # that silently trained on another layout, or only re-exported an old one, would look the same).
    # Saved timesteps are read with today's defaults, so keys added since compare as their default.
    timesteps = TimestepSettings.model_validate(before.get("timesteps", {}))
    before = {**before, "timesteps": timesteps.model_dump(mode="json")}
    for key in ("method", "lora", "model", "timesteps"):
        if before.get(key) != now.get(key):
            raise UserInputError(
                f"run {run_uri(config)!r} was started with {key} {before.get(key)!r}, the config says "
                f"{now.get(key)!r}: use another run.name for a new run"
            )
    return int(saved["step"])
