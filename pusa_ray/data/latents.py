"""The latent dataset: one record per clip, written by the preprocessing job, read by training.

This module is the contract (docs/shard-format.md says the same for other readers). A dataset is a
directory, local or ``s3://``, committed with ``pusa_ray.storage``'s manifest-last protocol::

    _MANIFEST.json                   written last; lists the files below (size, sha256); `extra`
                                     describes the dataset (model, VAE statistics, text encoder, sizes)
    index-<run>.parquet              one row per clip: key -> (shard, row), uri, caption, start
    shards/<run>-<id>.parquet        the records (parquet, one record per row group)
    shards/<run>-<id>.parquet.json   sidecar: the shard's size, sha256 and keys; written after the
                                     shard, so a shard without one is incomplete and ignored
    errors.jsonl                     clips the last run skipped, with reasons (a report, not data)

A record as :class:`LatentDataset` returns it:

    latents         float32 [C, F_lat, h, w]  normalised, (z - latents_mean) / latents_std: the
                                              space the DiT works in, as `pusa-ray generate --save-latents`
    context         float32 [512, D]          text encoder's last hidden state, zeros past context_length
    context_length  int                       tokens of the prompt, end-of-sequence token included

In a shard, tensors are raw little-endian C-order bytes in the dtype named beside them:
``float32``, ``float16`` or ``bfloat16`` (raw bf16 bits, 2 bytes each: Arrow has no bfloat16).
Prompt embeddings are stored unpadded, ``[context_length, D]``; :func:`pad_context` pads them.
Nothing here imports Ray.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pusa_ray import storage
from pusa_ray.config import TEXT_LENGTH
from pusa_ray.errors import UserInputError
from pusa_ray.storage import CorruptDataError

__all__ = [
    "DATASET_KIND",
    "ERRORS_NAME",
    "FORMAT_VERSION",
    "INDEX_SCHEMA",
    "SHARD_DIR",
    "SHARD_SCHEMA",
    "SIDECAR_SUFFIX",
    "TENSOR_DTYPES",
    "DatasetInfo",
    "LatentDataset",
    "LatentRecord",
    "ShardInfo",
    "conform_shard_table",
    "encode_prompts_unpadded",
    "pad_context",
    "read_sidecar",
    "tensor_from_bytes",
    "tensor_to_bytes",
    "write_shard",
]

DATASET_KIND = "pusa_ray.latent_dataset"
SHARD_KIND = "pusa_ray.latent_shard"
FORMAT_VERSION = 1
SHARD_DIR = "shards"
SIDECAR_SUFFIX = ".json"
ERRORS_NAME = "errors.jsonl"

# Storage dtype name -> numpy little-endian dtype of the stored bytes (bf16 as its raw 16 bits).
TENSOR_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("start", pa.float64()),  # seconds into the source video of the first frame
        ("source_size", pa.int64()),
        ("source_version", pa.string()),  # S3 ETag, or a local file's mtime in ns
        ("latents", pa.binary()),
        ("latents_dtype", pa.string()),
        ("latents_shape", pa.list_(pa.int32())),  # [C, F_lat, h, w]
        ("context", pa.binary()),
        ("context_dtype", pa.string()),
        ("context_length", pa.int32()),
        ("context_dim", pa.int32()),
    ]
)

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # path relative to the dataset
        ("row", pa.int32()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("start", pa.float64()),
    ]
)

# Tensors barely compress; everything else is small and compresses well.
_COMPRESSION = {name: ("NONE" if name in ("latents", "context") else "ZSTD") for name in SHARD_SCHEMA.names}
_STATISTICS = ["key", "uri", "start", "source_size", "context_length", "context_dim"]
_HASH_CHUNK = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Tensors <-> bytes


def tensor_to_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    """Raw little-endian C-order bytes of ``tensor`` cast to ``dtype`` (see TENSOR_DTYPES)."""
    if dtype not in TENSOR_DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype!r} (known: {', '.join(TENSOR_DTYPES)})")
    values = tensor.detach().to("cpu").contiguous()
    if dtype == "bfloat16":
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits.astype(TENSOR_DTYPES[dtype], copy=False).tobytes()
    return values.to(getattr(torch, dtype)).numpy().astype(TENSOR_DTYPES[dtype], copy=False).tobytes()


def tensor_from_bytes(data: bytes, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 tensor of ``shape`` stored as ``data`` in ``dtype`` (inverse of tensor_to_bytes)."""
    if dtype not in TENSOR_DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype!r} (known: {', '.join(TENSOR_DTYPES)})")
    shape = tuple(int(size) for size in shape)
    expected = math.prod(shape) * np.dtype(TENSOR_DTYPES[dtype]).itemsize
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes cannot hold {dtype} {list(shape)} ({expected} bytes)")
    array = np.frombuffer(data, dtype=TENSOR_DTYPES[dtype]).copy()  # writable, native order
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float().reshape(shape)
    return torch.from_numpy(array.astype(np.float32, copy=False)).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Prompt embeddings, unpadded


@torch.no_grad()
def encode_prompts_unpadded(
    tokenizer: Any, text_encoder: torch.nn.Module, prompts: Sequence[str], max_length: int = TEXT_LENGTH
) -> list[torch.Tensor]:
    """Prompts -> one embedding ``[L_i, D]`` per prompt: the first L_i rows of `encode_prompts`.

    Tokenizes and encodes exactly as `pusa_ray.models.text.encode_prompts` does (same cleaning,
    padding to ``max_length``, same attention mask), so ``pad_context`` of each result equals the
    matching row of `encode_prompts` bit for bit. L_i counts the end-of-sequence token.
    """
    # Imported here: the text stack takes seconds to import, and readers never need it.
    from pusa_ray.models.text import encode_hidden

    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError(f"expected a right-padding tokenizer, got padding_side={tokenizer.padding_side!r}")
    hidden, mask = encode_hidden(tokenizer, text_encoder, list(prompts), max_length)  # [B, L, D], [B, L]
    lengths = mask.sum(dim=1).tolist()
    return [hidden[index, :length] for index, length in enumerate(lengths)]  # each [L_i, D]


def pad_context(context: torch.Tensor, length: int = TEXT_LENGTH) -> torch.Tensor:
    """Unpadded prompt embeddings ``[L, D]`` -> ``[length, D]`` with zeros after row L."""
    if context.ndim != 2 or context.shape[0] > length:
        raise ValueError(f"expected context [L <= {length}, D], got shape {tuple(context.shape)}")
    padded = context.new_zeros((length, context.shape[1]))  # [length, D]
    padded[: context.shape[0]] = context
    return padded


# ----------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard: its path in the dataset, size, sha256 and the keys of its rows, in order."""

    path: str
    size: int
    sha256: str
    keys: tuple[str, ...]
    run: str = ""

    def to_json(self) -> bytes:
        document = {
            "format": SHARD_KIND,
            "format_version": FORMAT_VERSION,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "records": len(self.keys),
            "keys": list(self.keys),
            "run": self.run,
        }
        return json.dumps(document, indent=0).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> ShardInfo:
        try:
            document = json.loads(data)
            if document.get("format") != SHARD_KIND or document.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not a version {FORMAT_VERSION} {SHARD_KIND} sidecar")
            info = cls(
                path=storage.safe_relative_path(document["path"]),
                size=int(document["size"]),
                sha256=str(document["sha256"]),
                keys=tuple(str(key) for key in document["keys"]),
                run=str(document.get("run", "")),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CorruptDataError(uri, f"invalid shard sidecar: {error}") from error
        if len(set(info.keys)) != len(info.keys):
            raise CorruptDataError(uri, "invalid shard sidecar: a key is listed twice")
        return info


def conform_shard_table(table: pa.Table) -> pa.Table:
    """``table`` with exactly SHARD_SCHEMA's columns, in order and cast to its types; else ValueError."""
    missing = [name for name in SHARD_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"shard records lack columns {missing}; have {table.column_names}")
    return table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def write_shard(table: pa.Table, dataset_uri: str, path: str, run: str = "") -> ShardInfo:
    """Write the records of ``table`` as the shard ``path`` of the dataset, then its sidecar.

    The shard is written whole (an atomic rename locally, one PUT or a completed multipart upload
    on S3) before the sidecar, so a reader that finds the sidecar finds the complete shard.
    """
    table = conform_shard_table(table)
    keys = tuple(table.column("key").to_pylist())
    if len(set(keys)) != len(keys):
        raise ValueError(f"a shard must not hold a key twice: {sorted(keys)}")
    with tempfile.TemporaryDirectory(prefix="pusa_ray_shard_") as scratch:
        local = Path(scratch) / "shard.parquet"
        pq.write_table(
            table,
            local,
            row_group_size=1,  # one record per row group: a record is read without its neighbours
            compression=_COMPRESSION,
            use_dictionary=["latents_dtype", "context_dtype"],
            write_statistics=_STATISTICS,
        )
        info = ShardInfo(path, local.stat().st_size, storage.sha256_file(local), keys, run)
        storage.upload_file(local, storage.join(dataset_uri, path))
    storage.write_bytes(storage.join(dataset_uri, path + SIDECAR_SUFFIX), info.to_json())
    return info


def read_sidecar(uri: str) -> ShardInfo:
    """Parse the sidecar at ``uri`` (a ``shards/*.parquet.json`` file)."""
    return ShardInfo.from_json(storage.read_bytes(uri), uri)


# ----------------------------------------------------------------------------------------------
# Reading a committed dataset


@dataclass(frozen=True)
class LatentRecord:
    """One clip: latents ``[C, F_lat, h, w]`` and context ``[512, D]`` (float32), with provenance."""

    key: str
    uri: str
    caption: str
    start: float
    latents: torch.Tensor  # [C, F_lat, h, w], normalised space
    context: torch.Tensor  # [512, D], zeros from row context_length on
    context_length: int


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's manifest says about how it was encoded (see docs/shard-format.md)."""

    model_id: str
    architecture: dict[str, Any]
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    text_encoder: dict[str, Any]
    frames: int
    height: int
    width: int
    fps: float
    latent_shape: tuple[int, ...]  # [C, F_lat, h, w]
    context_dim: int
    context_padded_length: int
    index: str
    extra: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], uri: str) -> DatasetInfo:
        if extra.get("kind") != DATASET_KIND:
            raise UserInputError(f"{uri} is not a latent dataset (manifest kind {extra.get('kind')!r})")
        if extra.get("format_version") != FORMAT_VERSION:
            raise UserInputError(
                f"{uri}: latent dataset format_version {extra.get('format_version')!r} is not supported "
                f"(this reader reads version {FORMAT_VERSION})"
            )
        try:
            video, vae, context = extra["video"], extra["vae"], extra["context"]
            return cls(
                model_id=str(extra["model"]["id"]),
                architecture=dict(extra["model"]["architecture"]),
                latents_mean=tuple(float(v) for v in vae["latents_mean"]),
                latents_std=tuple(float(v) for v in vae["latents_std"]),
                text_encoder=dict(extra["text_encoder"]),
                frames=int(video["frames"]),
                height=int(video["height"]),
                width=int(video["width"]),
                fps=float(video["fps"]),
                latent_shape=tuple(int(v) for v in extra["latents"]["shape"]),
                context_dim=int(context["dim"]),
                context_padded_length=int(context["padded_length"]),
                index=storage.safe_relative_path(extra["index"]),
                extra=dict(extra),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptDataError(uri, f"invalid latent dataset manifest: {error!r}") from error


# Architecture keys that shape the stored data: latent channels and text embedding width.
DATA_ARCHITECTURE_KEYS = ("in_channels", "text_dim")


class LatentDataset(Sequence[LatentRecord]):
    """A committed latent dataset (local or ``s3://``): ``len``, index access and iteration.

    Opening checks the commit and that every listed file exists with its listed size (and its
    sha256 with ``verify_hashes``, which streams every shard). S3 shards are fetched whole into
    the download cache on first use (``storage.cached_path``: keyed by ETag, never fetched twice).
    Records come in index order, which groups them by shard. Give ``architecture`` (a ModelSpec's
    ``.architecture`` or the spec itself) to fail early if the dataset was made for another model.
    """

    def __init__(
        self,
        uri: str,
        *,
        verify_hashes: bool = False,
        architecture: Mapping[str, Any] | Any | None = None,
        open_shards: int = 8,
    ) -> None:
        self.uri = uri
        self.manifest = storage.verify_dir(uri, hashes=verify_hashes)
        self.info = DatasetInfo.from_extra(self.manifest.extra, uri)
        if architecture is not None:
            self.check_architecture(architecture)
        self._sizes = {entry.path: entry.size for entry in self.manifest.files}
        if self.info.index not in self._sizes:
            raise CorruptDataError(uri, f"the index {self.info.index!r} is not among the committed files")
        index = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, self.info.index))))
        self._index = index.cast(INDEX_SCHEMA).to_pydict()
        for shard in set(self._index["shard"]):
            if shard not in self._sizes:
                raise CorruptDataError(uri, f"the index refers to {shard!r}, which is not committed")
        self._open_shards = open_shards
        self._files: OrderedDict[str, tuple[pq.ParquetFile, list[int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._index["key"])

    @property
    def keys(self) -> list[str]:
        """The record keys, in index order."""
        return list(self._index["key"])

    def check_architecture(self, expected: Mapping[str, Any] | Any, *, strict: bool = False) -> None:
        """Raise UserInputError unless the dataset was encoded for a model like ``expected``.

        By default only the keys that shape the data must match (latent channels, text width), so
        one dataset serves Wan2.1 1.3B and 14B alike (same VAE and UMT5); ``strict`` compares every
        architecture key.
        """
        wanted = dict(getattr(expected, "architecture", expected))
        keys = sorted(set(wanted) | set(self.info.architecture)) if strict else DATA_ARCHITECTURE_KEYS
        differing = {
            key: (self.info.architecture.get(key), wanted.get(key))
            for key in keys
            if self.info.architecture.get(key) != wanted.get(key)
        }
        if differing:
            details = ", ".join(
                f"{key}: dataset {have!r} vs model {want!r}" for key, (have, want) in differing.items()
            )
            raise UserInputError(
                f"latent dataset {self.uri} was encoded for model {self.info.model_id!r}, whose "
                f"architecture does not match the model given ({details})"
            )

    def __getitem__(self, index: int) -> LatentRecord:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("LatentDataset takes integer indices, not slices")
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"record {index} out of range for a dataset of {count}")
        index %= count
        key, shard, row = self._index["key"][index], self._index["shard"][index], self._index["row"][index]
        record = self._read_row(shard, row)
        if record["key"] != key:
            raise CorruptDataError(
                storage.join(self.uri, shard),
                f"row {row} holds key {record['key']!r}, the index says {key!r}",
            )
        return self._record(record)

    def __iter__(self) -> Iterator[LatentRecord]:
        for index in range(len(self)):
            yield self[index]

    def _record(self, row: Mapping[str, Any]) -> LatentRecord:
        latents = tensor_from_bytes(row["latents"], row["latents_dtype"], row["latents_shape"])
        length, dim = int(row["context_length"]), int(row["context_dim"])
        context = tensor_from_bytes(row["context"], row["context_dtype"], (length, dim))
        return LatentRecord(
            key=row["key"],
            uri=row["uri"],
            caption=row["caption"],
            start=float(row["start"]),
            latents=latents,  # [C, F_lat, h, w]
            context=pad_context(context, self.info.context_padded_length),  # [512, D]
            context_length=length,
        )

    def _read_row(self, shard: str, row: int) -> dict[str, Any]:
        parquet, starts = self._open(shard)
        group = bisect.bisect_right(starts, row) - 1
        table = parquet.read_row_group(group)
        return table.slice(row - starts[group], 1).to_pylist()[0]

    def _open(self, shard: str) -> tuple[pq.ParquetFile, list[int]]:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        shard_uri = storage.join(self.uri, shard)
        local = storage.cached_path(shard_uri)
        if local.stat().st_size != self._sizes[shard]:
            raise CorruptDataError(shard_uri, f"copy at {local} does not have the committed size")
        parquet = pq.ParquetFile(local)
        starts = [0]
        for group in range(parquet.num_row_groups):
            starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
        self._files[shard] = (parquet, starts[:-1])
        while len(self._files) > self._open_shards:
            _, (evicted, _) = self._files.popitem(last=False)
            evicted.close()
        return self._files[shard]
