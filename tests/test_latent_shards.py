"""The latent dataset format and its reader (pusa_ray.data.latents), without Ray.

Datasets here are built from hand-made records through the job's own shard writer and commit
step, so the format the reader checks is the one the job writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pusa_ray import storage
from pusa_ray.config import get_preset
from pusa_ray.data.latents import (
    SHARD_SCHEMA,
    LatentDataset,
    conform_shard_table,
    encode_prompts_unpadded,
    pad_context,
    read_sidecar,
    tensor_from_bytes,
    tensor_to_bytes,
    write_shard,
)
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import describe_model
from pusa_ray.models.loading import load_components
from pusa_ray.models.text import encode_prompts
from pusa_ray.preprocessing import commit as committing
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import plan as planning
from pusa_ray.storage import CorruptDataError, UncommittedError

LATENT_SHAPE = (16, 5, 4, 6)  # tiny preset, 17 frames at 32x48
TEXT_DIM = 32


pytestmark = pytest.mark.usefixtures("cache_dir")  # a fresh download cache per test


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


# ----------------------------------------------------------------------------------------------
# Tensors and prompt embeddings


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensor_bytes_round_trip_in_each_dtype(dtype: str) -> None:
    tensor = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    data = tensor_to_bytes(tensor, dtype)
    assert len(data) == tensor.numel() * (4 if dtype == "float32" else 2)
    restored = tensor_from_bytes(data, dtype, LATENT_SHAPE)
    assert restored.dtype == torch.float32 and restored.shape == LATENT_SHAPE
    assert torch.equal(restored, tensor.to(getattr(torch, dtype)).float())


def test_bfloat16_is_stored_as_raw_little_endian_bits() -> None:
    tensor = torch.tensor([1.0, -2.5, 3.140625, 0.0])
    data = tensor_to_bytes(tensor, "bfloat16")
    bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(np.frombuffer(data, dtype="<u2"), bits)
    assert data[:2] == bytes([0x80, 0x3F])  # 1.0 in bf16 is 0x3F80, low byte first


def test_tensor_bytes_reject_wrong_sizes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="cannot hold float32"):
        tensor_from_bytes(b"\x00" * 12, "float32", (2, 2))
    with pytest.raises(ValueError, match="unknown tensor dtype 'int8'"):
        tensor_to_bytes(torch.zeros(2), "int8")


def test_unpadded_prompt_embeddings_pad_back_to_encode_prompts(tiny) -> None:
    prompts = ["a red circle moves right", "  two   spaces\nand a newline ", "x", "a long prompt " * 60]
    padded = encode_prompts(tiny.tokenizer, tiny.text_encoder, prompts)  # [4, 512, D]
    unpadded = encode_prompts_unpadded(tiny.tokenizer, tiny.text_encoder, prompts)
    lengths = [context.shape[0] for context in unpadded]
    assert lengths[2] == 2  # one byte and the end-of-sequence token
    assert lengths[3] == 512  # truncated like encode_prompts
    for row, context in zip(padded, unpadded, strict=True):
        assert context.shape == (context.shape[0], TEXT_DIM)
        assert torch.equal(pad_context(context), row)  # bit for bit


def test_pad_context_checks_its_input() -> None:
    assert pad_context(torch.ones(3, 4), length=5)[3:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"expected context \[L <= 2, D\]"):
        pad_context(torch.ones(3, 4), length=2)


# ----------------------------------------------------------------------------------------------
# Datasets built through the job's shard writer and commit step


def _records(keys: list[str], seed: int, dtype: str = "float32") -> pa.Table:
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(LATENT_SHAPE, generator=generator) for _ in keys]
    lengths = [3 + 2 * index for index in range(len(keys))]
    contexts = [torch.randn(length, TEXT_DIM, generator=generator) for length in lengths]
    return pa.table(
        {
            "key": keys,
            "uri": [f"s3://raw/{key}.mp4" for key in keys],
            "caption": [f"caption of {key}" for key in keys],
            "start": [0.5] * len(keys),
            "source_size": [100] * len(keys),
            "source_version": ["etag"] * len(keys),
            "latents": [tensor_to_bytes(t, dtype) for t in latents],
            "latents_dtype": [dtype] * len(keys),
            "latents_shape": [list(LATENT_SHAPE)] * len(keys),
            "context": [tensor_to_bytes(c, dtype) for c in contexts],
            "context_dtype": [dtype] * len(keys),
            "context_length": lengths,
            "context_dim": [TEXT_DIM] * len(keys),
        }
    )


def _config(output: str, **overrides) -> prep_config.PreprocessConfig:
    settings = {"input": "/unused", "output": output, "frames": 17, "height": 32, "width": 48}
    return prep_config.parse_config({**settings, **overrides})


def _plan(keys: list[str]) -> planning.Plan:
    clips = [
        planning.PlannedClip(key, f"s3://raw/{key}.mp4", f"caption of {key}", 0.5, 100, "etag")
        for key in keys
    ]
    return planning.Plan(clips=clips, todo=[], errors=[], already_present=0, duplicates=0)


def _commit(output: str, keys: list[str], **overrides) -> committing.Summary:
    config = _config(output, **overrides)
    return committing.commit(config, describe_model("tiny"), _plan(keys), "run-2", 0, 1.0)


def test_dataset_reads_back_what_was_written(store: str) -> None:
    output = storage.join(store, "latents")
    first, second = _records(["k1", "k2"], seed=1), _records(["k3"], seed=2)
    write_shard(first, output, "shards/run-1-a.parquet", "run-1")
    write_shard(second, output, "shards/run-1-b.parquet", "run-1")
    summary = _commit(output, ["k1", "k2", "k3"])
    assert (summary.clips, summary.shards) == (3, 2)

    dataset = LatentDataset(output, verify_hashes=True)
    assert len(dataset) == 3 and dataset.keys == ["k1", "k2", "k3"]
    expected = {row["key"]: row for row in first.to_pylist() + second.to_pylist()}
    for record in dataset:
        row = expected[record.key]
        assert record.latents.dtype == torch.float32 and record.latents.shape == LATENT_SHAPE
        assert torch.equal(record.latents, tensor_from_bytes(row["latents"], "float32", LATENT_SHAPE))
        assert record.context.shape == (512, TEXT_DIM) and record.context_length == row["context_length"]
        unpadded = tensor_from_bytes(row["context"], "float32", (row["context_length"], TEXT_DIM))
        assert torch.equal(record.context, pad_context(unpadded))
        assert (record.uri, record.caption, record.start) == (row["uri"], row["caption"], 0.5)
    assert dataset[-1].key == "k3"
    with pytest.raises(IndexError):
        dataset[3]

    info = dataset.info
    codec = load_components("tiny", device="cpu").codec
    assert info.model_id == "tiny" and info.architecture == get_preset("tiny").architecture
    assert np.allclose(info.latents_mean, codec.latents_mean.flatten().tolist())
    assert np.allclose(info.latents_std, (1 / codec.inverse_std).flatten().tolist(), rtol=1e-6)
    assert (info.frames, info.height, info.width, info.fps) == (17, 32, 48, 16.0)
    assert info.latent_shape == LATENT_SHAPE and info.context_dim == TEXT_DIM
    manifest = storage.read_manifest(output)
    listed = {entry.path: entry for entry in manifest.files}
    for shard in manifest.extra["shards"]:
        sidecar = read_sidecar(storage.join(output, shard["path"] + ".json"))
        assert listed[shard["path"]].sha256 == sidecar.sha256 == shard["sha256"]
        assert listed[shard["path"]].size == sidecar.size == shard["size"]
    assert manifest.extra["counts"] == {"clips": 3, "shards": 2, "skipped": 0}


def test_commit_lists_each_key_once_and_removes_debris(tmp_path: Path) -> None:
    output = str(tmp_path / "latents")
    write_shard(_records(["k1", "k2"], seed=1), output, "shards/run-1-a.parquet", "run-1")
    write_shard(_records(["k2", "k3"], seed=2), output, "shards/run-1-b.parquet", "run-1")  # k2 again
    write_shard(_records(["stale"], seed=3), output, "shards/run-1-c.parquet", "run-1")  # not wanted
    write_shard(_records(["k4"], seed=4), output, "shards/run-1-d.parquet", "run-1")
    storage.delete(storage.join(output, "shards/run-1-d.parquet.json"))  # killed before its sidecar
    with pytest.raises(RuntimeError, match="1 clips were neither written nor reported"):
        _commit(output, ["k1", "k2", "k3", "k4"])
    _commit(output, ["k1", "k2", "k3"])

    dataset = LatentDataset(output)
    assert sorted(dataset.keys) == ["k1", "k2", "k3"]
    assert [record.key for record in dataset] == dataset.keys
    first_k2 = _records(["k1", "k2"], seed=1).to_pylist()[1]
    assert torch.equal(dataset[1].latents, tensor_from_bytes(first_k2["latents"], "float32", LATENT_SHAPE))
    committed = {entry.path for entry in storage.read_manifest(output).files}
    assert "shards/run-1-c.parquet" not in committed  # only shards the index uses are committed
    assert not (tmp_path / "latents/shards/run-1-d.parquet").exists()  # debris removed


def test_recommit_without_changes_writes_nothing(tmp_path: Path) -> None:
    output = str(tmp_path / "latents")
    write_shard(_records(["k1"], seed=1), output, "shards/run-1-a.parquet", "run-1")
    _commit(output, ["k1"])
    before = {path: path.stat().st_mtime_ns for path in Path(output).rglob("*")}
    _commit(output, ["k1"])
    assert {path: path.stat().st_mtime_ns for path in Path(output).rglob("*")} == before


def test_bfloat16_dataset_reads_as_float32(tmp_path: Path) -> None:
    output = str(tmp_path / "latents")
    records = _records(["k1"], seed=5, dtype="bfloat16")
    write_shard(records, output, "shards/run-1-a.parquet")
    _commit(output, ["k1"], latents_dtype="bfloat16", context_dtype="bfloat16")
    record = LatentDataset(output)[0]
    assert record.latents.dtype == torch.float32
    expected = tensor_from_bytes(records.to_pylist()[0]["latents"], "bfloat16", LATENT_SHAPE)
    assert torch.equal(record.latents, expected)
    assert LatentDataset(output).info.extra["latents"]["dtype"] == "bfloat16"


def test_architecture_check_names_the_difference(tmp_path: Path) -> None:
    output = str(tmp_path / "latents")
    write_shard(_records(["k1"], seed=1), output, "shards/run-1-a.parquet")
    _commit(output, ["k1"])
    LatentDataset(output, architecture=get_preset("tiny"))  # the model it was made for
    with pytest.raises(UserInputError, match=r"text_dim: dataset 32 vs model 4096"):
        LatentDataset(output, architecture=get_preset("wan2.1-t2v-14b"))
    deeper = {**get_preset("tiny").architecture, "num_layers": 3}
    dataset = LatentDataset(output, architecture=deeper)  # same data layout: usable
    with pytest.raises(UserInputError, match=r"num_layers: dataset 2 vs model 3"):
        dataset.check_architecture(deeper, strict=True)


def test_reader_refuses_corrupt_uncommitted_and_foreign_directories(tmp_path: Path) -> None:
    output = tmp_path / "latents"
    write_shard(_records(["k1"], seed=1), str(output), "shards/run-1-a.parquet")
    _commit(str(output), ["k1"])
    shard = output / "shards/run-1-a.parquet"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes: only the hash notices
    shard.write_bytes(bytes(data))
    LatentDataset(str(output))
    with pytest.raises(CorruptDataError, match="sha256"):
        LatentDataset(str(output), verify_hashes=True)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptDataError, match="size"):
        LatentDataset(str(output))
    with pytest.raises(UncommittedError):
        LatentDataset(str(tmp_path / "nothing"))
    other = tmp_path / "model"
    (other / "a.txt").parent.mkdir()
    (other / "a.txt").write_text("x")
    storage.commit_dir(str(other), extra={"kind": "model"})
    with pytest.raises(UserInputError, match="is not a latent dataset"):
        LatentDataset(str(other))


def test_shard_tables_must_have_the_schema() -> None:
    table = _records(["k1"], seed=1)
    assert conform_shard_table(table.select(list(reversed(table.column_names)))).schema == SHARD_SCHEMA
    with pytest.raises(ValueError, match=r"lack columns \['context_dim'\]"):
        conform_shard_table(table.drop_columns(["context_dim"]))
    with pytest.raises(ValueError, match="must not hold a key twice"):
        write_shard(pa.concat_tables([table, table]), "/tmp/unused", "shards/x.parquet")


def test_sidecar_is_written_after_a_complete_shard(tmp_path: Path) -> None:
    output = str(tmp_path / "latents")
    info = write_shard(_records(["k1", "k2"], seed=1), output, "shards/run-1-a.parquet", "run-1")
    sidecar = json.loads((tmp_path / "latents/shards/run-1-a.parquet.json").read_text())
    assert sidecar["keys"] == ["k1", "k2"] and sidecar["records"] == 2 and sidecar["run"] == "run-1"
    assert sidecar["size"] == (tmp_path / "latents/shards/run-1-a.parquet").stat().st_size == info.size
