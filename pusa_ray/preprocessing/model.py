"""The model as preprocessing needs it: described from its config files on the driver, and
loaded part by part (the codec, the text encoder) on the actors."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pusa_ray import storage
from pusa_ray.conditioning import latents_for_frames
from pusa_ray.config import (
    PRESETS,
    TEXT_LENGTH,
    ModelSpec,
    get_preset,
)
from pusa_ray.errors import UserInputError
from pusa_ray.storage import CorruptDataError

# ----------------------------------------------------------------------------------------------
# The model, described without loading weights (driver) and loaded part by part (actors)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What the manifest records about the model; read from configs only, never from weights."""

    id: str
    source: str
    architecture: dict[str, Any]
    vae: dict[str, Any]  # latents_mean, latents_std, z_dim, scale factors
    text_encoder: dict[str, Any]  # id, dim, layers, vocab size, max_length
    fingerprint: str  # changes when the VAE or the text encoder (or tokenizer) changes

    def check_video(self, frames: int, height: int, width: int) -> None:
        """The codec's frame rule and the sizes it and the DiT's 2x2 patches divide; else UserInputError."""
        try:
            latents_for_frames(frames, self.vae["scale_factor_temporal"])
        except UserInputError as error:
            raise UserInputError(f"frames: {error}") from None
        multiple = 2 * self.vae["scale_factor_spatial"]  # every Wan DiT patches 2x2 latents
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise UserInputError(
                    f"{name}: must be a multiple of {multiple} for {self.id} "
                    f"(codec {self.vae['scale_factor_spatial']}x, patch 2), got {value}"
                )

    def latent_shape(self, frames: int, height: int, width: int) -> list[int]:
        """[C, F_lat, h, w] for a clip of frames x height x width pixels."""
        temporal, spatial = self.vae["scale_factor_temporal"], self.vae["scale_factor_spatial"]
        return [self.vae["z_dim"], (frames - 1) // temporal + 1, height // spatial, width // spatial]


def short_digest(value: Any, length: int = 32) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def _vae_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' AutoencoderKLWan defaults updated with ``overrides`` (a config.json or preset).

    A space-to-depth codec's config is complete as it is.
    """
    from diffusers import AutoencoderKLWan

    from pusa_ray.models.codec import is_space_to_depth

    if is_space_to_depth(dict(overrides)):
        return dict(overrides)
    parameters = inspect.signature(AutoencoderKLWan.__init__).parameters.values()
    config = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    config.update({key: value for key, value in overrides.items() if not key.startswith("_")})
    return config


def _architecture_keys() -> tuple[str, ...]:
    return tuple(PRESETS["tiny"].architecture)


def _seeded_preset(name: str) -> ModelSpec:
    spec = get_preset(name)
    if spec.weights != "seeded":
        raise UserInputError(
            f"preset {name!r} has no embedded weights: set model to a model directory (diffusers "
            "layout, local or s3://) holding its weights"
        )
    return spec


def _describe(
    model_id: str,
    source: str,
    transformer: Mapping,
    vae: Mapping,
    text: Mapping,
    fingerprint: Any,
    length: int,
) -> ModelDescription:
    vae = _vae_config(vae)
    return ModelDescription(
        id=model_id,
        source=source,
        architecture={key: transformer[key] for key in _architecture_keys()},
        vae={
            "latents_mean": [float(v) for v in vae["latents_mean"]],
            "latents_std": [float(v) for v in vae["latents_std"]],
            "z_dim": int(vae["z_dim"]),
            "scale_factor_spatial": int(vae["scale_factor_spatial"]),
            "scale_factor_temporal": int(vae["scale_factor_temporal"]),
        },
        text_encoder={
            "id": f"{model_id}/text_encoder",
            "dim": int(text["d_model"]),
            "num_layers": int(text["num_layers"]),
            "vocab_size": int(text["vocab_size"]),
            "max_length": length,
        },
        fingerprint=short_digest(fingerprint),
    )


def describe_model(model: str) -> ModelDescription:
    """Describe a preset or a model directory (local or s3://) from its config files."""
    from pusa_ray.models.loading import model_source

    if model in PRESETS and PRESETS[model].weights == "embedded":  # a directory in the package
        return dataclasses.replace(describe_model(model_source(model)), id=model, source=model)
    if model in PRESETS:
        spec = _seeded_preset(model)
        identity = {"preset": model, "seed": spec.seed, "vae": spec.vae, "text": spec.text_encoder}
        return _describe(
            spec.name, model, spec.transformer, spec.vae, spec.text_encoder, identity, spec.text_length
        )
    if model.startswith("s3://"):
        manifest = storage.read_manifest(model)  # committed model directories only
        files = [
            (entry.path, entry.size, entry.sha256)
            for entry in manifest.files
            if entry.path.split("/", 1)[0] in ("vae", "text_encoder", "tokenizer")
        ]
    elif Path(model).is_dir():
        root = Path(model)
        files = [
            (path.relative_to(root).as_posix(), path.stat().st_size)
            for part in ("vae", "text_encoder", "tokenizer")
            for path in sorted((root / part).rglob("*"))
            if path.is_file()
        ]
    else:
        known = ", ".join(sorted(PRESETS))
        raise UserInputError(f"model {model!r} is neither a preset ({known}) nor a model directory")

    def config(part: str) -> dict[str, Any]:
        uri = storage.join(model, part)
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            raise UserInputError(f"model directory {model!r} has no {part} (diffusers Wan layout)") from None

    transformer, vae, text = (config(f"{p}/config.json") for p in ("transformer", "vae", "text_encoder"))
    saved = _saved_spec(model)
    identity = {"files": files, "vae": vae, "text": text}
    length = int(saved.get("text_length", TEXT_LENGTH))
    return _describe(saved.get("name") or model, model, transformer, vae, text, identity, length)


def _saved_spec(model: str) -> dict[str, Any]:
    """A model directory's `pusa_ray.json` (name, sizes, text length), or {} without one."""
    try:
        return json.loads(storage.read_bytes(storage.join(model, "pusa_ray.json")))
    except FileNotFoundError:
        return {}


def _model_root(model: str, parts: Sequence[str]) -> Path:
    """A local directory holding ``parts`` of the model directory ``model``.

    A local directory is used in place. From a committed s3:// directory only the files under
    ``parts`` are fetched (a VAE actor never downloads the 14B DiT), into the download cache,
    keyed by the manifest, and checked for size.
    """
    if not model.startswith("s3://"):
        return Path(model)
    manifest = storage.read_manifest(model)
    root = (
        storage.cache_root()
        / "model-parts"
        / short_digest(model)
        / short_digest(manifest.to_json().decode(), 16)
    )
    for part in parts:
        marker = root / f".{part}.complete"
        if marker.is_file():
            continue
        for entry in manifest.files:
            if entry.path.split("/", 1)[0] != part:
                continue
            local = root / entry.path
            if not (local.is_file() and local.stat().st_size == entry.size):
                storage.download_file(storage.join(model, entry.path), local)
            if local.stat().st_size != entry.size:
                raise CorruptDataError(
                    storage.join(model, entry.path), "downloaded size differs from manifest"
                )
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return root


def load_codec(model: str, device: torch.device) -> Any:
    """The model's VAE only, in float32 on ``device``, as `load_components` would load it."""
    from diffusers import AutoencoderKLWan

    from pusa_ray.models.codec import is_space_to_depth, make_codec
    from pusa_ray.models.loading import build_seeded, cast_parameters, model_source

    model = model_source(model)
    if model in PRESETS:
        _, vae, _ = build_seeded(_seeded_preset(model))
    else:
        root = _model_root(model, ["vae"])
        config = json.loads((root / "vae" / "config.json").read_text())
        if is_space_to_depth(config):
            return make_codec(config)
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32)
    if isinstance(vae, torch.nn.Module):
        vae = cast_parameters(vae.to(device), torch.float32).eval().requires_grad_(False)
    return make_codec(vae)


def load_text_encoder(model: str, device: torch.device) -> tuple[Any, torch.nn.Module, int]:
    """(tokenizer, text encoder, max length): as `load_components` loads them, nothing else."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from pusa_ray.models.loading import (
        build_seeded,
        cast_parameters,
        default_dtype,
        model_source,
        preset_tokenizer,
    )

    model = model_source(model)
    if model in PRESETS:
        spec = _seeded_preset(model)
        _, _, encoder = build_seeded(spec)
        tokenizer, length = preset_tokenizer(spec), spec.text_length
    else:
        root = _model_root(model, ["text_encoder", "tokenizer"])
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=default_dtype(device))
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        length = int(_saved_spec(model).get("text_length", TEXT_LENGTH))
    encoder = cast_parameters(encoder.to(device), default_dtype(device)).eval().requires_grad_(False)
    return tokenizer, encoder, length
