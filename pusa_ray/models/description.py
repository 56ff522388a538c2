"""One description of a model, read from its config files and never from its weights: the DiT's
shape, the latent codec, the text encoder, a fingerprint of the encoders (what a latent dataset
depends on) and the default video. Used by the CLI's checks, preprocessing, training and serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pusa_ray import storage
from pusa_ray.conditioning import latents_for_frames
from pusa_ray.config import PRESETS, TEXT_LENGTH, ModelSpec
from pusa_ray.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What the manifest records about the model; read from configs only, never from weights."""

    id: str
    source: str
    architecture: dict[str, Any]
    vae: dict[str, Any]  # latents_mean, latents_std, z_dim, scale factors
    text_encoder: dict[str, Any]  # id, dim, layers, vocab size, max_length
    fingerprint: str  # changes when the VAE or the text encoder (or tokenizer) changes
    frames: int | None = None  # the model's default video (None: not recorded)
    height: int | None = None
    width: int | None = None

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
    """Describe a preset or a model directory (local or s3://) from its config files, never its
    weights: a UserInputError names what is missing (a directory in the original Wan2.1 release
    layout has none of diffusers' configs: convert it first)."""
    if model in PRESETS:
        return _describe_preset(PRESETS[model])
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
    saved = saved_spec(model)
    identity = {"files": files, "vae": vae, "text": text}
    length = int(saved.get("text_length", TEXT_LENGTH))
    described = _describe(saved.get("name") or model, model, transformer, vae, text, identity, length)
    return dataclasses.replace(described, **{key: saved.get(key) for key in ("frames", "height", "width")})


def _describe_preset(spec: ModelSpec) -> ModelDescription:
    """A preset from the table; an embedded one's identity is its package directory's files."""
    if spec.weights == "embedded":
        from pusa_ray.models.loading import embedded_dir

        described = describe_model(str(embedded_dir(spec)))
    else:
        identity = {"preset": spec.name, "seed": spec.seed, "vae": spec.vae, "text": spec.text_encoder}
        text = spec.text_encoder
        described = _describe(
            spec.name, spec.name, spec.transformer, spec.vae, text, identity, spec.text_length
        )
    video = {"frames": spec.frames, "height": spec.height, "width": spec.width}
    return dataclasses.replace(described, id=spec.name, source=spec.name, **video)


def saved_spec(model: str) -> dict[str, Any]:
    """A model directory's `pusa_ray.json` (name, sizes, text length), or {} without one."""
    try:
        return json.loads(storage.read_bytes(storage.join(model, "pusa_ray.json")))
    except FileNotFoundError:
        return {}


def sampling_defaults(model: str) -> dict[str, Any]:
    """What a request to `model` leaves out is sampled with (`ModelSpec.sampling_defaults`): a
    preset's own, or for a model directory those of the preset it was saved from (`pusa_ray.json`),
    else Wan2.1's, as the loader resolves them."""
    if model in PRESETS:
        return PRESETS[model].sampling_defaults()
    saved = saved_spec(model)
    base = PRESETS.get(saved.get("preset") or "", PRESETS["wan2.1-t2v-1.3b"])
    return {**base.sampling_defaults(), **({"fps": saved["fps"]} if "fps" in saved else {})}
