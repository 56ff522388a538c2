"""The model being trained: the base DiT, LoRA injected with peft, and what a checkpoint exports.

Only the DiT is loaded for training (latents and prompt embeddings are precomputed), so a
worker never holds the VAE or the 11 GB text encoder. LoRA goes onto the diffusers transformer
inside `VTAWanTransformer` through diffusers' peft integration; its weights are exported raw
(peft's A and B under diffusers names) in our self-describing format, `pusa_ray.checkpoints.lora`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict

from pusa_ray.checkpoints.lora import save_adapter
from pusa_ray.config import PRESETS, get_preset
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import describe_model
from pusa_ray.models.loading import cast_parameters, load_transformer, model_parts
from pusa_ray.models.vta import VTAWanTransformer
from pusa_ray.training.config import TrainConfig
from pusa_ray.training.data import mix_seed

__all__ = [
    "ADAPTER_NAME",
    "adapter_weights",
    "base_architecture",
    "build_training_model",
    "check_lora_targets",
    "export_adapter",
    "inject_lora",
    "load_base_transformer",
    "trainable_parameters",
]

ADAPTER_NAME = "default"
ARCHITECTURE_KEYS = tuple(PRESETS["tiny"].architecture)


def base_architecture(base: str) -> dict[str, Any]:
    """The DiT shape of a preset or a diffusers-layout directory (local or s3://), read from configs."""
    try:
        described = describe_model(base)
    except UserInputError as error:
        raise UserInputError(
            f"base model {base!r}: {error}; an original Wan2.1 release can be converted with "
            "`pusa-ray convert SOURCE DESTINATION`"
        ) from None
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot read base model {base!r}: {error}") from None
    return dict(described.architecture)


def architecture_of(transformer: WanTransformer3DModel) -> dict[str, Any]:
    """The architecture dict (as `ModelSpec.architecture`) of a loaded DiT."""
    return {key: transformer.config[key] for key in ARCHITECTURE_KEYS}


def load_base_transformer(base: str, init: str, seed: int, dtype: torch.dtype) -> WanTransformer3DModel:
    """The base DiT on the CPU in `dtype`: pretrained weights, or fresh ones drawn from `seed`."""
    if init == "pretrained":
        return load_transformer(base, dtype, setting="model.base", hint=", or model.init to random")
    if base in PRESETS:
        config = get_preset(base).transformer
    else:
        config = WanTransformer3DModel.load_config(
            model_parts(base, ["transformer"]), subfolder="transformer"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed("init", seed))
        model = WanTransformer3DModel.from_config(config)
    return cast_parameters(model, dtype)


def check_lora_targets(targets: list[str]) -> None:
    """Every target names Linear layers of a Wan DiT (peft matches names by suffix); else UserInputError.

    Checked on a one-block DiT built on the meta device: module names are the same in every Wan DiT.
    """
    with torch.device("meta"):
        probe = WanTransformer3DModel(**{**get_preset("tiny").transformer, "num_layers": 1})
    linear = [name for name, module in probe.named_modules() if isinstance(module, torch.nn.Linear)]
    unknown = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in linear)]
    if unknown:
        known = sorted({name.removeprefix("blocks.0.") for name in linear})
        raise UserInputError(
            f"lora.target_modules {unknown} name no Linear layer of the DiT (known: {known})"
        )


def inject_lora(
    transformer: WanTransformer3DModel, rank: int, alpha: float, targets: list[str], dropout: float, seed: int
) -> None:
    """Freeze the DiT and add a zero-initialised LoRA (B = 0; A drawn from `seed`, same on every rank)."""
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        init_lora_weights=True,
    )
    check_lora_targets(list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed("lora", seed))
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)


def build_training_model(config: TrainConfig, dtype: torch.dtype = torch.float32) -> VTAWanTransformer:
    """The VTA model with its trainable parameters set up as `config` says, on the CPU."""
    transformer = load_base_transformer(config.model.base, config.model.init, config.run.seed, dtype)
    if config.method == "lora":
        lora = config.lora
        inject_lora(
            transformer, lora.rank, lora.alpha, list(lora.target_modules), lora.dropout, config.run.seed
        )
    else:
        transformer.requires_grad_(True)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return VTAWanTransformer(transformer)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def adapter_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Raw peft A/B under diffusers names (`blocks.0.attn1.to_q.lora_A.weight`), float32 on the CPU."""
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {key: value.detach().float().cpu() for key, value in state.items()}


def export_adapter(model: VTAWanTransformer, config: TrainConfig, path: str | Path, step: int) -> Path:
    """Write the model's LoRA in our format (scale alpha / rank in the metadata)."""
    transformer = model.transformer
    return save_adapter(
        path,
        adapter_weights(transformer),
        rank=config.lora.rank,
        lora_alpha=config.lora.alpha,
        base_model=config.model.base,
        architecture=architecture_of(transformer),
        target_modules=list(config.lora.target_modules),
        step=step,
    )


def export_transformer(model: VTAWanTransformer, path: str | Path, step: int) -> Path:
    """Write the full DiT in diffusers' layout (`config.json` + safetensors) with the step beside it."""
    path = Path(path)
    model.transformer.save_pretrained(path, safe_serialization=True)
    (path / "pusa_ray_step.json").write_text(json.dumps({"step": step}))
    return path
