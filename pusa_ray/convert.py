"""`pusa-ray convert`: models into our layout, adapters between formats; local or s3:// at both ends."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pusa_ray.checkpoints import lora
from pusa_ray.config import PRESETS
from pusa_ray.errors import UserInputError

ADAPTER_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
ADAPTER_FORMATS = ("pusa-ray", "pusa-pt", "diffusers")


def is_adapter_file(source: str) -> bool:
    return source.lower().endswith(ADAPTER_SUFFIXES)


def convert_model(source: str, destination: str) -> str:
    """Any loadable model (preset, diffusers or original Wan layout, local or s3://) -> diffusers layout."""
    from pusa_ray.models.loading import load_components, save_model_dir

    components = load_components(source, device="cpu")
    return save_model_dir(components, destination)


def _architecture_of(base_model: str | None) -> tuple[str, dict]:
    if base_model is None:
        return "unknown", {}
    if base_model in PRESETS:
        return base_model, PRESETS[base_model].architecture
    from pusa_ray.models.loading import load_components

    return base_model, load_components(base_model, device="cpu").spec.architecture


def convert_adapter(
    source: str, destination: str, to: str = "pusa-ray", base_model: str | None = None
) -> str:
    """Read an adapter in any supported format and write it as `to` (our format records `base_model`)."""
    if to not in ADAPTER_FORMATS:
        raise UserInputError(f"--to {to!r} is not one of {', '.join(ADAPTER_FORMATS)}")
    adapter = lora.load_adapter(source)
    with tempfile.TemporaryDirectory() as scratch:
        local = (
            Path(scratch) / Path(destination).name if destination.startswith("s3://") else Path(destination)
        )
        if to == "pusa-pt":
            lora.export_pusa(adapter, local)
        elif to == "diffusers":
            lora.export_diffusers(adapter, local)
        else:
            name, architecture = _architecture_of(base_model)
            lora.save_adapter(
                local,
                adapter.weights,  # canonical weights already carry their scale: record scale 1
                rank=adapter.rank,
                lora_alpha=float(adapter.rank),
                base_model=name,
                architecture=architecture,
                target_modules=adapter.modules,
                step=int(adapter.metadata.get("step", 0)),
            )
        if destination.startswith("s3://"):
            from pusa_ray import storage

            storage.upload_file(local, destination)
    return destination
