"""Model presets and the typed settings shared by every entry point.

A preset names an architecture (DiT, latent codec, text encoder) and its defaults. `tiny` is built
in code from a fixed seed so it runs anywhere in seconds; the Wan presets describe the public
architectures and take their weights from a model directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from pusa_ray.errors import UserInputError

# English translation of Wan2.1's default negative prompt, as used by Pusa's public scripts.
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

TEXT_LENGTH = 512  # Wan pads every prompt to 512 tokens.
# What a preset's `defaults` fall back to (Pusa's sampling defaults).
SAMPLING_DEFAULTS: dict[str, Any] = {
    "steps": 10,
    "guidance": 3.0,
    "shift": 5.0,
    "schedule": "sync",
    "cache": "off",  # step caching (`pusa_ray.step_cache`); a preset may default it on
}
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model family: configs of its parts and its defaults."""

    name: str
    transformer: dict[str, Any]  # WanTransformer3DModel config
    vae: dict[str, Any]  # AutoencoderKLWan config, or a SpaceToDepthCodec config (its `_class_name`)
    text_encoder: dict[str, Any]  # transformers UMT5Config
    frames: int
    height: int
    width: int
    fps: int
    # "seeded": built in code from `seed` (no files); "directory": weights come from --model DIR;
    # "embedded": a model directory shipped inside the package (`pusa_ray/weights/<embedded>`).
    weights: str = "directory"
    seed: int = 0
    text_length: int = TEXT_LENGTH
    defaults: dict[str, Any] = field(default_factory=dict)  # steps, guidance, shift; schedule (a name)
    embedded: str | None = None
    # LoRA adapters merged on load, (path relative to the embedded directory, alpha).
    adapters: tuple[tuple[str, float], ...] = ()
    # A word-level tokenizer over these words (None: the byte-level one of the tiny presets).
    vocabulary: tuple[str, ...] | None = None
    # What classifier-free guidance pushes away from when a request names no negative prompt.
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    def sampling_defaults(self) -> dict[str, Any]:
        """steps, guidance, shift, schedule, cache, fps and the negative prompt a request leaves out."""
        values = {**SAMPLING_DEFAULTS, **self.defaults}
        return {
            "steps": int(values["steps"]),
            "guidance": float(values["guidance"]),
            "shift": float(values["shift"]),
            "schedule": str(values["schedule"]),
            "cache": str(values["cache"]),
            "fps": self.fps,
            "negative_prompt": self.negative_prompt,
        }

    @property
    def architecture(self) -> dict[str, Any]:
        """The DiT shape that adapters and checkpoints must match."""
        keys = (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "ffn_dim",
            "in_channels",
            "text_dim",
        )
        return {key: self.transformer[key] for key in keys}


_WAN_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

_UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def _wan_dit(heads: int, ffn_dim: int, layers: int) -> dict[str, Any]:
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": heads,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": ffn_dim,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


TINY = ModelSpec(
    name="tiny",
    transformer={
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 32,
    },
    vae={
        "base_dim": 3,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    text_encoder={
        "vocab_size": 259,
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
    frames=9,
    height=64,
    width=64,
    fps=16,
    weights="seeded",
    seed=0,
    defaults={"steps": 4, "guidance": 3.0, "shift": 5.0},
)

# The tiny codec and text encoder under a wider DiT (4 layers, dim 512, ~25M parameters):
# forwards that take tens of milliseconds, for benchmarks and load tests on a CPU.
TINY_WIDE = dataclasses.replace(
    TINY,
    name="tiny-wide",
    transformer={
        **TINY.transformer,
        "num_attention_heads": 4,
        "attention_head_dim": 128,
        "ffn_dim": 1536,
        "num_layers": 4,
    },
    frames=33,
    height=128,
    width=128,
    seed=1,
    defaults={"steps": 10, "guidance": 3.0, "shift": 5.0},
)

# pusa-mini: a 4-layer, 128-wide Wan DiT (1.3M parameters) trained on procedural shape videos
# (`pusa_ray.mini.shapes`) at 32x32, 5 frames, over a fixed 4x4 space-to-depth codec (48 channels,
# one latent per frame) and a small UMT5 encoder with a word-level tokenizer. Its patch is one latent
# cell (1x1: a token is 4x4 pixels, 64 a frame) rather than Wan's 2x2, whose 8-px tokens make the
# clips' 2 px of motion a frame a quarter of a token. The latent mean and
# std (-0.65, 0.30 in [-1, 1] pixel units) are the domain's per-colour statistics. `pusa-mini-scratch`
# holds the seeded text encoder and random DiT that training starts from (`make pusa-mini`);
# `pusa-mini-base` is the T2V base trained with one timestep per clip; `pusa-mini` adds the VTA LoRA.
_MINI_VOCABULARY = (
    "a", "and", "on", "background", "red", "green", "blue", "yellow", "circle", "square",
    "moves", "bounces", "grows", "turns", "right", "left", "down", "up", "plain", "stripes", "checks",
)  # fmt: skip
MINI_SCRATCH = ModelSpec(
    name="pusa-mini-scratch",
    transformer={
        **TINY.transformer,
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 48,
        "out_channels": 48,
        "text_dim": 64,
        "ffn_dim": 512,
        "num_layers": 4,
        "patch_size": (1, 1, 1),
    },
    vae={
        "_class_name": "SpaceToDepthCodec",
        "scale_factor_spatial": 4,
        "scale_factor_temporal": 1,
        "z_dim": 48,
        "latents_mean": [-0.65] * 48,
        "latents_std": [0.30] * 48,
    },
    text_encoder={
        **TINY.text_encoder,
        "vocab_size": 32,
        "d_model": 64,
        "d_ff": 128,
        "num_heads": 4,
        "relative_attention_max_distance": 16,
    },
    frames=5,
    height=32,
    width=32,
    fps=4,
    weights="seeded",
    seed=0,
    text_length=16,
    defaults={"steps": 10, "guidance": 3.0, "shift": 3.0},
    vocabulary=_MINI_VOCABULARY,
    negative_prompt="",  # the empty prompt the base is trained on 10% of the time (caption dropout)
)
MINI_BASE = dataclasses.replace(MINI_SCRATCH, name="pusa-mini-base", weights="embedded", embedded="pusa-mini")
# pusa-mini generates T2V with the "lead" schedule: frame 0 first, then the others from it, the
# layout its VTA fine-tune learned the direction word in (see the README's pusa-mini section).
MINI = dataclasses.replace(
    MINI_BASE,
    name="pusa-mini",
    adapters=(("vta/adapter.safetensors", 1.0),),
    defaults={**MINI_BASE.defaults, "schedule": "lead"},
)


def _wan_preset(name: str, heads: int, ffn_dim: int, layers: int) -> ModelSpec:
    """A Wan2.1 T2V release: its DiT shape, Wan's VAE and UMT5-XXL, 81 frames at 480x832, 16 fps,
    and Pusa's sampling defaults (10 steps, guidance 3, shift 5)."""
    return ModelSpec(
        name=name,
        transformer=_wan_dit(heads=heads, ffn_dim=ffn_dim, layers=layers),
        vae=_WAN_VAE,
        text_encoder=_UMT5_XXL,
        frames=81,
        height=480,
        width=832,
        fps=16,
        defaults={"steps": 10, "guidance": 3.0, "shift": 5.0},
    )


PRESETS: dict[str, ModelSpec] = {
    "tiny": TINY,
    "tiny-wide": TINY_WIDE,
    "pusa-mini-scratch": MINI_SCRATCH,
    "pusa-mini-base": MINI_BASE,
    "pusa-mini": MINI,
    "wan2.1-t2v-1.3b": _wan_preset("wan2.1-t2v-1.3b", heads=12, ffn_dim=8960, layers=30),
    "wan2.1-t2v-14b": _wan_preset("wan2.1-t2v-14b", heads=40, ffn_dim=13824, layers=40),
}


def get_preset(name: str) -> ModelSpec:
    """Look up a preset by name; unknown names are a user error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UserInputError(f"unknown model preset {name!r} (known: {known})") from None


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """A YAML config file's contents; unreadable files and bad YAML are one-line user errors."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UserInputError(f"cannot read config {str(path)!r}: {error.strerror or error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserInputError(f"config {str(path)!r} is not valid YAML: {error}") from None


# Names that become directory names in storage (runs, adapters, batch items): plain names only.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_plain_name(value: str, what: str = "") -> str:
    """`value` unchanged if it is a plain name (letters, digits, '.', '_', '-'; at most 128)."""
    if not PLAIN_NAME.match(value):
        prefix = f"{what} " if what else ""
        raise UserInputError(
            f"{prefix}{value!r} must be letters, digits, '.', '_' or '-' (at most 128, no '/')"
        )
    return value


def check_storage_uri(value: str) -> str:
    """A local path, file:// or s3://bucket/... URI (stripped), for config fields."""
    value = value.strip()
    if not value:
        raise UserInputError("must not be empty")
    if "://" in value and not value.startswith(("s3://", "file://")):
        raise UserInputError(f"{value!r}: expected a local path, file:// or s3:// URI")
    if value.startswith("s3://") and not value[5:].split("/", 1)[0]:
        raise UserInputError(f"{value!r} names no bucket")
    return value


# Config field types that run those checks (pydantic reports their messages under the field's name).
StorageUri = Annotated[str, AfterValidator(check_storage_uri)]
PlainName = Annotated[str, AfterValidator(check_plain_name)]

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """The base of every typed config and request: unknown keys are errors, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def load_config(model: type[ConfigT], path: str | os.PathLike[str], what: str) -> ConfigT:
    """Read a YAML config file and validate it against `model` (see `validate_config`)."""
    return validate_config(model, read_yaml(path), str(path), what)


def validate_config(model: type[ConfigT], data: Any, source: str, what: str) -> ConfigT:
    """Validate a config mapping against a pydantic model; every problem listed in one UserInputError."""
    if not isinstance(data, Mapping):
        raise UserInputError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{where}: {message.removeprefix('Value error, ')}")
        raise UserInputError(f"invalid {what} config {source}: " + "; ".join(problems)) from None
