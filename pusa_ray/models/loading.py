"""Build or load the parts of a model: VTA DiT, latent codec, tokenizer and text encoder.

`--model` is a preset name (the `tiny` presets are built in code from their seed) or a model
directory, local or s3:// (committed): diffusers' Wan layout (`transformer/ vae/ text_encoder/
tokenizer/ scheduler/ model_index.json`, as published and as `save_model_dir` writes) or the
original Wan2.1 release layout (see `pusa_ray.checkpoints.wan_original`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel
from transformers.utils import logging as hf_logging

from pusa_ray.config import PRESETS, TEXT_LENGTH, ModelSpec, get_preset
from pusa_ray.errors import UserInputError
from pusa_ray.models.codec import SpaceToDepthCodec, WanCodec, is_space_to_depth, make_codec
from pusa_ray.models.description import saved_spec
from pusa_ray.models.text import byte_tokenizer, word_tokenizer
from pusa_ray.models.vta import VTAWanTransformer

SPEC_FILE = "pusa_ray.json"  # our defaults (frames, size, fps, preset) beside diffusers' files
SAVED_FIELDS = ("frames", "height", "width", "fps", "text_length")


@dataclass
class Components:
    """A loaded model: what the pipeline needs to turn prompts and media into video."""

    spec: ModelSpec
    model: VTAWanTransformer
    codec: WanCodec | SpaceToDepthCodec
    tokenizer: PreTrainedTokenizerBase
    text_encoder: torch.nn.Module
    device: torch.device
    # Keep the text encoder in CPU memory between requests, on the device only while it encodes.
    offload_text_encoder: bool = False
    speed: dict[str, Any] = field(default_factory=dict)  # the SpeedSettings applied (models/speed.py)

    @property
    def model_id(self) -> str:
        return self.spec.name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the Wan/Pusa recipe), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_seeded(
    spec: ModelSpec,
) -> tuple[WanTransformer3DModel, AutoencoderKLWan | dict[str, Any], UMT5EncoderModel]:
    """Randomly initialised parts from the preset's seed; the global RNG is left untouched.

    A space-to-depth codec has no weights: its config dict stands in for the VAE (see `make_codec`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = WanTransformer3DModel(**spec.transformer)
        vae = dict(spec.vae) if is_space_to_depth(spec.vae) else AutoencoderKLWan(**spec.vae)
        text_encoder = UMT5EncoderModel(UMT5Config(**spec.text_encoder))
    return transformer, vae, text_encoder


def preset_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer a seeded preset is built with: word-level over its vocabulary, else byte-level."""
    if spec.vocabulary is not None:
        return word_tokenizer(spec.vocabulary, spec.text_length)
    return byte_tokenizer(spec.text_length)


WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # pusa_ray/weights/


def embedded_dir(spec: ModelSpec) -> Path:
    """The package directory holding an embedded preset's weights; a UserInputError if absent."""
    path = WEIGHTS_DIR / str(spec.embedded)
    missing = [str(path / a) for a, _ in spec.adapters if not (path / a).is_file()]
    if not (path / "transformer").is_dir() or missing:
        raise UserInputError(
            f"preset {spec.name!r}: its weights are not in this installation ({path} or "
            f"{', '.join(missing) or 'its adapters'} missing); `make pusa-mini` trains them"
        )
    return path


def model_source(model: str) -> str:
    """Where a model's files are: an embedded preset's package directory, else `model` unchanged.

    For jobs that read a model's parts (codec, text encoder, DiT) as a directory. An embedded
    preset with adapters is refused: its parts alone are not the model (use its base preset).
    """
    spec = PRESETS.get(model)
    if spec is None or spec.weights != "embedded":
        return model
    if spec.adapters:
        bases = [p.name for p in PRESETS.values() if p.embedded == spec.embedded and not p.adapters]
        raise UserInputError(
            f"preset {model!r} merges LoRA adapters on load; use its base ({', '.join(bases)}) here"
        )
    return str(embedded_dir(spec))


def seeded_preset(model: str, setting: str, hint: str = "") -> ModelSpec:
    """A preset whose weights are built in code from its seed; else the one error for a preset
    whose weights this installation does not have (`setting` names where to give a directory)."""
    spec = get_preset(model)
    if spec.weights != "seeded":
        raise UserInputError(
            f"preset {model!r} has no embedded weights: set {setting} to a model directory (diffusers "
            f"Wan layout, local or s3://) holding its weights{hint}"
        )
    return spec


def parts_source(model: str, setting: str = "model", hint: str = "") -> str:
    """Where a model's parts are loaded from, one at a time: a seeded preset's name, an embedded
    preset's package directory, or the model directory (local or s3://) itself."""
    source = model_source(model)
    if source in PRESETS:
        seeded_preset(source, setting, hint)
    return source


def model_parts(model: str, parts: Sequence[str]) -> Path:
    """A local directory holding `parts` (e.g. ["vae"]) of the model directory `model`.

    A local directory is used in place. From a committed s3:// directory only the files under
    `parts` are fetched (a VAE actor never downloads the 14B DiT), into the download cache keyed by
    the manifest, their sizes checked.
    """
    from pusa_ray import storage

    if not model.startswith("s3://"):
        return Path(model)
    manifest = storage.read_manifest(model)
    version = hashlib.sha256(manifest.to_json()).hexdigest()[:16]
    root = storage.cache_root() / "model-parts" / hashlib.sha256(model.encode()).hexdigest()[:32] / version
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
                raise storage.CorruptDataError(
                    storage.join(model, entry.path), "downloaded size differs from manifest"
                )
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return root


def load_transformer(model: str, dtype: torch.dtype, setting: str = "model", hint: str = "") -> Any:
    """The model's DiT alone (diffusers' WanTransformer3DModel), on the CPU in `dtype`."""
    source = parts_source(model, setting, hint)
    if source in PRESETS:
        return cast_parameters(build_seeded(PRESETS[source])[0], dtype)
    root = model_parts(source, ["transformer"])
    if not (root / "transformer" / "config.json").is_file():
        raise UserInputError(f"model directory {model!r} has no transformer/ (diffusers Wan layout)")
    transformer = WanTransformer3DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
    return cast_parameters(transformer, dtype)


def load_codec(model: str, device: torch.device, setting: str = "model") -> WanCodec | SpaceToDepthCodec:
    """The model's latent codec alone (its VAE in float32 on `device`), as `load_components` loads it."""
    source = parts_source(model, setting)
    if source in PRESETS:
        _, vae, _ = build_seeded(PRESETS[source])
    else:
        root = model_parts(source, ["vae"])
        config = json.loads((root / "vae" / "config.json").read_text())
        if is_space_to_depth(config):
            return make_codec(config)
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32)
    if isinstance(vae, torch.nn.Module):
        vae = cast_parameters(vae.to(device), torch.float32).eval().requires_grad_(False)
    return make_codec(vae)


def load_text_encoder(
    model: str, device: torch.device, setting: str = "model"
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module, int]:
    """(tokenizer, text encoder on `device` in its default dtype, max length), nothing else."""
    source = parts_source(model, setting)
    if source in PRESETS:
        spec = PRESETS[source]
        _, _, encoder = build_seeded(spec)
        tokenizer, length = preset_tokenizer(spec), spec.text_length
    else:
        root = model_parts(source, ["text_encoder", "tokenizer"])
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=default_dtype(device))
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        length = int(saved_spec(source).get("text_length", TEXT_LENGTH))
    encoder = cast_parameters(encoder.to(device), default_dtype(device)).eval().requires_grad_(False)
    return tokenizer, encoder, length


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
    if model in PRESETS and PRESETS[model].weights == "embedded":
        spec = PRESETS[model]
        _, transformer, vae, text_encoder, tokenizer = _load_directory(embedded_dir(spec), dtype)
    elif model in PRESETS:
        spec = seeded_preset(model, "--model")
        transformer, vae, text_encoder = build_seeded(spec)
        tokenizer = preset_tokenizer(spec)
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
    if isinstance(vae, torch.nn.Module):
        vae = cast_parameters(vae.to(device), torch.float32).eval().requires_grad_(False)
    components = Components(
        spec, VTAWanTransformer(transformer), make_codec(vae), tokenizer, text_encoder, device
    )
    if spec.adapters:  # an embedded preset's own LoRA, merged: the trained model at its alpha
        root = embedded_dir(spec)
        apply_adapters(components, [(str(root / path), alpha) for path, alpha in spec.adapters])
    return components


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
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    if is_space_to_depth(vae_config):
        vae = vae_config
    else:
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would interleave with our output
    text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    vae_settings = vae if isinstance(vae, dict) else dict(vae.config)
    spec = _directory_spec(path, dict(transformer.config), vae_settings, text_encoder.config.to_dict(), name)
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
    overrides = {key: saved[key] for key in SAVED_FIELDS if key in saved}
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
    scheduler = FlowMatchEulerDiscreteScheduler(shift=spec.defaults.get("shift", 5.0))
    codec = components.codec
    if isinstance(codec, WanCodec):
        pipeline = WanPipeline(
            tokenizer=components.tokenizer,
            text_encoder=components.text_encoder,
            vae=codec.vae,
            scheduler=scheduler,
            transformer=components.model.transformer,
        )
        pipeline.save_pretrained(path, safe_serialization=True)
    else:  # the same layout; the weightless codec is its config alone
        components.model.transformer.save_pretrained(path / "transformer", safe_serialization=True)
        components.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        components.tokenizer.save_pretrained(path / "tokenizer")
        scheduler.save_pretrained(path / "scheduler")
        (path / "vae").mkdir(parents=True, exist_ok=True)
        (path / "vae" / "config.json").write_text(json.dumps(codec.config, indent=2))
    saved = {"name": spec.name, "preset": _preset_of(spec)}
    saved.update({key: getattr(spec, key) for key in SAVED_FIELDS})
    (path / SPEC_FILE).write_text(json.dumps(saved, indent=2))
    return str(path)


def _preset_of(spec: ModelSpec) -> str | None:
    """The preset whose defaults a saved model keeps: its own, or (a trained copy) its architecture's."""
    if spec.name in PRESETS:
        return spec.name
    for preset in PRESETS.values():
        if preset.transformer == spec.transformer and preset.vae == spec.vae and not preset.adapters:
            return preset.name
    return None
