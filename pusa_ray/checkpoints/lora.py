"""LoRA adapters in every format users bring, one canonical form, merged or unmerged.

Canonical form: diffusers module names (`blocks.0.attn1.to_q.lora_A.weight`) with the training
scale folded into `lora_B`, so that for every format `W' = W + alpha * B @ A` and alpha 1.0 is
the trained model (1.4 the Pusa paper's inference default).

Formats read:
- Pusa V1 (`pusa_v1.pt`, torch state dict, or the same keys in safetensors):
  `blocks.{i}.{self_attn|cross_attn}.{q,k,v,o}.lora_{A|B}.default.weight`, `blocks.{i}.ffn.{0|2}...`;
  trained with alpha = rank, so its scale is 1.
- ComfyUI / kohya-style Wan LoRAs (`diffusion_model.blocks.N.self_attn.q.lora_down/lora_up.weight`,
  optional `.alpha`), as distillation LoRAs are published: converted by diffusers' own converter.
- diffusers' LoRA format (`transformer.blocks.N.attn1.to_q.lora_A.weight`).
- ours (`pusa-ray-lora`): safetensors with self-describing metadata, see `save_adapter`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from safetensors import safe_open
from safetensors.torch import save_file

from pusa_ray.errors import UserInputError

FORMAT = "pusa-ray-lora"
FORMAT_VERSION = 1

# Wan / Pusa module names -> diffusers module names, per block (the key table for export).
ORIGINAL_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
DIFFUSERS_TO_ORIGINAL = {value: key for key, value in ORIGINAL_TO_DIFFUSERS.items()}
# The paper's targets: every attention projection of self- and cross-attention and both FFN linears.
PUSA_TARGET_MODULES = list(DIFFUSERS_TO_ORIGINAL)

_CANONICAL_KEY = re.compile(r"^(?P<module>[\w.]+)\.lora_(?P<part>A|B)\.(?P<kind>weight|bias)$")
_PUSA_KEY = re.compile(r"^blocks\.\d+\.[\w.]+\.lora_[AB]\.default\.weight$")


@dataclass
class LoraAdapter:
    """Canonical LoRA weights (scale folded into B) and what is known about them."""

    weights: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({key.rsplit(".lora_", 1)[0] for key in self.weights})

    @property
    def rank(self) -> int:
        return max(value.shape[0] for key, value in self.weights.items() if key.endswith("lora_A.weight"))

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights[f"{module}.lora_A.weight"], self.weights[f"{module}.lora_B.weight"]


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise UserInputError(f"cannot load LoRA {str(path)!r} as a tensor state dict: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"LoRA {str(path)!r} is not a state dict of tensors")
    return state, {}


def _from_wan_style(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Pusa and ComfyUI/kohya keys through diffusers' Wan LoRA converter."""
    prefixed = {}
    for key, value in state.items():
        key = key.replace(".default.", ".") if _PUSA_KEY.match(key) else key
        prefixed[key if key.startswith("diffusion_model.") else f"diffusion_model.{key}"] = value
    try:
        converted = _convert_non_diffusers_wan_lora_to_diffusers(prefixed)
    except (ValueError, KeyError) as error:
        raise UserInputError(f"LoRA {source!r} has keys this loader does not know: {error}") from None
    return {key.removeprefix("transformer."): value for key, value in converted.items()}


def _detect_and_convert(
    state: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not state:
        raise UserInputError(f"LoRA {source!r} holds no tensors")
    if metadata.get("format") == FORMAT:
        info = {key: json.loads(value) for key, value in metadata.items() if key != "format"}
        scale = float(info.get("scale", 1.0))
        weights = {k: (v * scale if ".lora_B." in k else v) for k, v in state.items()}
        return weights, {**info, "format": FORMAT}
    keys = list(state)
    if all(key.startswith("transformer.") for key in keys):
        return {key.removeprefix("transformer."): value for key, value in state.items()}, {
            "format": "diffusers"
        }
    if all(_PUSA_KEY.match(key) for key in keys):
        return _from_wan_style(state, source), {"format": "pusa"}
    if all(key.startswith("diffusion_model.") for key in keys) or all(
        key.startswith("blocks.") for key in keys
    ):
        return _from_wan_style(state, source), {"format": "comfyui"}
    raise UserInputError(f"LoRA {source!r}: unknown key layout (first key {keys[0]!r})")


def load_adapter(source: str | Path) -> LoraAdapter:
    """Read an adapter from a local path or an s3:// URI, in any supported format."""
    text = str(source)
    if text.startswith("s3://"):
        from pusa_ray import storage

        path = storage.cached_path(text)
    else:
        path = Path(text)
    state, metadata = _read_state(path)
    weights, info = _detect_and_convert(state, metadata, text)
    for key in weights:
        if not _CANONICAL_KEY.match(key):
            raise UserInputError(f"LoRA {text!r}: unexpected key {key!r}")
    adapter = LoraAdapter({k: v.contiguous() for k, v in weights.items()}, {**info, "source": text})
    for module in adapter.modules:
        if f"{module}.lora_A.weight" not in weights or f"{module}.lora_B.weight" not in weights:
            raise UserInputError(f"LoRA {text!r}: {module!r} lacks its lora_A or lora_B weight")
    return adapter


def check_compatible(
    adapter: LoraAdapter, transformer: torch.nn.Module, architecture: dict | None = None
) -> None:
    """Every target exists in the model with matching shapes; a recorded architecture must match."""
    source = adapter.metadata.get("source", "adapter")
    recorded = adapter.metadata.get("architecture")
    if recorded and architecture and recorded != architecture:
        raise UserInputError(
            f"LoRA {source!r} was trained for architecture {recorded}, the model is {architecture}"
        )
    for module_name in adapter.modules:
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            raise UserInputError(
                f"LoRA {source!r}: key {module_name!r} names no module of this model"
            ) from None
        lora_a, lora_b = adapter.pair(module_name)
        out_features, in_features = module.weight.shape
        if (
            lora_a.shape[1] != in_features
            or lora_b.shape[0] != out_features
            or lora_a.shape[0] != lora_b.shape[1]
        ):
            raise UserInputError(
                f"LoRA {source!r}: key {module_name!r} has A {tuple(lora_a.shape)} and "
                f"B {tuple(lora_b.shape)}, the model's weight is {tuple(module.weight.shape)}"
            )


@torch.no_grad()
def merge_adapter(transformer: torch.nn.Module, adapter: LoraAdapter, alpha: float) -> None:
    """W += alpha * B @ A for every target (computed in float32, stored in the weight's dtype)."""
    check_compatible(adapter, transformer)
    for module_name in adapter.modules:
        module = transformer.get_submodule(module_name)
        lora_a, lora_b = adapter.pair(module_name)
        delta = lora_b.to(module.weight.device, torch.float32) @ lora_a.to(
            module.weight.device, torch.float32
        )
        module.weight.copy_((module.weight.float() + alpha * delta).to(module.weight.dtype))
        bias = adapter.weights.get(f"{module_name}.lora_B.bias")
        if bias is not None:
            module.bias.copy_(
                (module.bias.float() + alpha * bias.to(module.bias.device).float()).to(module.bias.dtype)
            )


def attach_adapters(transformer: torch.nn.Module, adapters: list[tuple[str, LoraAdapter, float]]) -> None:
    """Inject adapters unmerged through diffusers' peft integration, each with its own alpha.

    The base weights are never modified, so adapters can be switched without drift.
    """
    for name, adapter, _alpha in adapters:
        check_compatible(adapter, transformer)
        # lora_alpha = rank gives peft's scale 1; the user's alpha is the adapter weight.
        state = {f"transformer.{key}": value for key, value in adapter.weights.items()}
        transformer.load_lora_adapter(state, adapter_name=name, prefix="transformer")
    transformer.set_adapters([name for name, _, _ in adapters], weights=[alpha for _, _, alpha in adapters])


def save_adapter(
    path: str | Path,
    weights: dict[str, torch.Tensor],
    *,
    rank: int,
    lora_alpha: float,
    base_model: str,
    architecture: dict[str, Any],
    target_modules: list[str],
    step: int = 0,
) -> Path:
    """Write our format: raw peft A/B under diffusers names, with the training scale in the metadata.

    `scale = lora_alpha / rank` is peft's training scale; loaders fold it into B, so alpha 1.0
    reproduces the trained model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for key in weights:
        if not _CANONICAL_KEY.match(key):
            raise ValueError(f"adapter key {key!r} is not of the form MODULE.lora_A|B.weight")
    metadata = {
        "format": FORMAT,
        "format_version": json.dumps(FORMAT_VERSION),
        "base_model": json.dumps(base_model),
        "architecture": json.dumps(architecture),
        "rank": json.dumps(rank),
        "lora_alpha": json.dumps(lora_alpha),
        "scale": json.dumps(lora_alpha / rank),
        "target_modules": json.dumps(sorted(target_modules)),
        "step": json.dumps(step),
    }
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in weights.items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def to_original_key(key: str) -> str:
    """`blocks.3.attn1.to_q.lora_A.weight` -> `blocks.3.self_attn.q.lora_A.default.weight` (Pusa's keys)."""
    match = re.match(r"^blocks\.(\d+)\.(.+)\.lora_(A|B)\.weight$", key)
    if match is None or match.group(2) not in DIFFUSERS_TO_ORIGINAL:
        raise UserInputError(f"adapter key {key!r} has no Pusa .pt equivalent")
    block, module, part = match.groups()
    return f"blocks.{block}.{DIFFUSERS_TO_ORIGINAL[module]}.lora_{part}.default.weight"


def export_pusa(adapter: LoraAdapter, path: str | Path) -> Path:
    """The Pusa V1 `.pt` layout (scale folded in, as Pusa's alpha = rank training implies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({to_original_key(k): v.clone() for k, v in adapter.weights.items()}, path)
    return path


def export_diffusers(adapter: LoraAdapter, path: str | Path) -> Path:
    """diffusers' LoRA layout (`transformer.` prefix), loadable with `WanPipeline.load_lora_weights`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"transformer.{k}": v.contiguous() for k, v in adapter.weights.items()}, str(path))
    return path
