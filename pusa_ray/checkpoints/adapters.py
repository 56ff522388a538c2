"""Published adapters: `{prefix}/{name}/adapter.safetensors`, committed with a manifest.

The training job publishes here; `pusa-ray generate --lora` and the Serve app read from here.
The manifest's `extra` repeats the adapter's metadata (base model, architecture, rank, step) so a
service can list adapters and check their architecture without downloading the weights.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pusa_ray import storage
from pusa_ray.config import check_plain_name

ADAPTER_FILE = "adapter.safetensors"


def check_name(name: str) -> str:
    """Adapter ids are plain names: letters, digits, '.', '_', '-' (no paths)."""
    return check_plain_name(name, "adapter id")


def adapter_dir(prefix: str, name: str) -> str:
    return storage.join(prefix, check_name(name))


def adapter_uri(prefix: str, name: str) -> str:
    """The weights file of a published adapter."""
    return storage.join(prefix, check_name(name), ADAPTER_FILE)


def publish_adapter(local_file: str | Path, prefix: str, name: str, metadata: dict[str, Any]) -> str:
    """Upload an adapter file as `{prefix}/{name}/` and commit it (manifest last). Returns the file URI."""
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(local_file, Path(scratch) / ADAPTER_FILE)
        storage.upload_dir(
            scratch, adapter_dir(prefix, name), commit=True, extra={"kind": "adapter", **metadata}
        )
    return adapter_uri(prefix, name)


def list_adapters(prefix: str) -> list[dict[str, Any]]:
    """Committed adapters under `prefix`: their ids, URIs and metadata."""
    names = sorted(
        {path.split("/", 1)[0] for path in storage.list_files(prefix) if path.endswith(storage.MANIFEST_NAME)}
    )
    found = []
    for name in names:
        try:
            manifest = storage.read_manifest(adapter_dir(prefix, name))
        except (FileNotFoundError, ValueError):
            continue  # uncommitted or not an adapter directory
        if manifest.extra.get("kind") == "adapter":
            found.append({"id": name, "uri": adapter_uri(prefix, name), **manifest.extra})
    return found


def adapter_metadata(prefix: str, name: str) -> dict[str, Any]:
    """The committed metadata of one adapter; FileNotFoundError when it is not published."""
    manifest = storage.read_manifest(adapter_dir(prefix, name))
    if manifest.extra.get("kind") != "adapter":
        raise FileNotFoundError(f"{adapter_dir(prefix, name)!r} is not a published adapter")
    return dict(manifest.extra)
