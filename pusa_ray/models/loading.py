"""Build or load the parts of a model: VTA DiT, latent codec, tokenizer and text encoder.

`--model` is a preset name (the `tiny` presets are built in code from their seed) or a model
directory, local or s3:// (committed): diffusers' Wan layout (`transformer/ vae/ text_encoder/
tokenizer/ scheduler/ model_index.json`, as published and as `save_model_dir` writes) or the
original Wan2.1 release layout (see `pusa_ray.checkpoints.wan_original`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from pusa_ray.config import PRESETS, ModelSpec, get_preset
from pusa_ray.errors import UserInputError
from pusa_ray.models.codec import WanCodec
from pusa_ray.models.text import byte_tokenizer
from pusa_ray.models.vta import VTAWanTransformer

SPEC_FILE = "pusa_ray.json"  # our defaults (frames, size, fps, preset) beside diffusers' files


@dataclass
class Components:
    """A loaded model: what the pipeline needs to turn prompts and media into video."""

    spec: ModelSpec
    model: VTAWanTransformer
    codec: WanCodec
    tokenizer: PreTrainedTokenizerBase
    text_encoder: torch.nn.Module
    device: torch.device

    @property
    def model_id(self) -> str:
        return self.spec.name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the Wan/Pusa recipe), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_seeded(spec: ModelSpec) -> tuple[WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel]:
    """Randomly initialised parts from the preset's seed; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = WanTransformer3DModel(**spec.transformer)
        vae = AutoencoderKLWan(**spec.vae)
        text_encoder = UMT5EncoderModel(UMT5Config(**spec.text_encoder))
    return transformer, vae, text_encoder


def describe_model(model: str) -> dict[str, Any]:
    """A model's DiT shape and video defaults without loading weights (for services that only route).

    Presets come from the table; directories (local or s3://) from `transformer/config.json` and our
    spec file. Unknown parts are None.
    """
    if model in PRESETS:
        spec = PRESETS[model]
        return {
            "architecture": spec.architecture,
            "frames": spec.frames,
            "height": spec.height,
            "width": spec.width,
        }

    def read(relative: str) -> dict | None:
        try:
            if model.startswith("s3://"):
                from pusa_ray import storage

                return json.loads(storage.read_bytes(storage.join(model, relative)))
            return json.loads((Path(model) / relative).read_text())
        except (FileNotFoundError, ValueError):
            return None

    config = read("transformer/config.json")
    keys = PRESETS["tiny"].architecture.keys()
    architecture = {key: config[key] for key in keys if key in config} if config else None
    saved = read(SPEC_FILE) or {}
    return {"architecture": architecture, **{key: saved.get(key) for key in ("frames", "height", "width")}}


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters to `dtype`, keeping the model's declared fp32 modules in float32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        target = torch.float32 if keep.intersection(name.split(".")) else dtype
        if parameter.is_floating_point() and parameter.dtype != target:
            parameter.data = parameter.data.to(target)
    return model


def load_components(
    model: str = "tiny", device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Components:
    """Load a preset or a model directory onto `device` (DiT and text encoder in `dtype`, VAE in float32)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if model in PRESETS:
        spec = get_preset(model)
        if spec.weights != "seeded":
            raise UserInputError(
                f"preset {model!r} has no embedded weights: pass --model with a model directory "
                "(diffusers layout) holding its weights"
            )
        transformer, vae, text_encoder = build_seeded(spec)
        tokenizer = byte_tokenizer(spec.text_length)
    elif model.startswith("s3://"):
        from pusa_ray import storage

        local = storage.cached_dir(model)  # committed directories only, sizes verified
        spec, transformer, vae, text_encoder, tokenizer = _load_directory(local, dtype, name=model)
    elif Path(model).is_dir():
        spec, transformer, vae, text_encoder, tokenizer = _load_directory(Path(model), dtype)
    else:
        known = ", ".join(sorted(PRESETS))
        raise UserInputError(f"--model {model!r} is neither a preset ({known}) nor a model directory")
    transformer = cast_parameters(transformer.to(device), dtype).eval().requires_grad_(False)
    text_encoder = cast_parameters(text_encoder.to(device), dtype).eval().requires_grad_(False)
    vae = cast_parameters(vae.to(device), torch.float32).eval().requires_grad_(False)
    return Components(spec, VTAWanTransformer(transformer), WanCodec(vae), tokenizer, text_encoder, device)


def _load_directory(
    path: Path, dtype: torch.dtype, name: str | None = None
) -> tuple[ModelSpec, Any, Any, Any, Any]:
    from pusa_ray.checkpoints.wan_original import is_original_release, load_original_release

    if is_original_release(path):  # Wan2.1's own release layout, converted while streaming
        transformer, vae, text_encoder, tokenizer = load_original_release(path, dtype=dtype)
        configs = dict(transformer.config), dict(vae.config), text_encoder.config.to_dict()
        return _directory_spec(path, *configs, name), transformer, vae, text_encoder, tokenizer
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise UserInputError(
                f"model directory {str(path)!r} has no {part}/ folder (diffusers Wan layout) "
                "and is not an original Wan2.1 release (config.json with _class_name WanModel)"
            )
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    spec = _directory_spec(
        path, dict(transformer.config), dict(vae.config), text_encoder.config.to_dict(), name
    )
    return spec, transformer, vae, text_encoder, tokenizer


def _directory_spec(
    path: Path, transformer: dict, vae: dict, text_encoder: dict, name: str | None = None
) -> ModelSpec:
    """Defaults for a directory: from our spec file if present, else from the matching Wan preset."""
    saved = json.loads((path / SPEC_FILE).read_text()) if (path / SPEC_FILE).is_file() else {}
    base = PRESETS.get(saved.get("preset", ""))
    if base is None:
        matching = [p for p in PRESETS.values() if p.architecture.items() <= transformer.items()]
        base = matching[0] if matching else PRESETS["wan2.1-t2v-1.3b"]
    overrides = {key: saved[key] for key in ("frames", "height", "width", "fps") if key in saved}
    return dataclasses.replace(
        base,
        name=saved.get("name", name or str(path)),
        transformer={key: transformer[key] for key in base.transformer if key in transformer},
        vae={key: vae[key] for key in base.vae if key in vae},
        text_encoder={key: text_encoder[key] for key in base.text_encoder if key in text_encoder},
        weights="directory",
        **overrides,
    )


def apply_adapters(components: Components, adapters: list[tuple[str, float]], merge: bool = True) -> None:
    """Load LoRA adapters (paths or URIs, each with its alpha) onto the DiT, merged or through peft."""
    from pusa_ray.checkpoints.lora import attach_adapters, check_compatible, load_adapter, merge_adapter

    transformer = components.model.transformer
    loaded = [(load_adapter(source), alpha) for source, alpha in adapters]
    for adapter, _ in loaded:
        check_compatible(adapter, transformer, components.spec.architecture)
    if merge:
        for adapter, alpha in loaded:
            merge_adapter(transformer, adapter, alpha)
    else:
        attach_adapters(
            transformer, [(f"adapter_{i}", adapter, alpha) for i, (adapter, alpha) in enumerate(loaded)]
        )


def save_model_dir(components: Components, path: str | Path) -> str:
    """Write a model in diffusers' Wan layout (what `load_components` and `WanPipeline` read).

    An s3:// destination is written locally first, then uploaded and committed (manifest last).
    """
    if str(path).startswith("s3://"):
        import tempfile

        from pusa_ray import storage

        with tempfile.TemporaryDirectory() as local:
            save_model_dir(components, local)
            storage.upload_dir(
                local, str(path), commit=True, extra={"kind": "model", "name": components.spec.name}
            )
        return str(path)
    path = Path(path)
    spec = components.spec
    pipeline = WanPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.codec.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.defaults.get("shift", 5.0)),
        transformer=components.model.transformer,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    saved = {"name": spec.name, "preset": spec.name if spec.name in PRESETS else None}
    saved.update({key: getattr(spec, key) for key in ("frames", "height", "width", "fps")})
    (path / SPEC_FILE).write_text(json.dumps(saved, indent=2))
    return str(path)
