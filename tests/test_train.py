"""The training job (pusa_ray.training, pusa_ray.distributed.train, jobs/train.py).

Fast tests cover the config, the data order, the objective, the DeepSpeed config and the checks
that run before any worker starts. The Ray tests run the job on the session's local 2-CPU cluster
(two workers at half a CPU each, gloo, ZeRO-2, the tiny preset) against the moto S3 server: a
LoRA overfit whose checkpoints, ZeRO partitions and exported adapter are inspected; the same run
with a worker killed after a checkpoint; the same run with its driver killed and rerun; and a
short full fine-tune from a randomly initialised preset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pusa_ray import storage, video
from pusa_ray.checkpoints.adapters import list_adapters
from pusa_ray.checkpoints.lora import PUSA_TARGET_MODULES, load_adapter
from pusa_ray.data.latents import LatentDataset, encode_prompts_unpadded, tensor_to_bytes, write_shard
from pusa_ray.distributed import train as dtrain
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import describe_model
from pusa_ray.models.loading import apply_adapters, load_components
from pusa_ray.pipeline import default_settings, generate
from pusa_ray.preprocessing import commit as committing
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import plan as planning
from pusa_ray.training import checkpoint as train_checkpoint
from pusa_ray.training.config import TimestepSettings, TrainConfig, load_config, parse_config
from pusa_ray.training.data import DataLayout, build_probe_set, load_batch, split_records
from pusa_ray.training.model import build_training_model, export_adapter, trainable_parameters
from pusa_ray.training.objective import batch_loss, warmup_factor
from tests.serve_helpers import moving_square

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "train.py"
FRAMES, HEIGHT, WIDTH = 17, 32, 48  # 5 latent frames of 4x6
CLIPS = 4
STEPS, EVERY = 30, 10
SNAPSHOT = train_checkpoint.RAY_SNAPSHOT

# ----------------------------------------------------------------------------------------------
# Data and configs


@pytest.fixture(scope="module")
def records() -> pa.Table:
    """A handful of clips encoded by the tiny preset's VAE and text encoder, as shard records."""
    tiny = load_components("tiny", device="cpu")
    keys = [f"clip{index}" for index in range(CLIPS)]
    captions = [f"a square crossing a plain background, number {index}" for index in range(CLIPS)]
    pixels = torch.stack(
        [video.frames_to_tensor(moving_square(FRAMES, HEIGHT, WIDTH, i)) for i in range(CLIPS)]
    )
    latents = tiny.codec.encode(pixels)  # [N, C, F, h, w]
    contexts = encode_prompts_unpadded(tiny.tokenizer, tiny.text_encoder, captions)
    rows = len(keys)
    return pa.table(
        {
            "key": keys,
            "uri": [f"/raw/{key}.mp4" for key in keys],
            "caption": captions,
            "start": [0.0] * rows,
            "source_size": [1] * rows,
            "source_version": ["1"] * rows,
            "latents": [tensor_to_bytes(latent, "float32") for latent in latents],
            "latents_dtype": ["float32"] * rows,
            "latents_shape": [list(latents.shape[1:])] * rows,
            "context": [tensor_to_bytes(context, "float32") for context in contexts],
            "context_dtype": ["float32"] * rows,
            "context_length": [context.shape[0] for context in contexts],
            "context_dim": [context.shape[1] for context in contexts],
        }
    )


def write_dataset(records: pa.Table, output: str) -> str:
    """Commit `records` as a latent dataset through the preprocessing job's own writer and commit."""
    write_shard(records, output, "shards/run-1-a.parquet", "run-1")
    config = prep_config.parse_config(
        {"input": "/unused", "output": output, "frames": FRAMES, "height": HEIGHT, "width": WIDTH}
    )
    keys, captions = records.column("key").to_pylist(), records.column("caption").to_pylist()
    clips = [
        planning.PlannedClip(k, f"/raw/{k}.mp4", c, 0.0, 1, "1") for k, c in zip(keys, captions, strict=True)
    ]
    plan = planning.Plan(clips=clips, todo=[], errors=[], already_present=0, duplicates=0)
    committing.commit(config, describe_model("tiny"), plan, "run-1", 0, 1.0)
    return output


@pytest.fixture(scope="module")
def local_latents(records: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_dataset(records, str(tmp_path_factory.mktemp("latents") / "tiny"))


def config_dict(latents: str, storage_path: str, name: str, **overrides: Any) -> dict[str, Any]:
    """The tests' LoRA recipe: rank 16 on the tiny DiT, 2 workers at half a CPU, 30 steps."""
    settings: dict[str, Any] = {
        "latents": latents,
        "lora": {"rank": 16, "alpha": 16},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2},
        "steps": STEPS,
        "validation": {"every": EVERY, "probe_samples": CLIPS, "hold_out": False},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"every": EVERY, "num_to_keep": None},
        "run": {"name": name, "storage_path": storage_path, "max_failures": 2},
        "log_every": 5,
    }
    return {**settings, **overrides}


def write_config(path: Path, settings: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Config


def test_shipped_configs_parse() -> None:
    paper = load_config(REPO / "jobs/configs/train.wan14b.yaml")
    assert (paper.lora.rank, paper.lora.alpha, paper.optimizer.lr) == (512, 512.0, 1e-5)
    assert list(paper.lora.target_modules) == PUSA_TARGET_MODULES
    assert (paper.scaling.workers, paper.scaling.gpus_per_worker, paper.batch_size) == (8, 1, 1)
    assert paper.precision == "bf16" and paper.gradient_checkpointing and paper.steps == 900
    assert paper.timesteps.p_async == 1.0 and paper.export is not None
    small = load_config(REPO / "jobs/configs/train.wan1.3b.yaml")
    assert small.scaling.gpus_per_worker == 1 and small.precision == "bf16"
    tiny = load_config(REPO / "jobs/configs/train.tiny.yaml")
    assert tiny.model.base == "tiny" and tiny.scaling.gpus_per_worker == 0
    assert tiny.latents == prep_config.load_config(REPO / "jobs/configs/preprocess.tiny.yaml").output


def test_defaults_follow_the_paper_and_survive_the_trip_to_the_workers() -> None:
    config = parse_config({"latents": "s3://b/latents", "run": {"name": "r", "storage_path": "s3://b/runs"}})
    assert (config.method, config.lora.rank, config.lora.alpha, config.optimizer.lr) == (
        "lora",
        512,
        512.0,
        1e-5,
    )
    assert (config.timesteps.p_async, config.timesteps.mode, config.batch_size) == (1.0, "uniform", 1)
    assert config.gradient_checkpointing and config.precision == "auto"
    assert TrainConfig.model_validate(json.loads(json.dumps(config.plain()))) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, r"colour: unknown key"),
        ({"lora": {"rank": 0}}, r"lora\.rank: Input should be greater than or equal to 1"),
        ({"lora": {"rnak": 8}}, r"lora\.rnak: unknown key"),
        ({"latents": None}, r"latents: Input should be a valid string"),
        ({"latents": "gs://bucket/x"}, r"latents: 'gs://bucket/x': expected a local path, file:// or s3://"),
        ({"timesteps": {"p_async": 1.5}}, r"timesteps\.p_async: Input should be less than or equal to 1"),
        ({"timesteps": {"mode": "cosine"}}, r"timesteps\.mode: Input should be 'uniform' or 'shifted-grid'"),
        ({"timesteps": {"p_lead": -0.1}}, r"timesteps\.p_lead: Input should be greater than or equal to 0"),
        (
            {"timesteps": {"mode": "shifted-grid", "condition_shift": 5.0}},
            r"timesteps: condition_shift must be 1 with mode shifted-grid \(its grid is already shifted\)",
        ),
        ({"run": {"name": "a/b", "storage_path": "x"}}, r"run\.name: 'a/b' must be letters"),
        ({"method": "full"}, r"lora settings differ from the defaults but method is 'full'"),
        ({"scaling": {"workers": 0}}, r"scaling\.workers: Input should be greater than or equal to 1"),
    ],
)
def test_bad_configs_fail_with_clear_messages(change: dict, message: str) -> None:
    settings = {**config_dict("latents", "runs", "r"), **change}
    with pytest.raises(UserInputError, match=message):
        parse_config(settings)


def test_a_missing_latents_uri_is_named() -> None:
    settings = config_dict("x", "runs", "r")
    del settings["latents"]
    with pytest.raises(UserInputError, match=r"latents: Field required"):
        parse_config(settings)


# ----------------------------------------------------------------------------------------------
# Data order, objective, schedule


def test_the_data_order_is_a_function_of_the_step_only() -> None:
    train = tuple(range(3, 10))  # 7 training records
    layout = DataLayout(train, seed=5, world_size=2, batch_size=2, accumulation=3)
    assert layout.samples_per_step == 12
    stream = [layout.record_index(slot) for slot in range(7 * 4)]
    for epoch in range(4):
        assert sorted(stream[7 * epoch : 7 * (epoch + 1)]) == list(train)  # each epoch: every record once
    assert stream[:7] != stream[7:14]  # and a new order each epoch
    again = DataLayout(train, seed=5, world_size=2, batch_size=2, accumulation=3)
    assert [again.record_index(s) for s in range(28)] == stream  # no state: a resumed run sees the same
    # A step's slots are the same set of stream positions whatever the split into ranks and micro-batches.
    single = DataLayout(train, seed=5, world_size=1, batch_size=12, accumulation=1)
    split = sorted(s for m in range(3) for r in range(2) for s in layout.slots(4, m, r))
    assert split == single.slots(4, 0, 0) == list(range(48, 60))
    other_seed = DataLayout(train, seed=6, world_size=2, batch_size=2, accumulation=3)
    assert [other_seed.record_index(slot) for slot in range(28)] != stream


def test_batches_and_probe_sets_are_reproducible(local_latents: str) -> None:
    dataset = LatentDataset(local_latents)
    train, probe = split_records(len(dataset), 2, hold_out=True, seed=1)
    assert len(probe) == 2 and sorted(train + probe) == list(range(CLIPS))
    layout = DataLayout(tuple(train), seed=0, world_size=2, batch_size=1, accumulation=1)
    first = load_batch(dataset, layout, 3, 0, 1, TimestepSettings(p_async=1.0))
    second = load_batch(dataset, layout, 3, 0, 1, TimestepSettings(p_async=1.0))
    assert first.latents.shape == (1, 16, 5, 4, 6) and first.sigmas.shape == (1, 5)
    assert torch.equal(first.noise, second.noise) and torch.equal(first.sigmas, second.sigmas)
    assert len(set(first.sigmas[0].tolist())) == 5  # p_async = 1: a timestep per frame
    synchronous = load_batch(dataset, layout, 3, 0, 1, TimestepSettings(p_async=0.0, mode="shifted-grid"))
    assert len(set(synchronous.sigmas[0].tolist())) == 1 and synchronous.weights.min() >= 0
    probe_set = build_probe_set(dataset, probe, 7, TimestepSettings())
    assert torch.equal(
        probe_set.batch.noise, build_probe_set(dataset, probe, 7, TimestepSettings()).batch.noise
    )
    shards = [probe_set.shard(rank, 3) for rank in range(3)]
    assert [len(s) if s else 0 for s in shards] == [1, 1, 0]


def test_warm_up_is_linear_then_constant() -> None:
    factor = warmup_factor(3)
    assert [factor(n) for n in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0)(0) == 1.0


def test_the_lora_model_trains_only_the_adapter_and_the_loss_uses_the_flow_math(local_latents: str) -> None:
    config = parse_config(config_dict(local_latents, "runs", "r"))
    model = build_training_model(config)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert len(names) == 2 * 2 * len(PUSA_TARGET_MODULES)  # A and B, 2 blocks, 10 targets
    dataset = LatentDataset(local_latents)
    batch = load_batch(dataset, DataLayout((0, 1), 0, 1, 1, 1), 0, 0, 0, TimestepSettings())
    loss = batch_loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in trainable_parameters(model))

    @torch.no_grad()
    def frame_mse() -> torch.Tensor:
        """The same numbers by hand: x = (1 - s) x0 + s eps, target eps - x0, MSE per frame [B, F]."""
        sigma = batch.sigmas[:, None, :, None, None]
        noisy = (1 - sigma) * batch.latents + sigma * batch.noise
        velocity = model(noisy, batch.sigmas * 1000, batch.context)
        return (velocity - (batch.noise - batch.latents)).pow(2).mean(dim=(1, 3, 4))

    assert torch.allclose(loss.detach(), frame_mse().mean(), rtol=1e-5)
    # A given frame (sigma 0, a conditioned layout) is left out: the mean is over the others.
    batch.sigmas[0, 0] = 0.0
    with torch.no_grad():
        loss = batch_loss(model, batch)
    assert torch.allclose(loss, frame_mse()[batch.sigmas > 0].mean(), rtol=1e-5)


def test_the_zero_initialised_adapter_does_not_change_the_sampler(local_latents: str, tmp_path: Path) -> None:
    config = parse_config(config_dict(local_latents, "runs", "r"))
    adapter = export_adapter(build_training_model(config), config, tmp_path / "step0.safetensors", step=0)
    assert all(v.abs().sum() == 0 for k, v in load_file(adapter).items() if ".lora_B." in k)
    assert torch.equal(sample_latents(None), sample_latents(str(adapter)))


def sample_latents(adapter: str | None) -> torch.Tensor:
    """Final latents of a short, fixed-seed T2V generation on the tiny preset, with an adapter at alpha 1."""
    components = load_components("tiny", device="cpu")
    if adapter is not None:
        apply_adapters(components, [(adapter, 1.0)])
    settings = default_settings(components, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=3, seed=3)
    return generate(components, "a square crossing a plain background", [], settings).latents


def test_the_deepspeed_config_is_zero_stage_2() -> None:
    config = parse_config(config_dict("x", "runs", "r", gradient_accumulation=4, batch_size=2))
    settings = dtrain.deepspeed_config(config, world_size=8, bf16=True)
    assert settings["zero_optimization"]["stage"] == 2 and settings["bf16"] == {"enabled": True}
    assert settings["train_batch_size"] == 64 and settings["gradient_accumulation_steps"] == 4
    assert "offload_optimizer" not in settings["zero_optimization"]
    offload = parse_config(config_dict("x", "runs", "r", optimizer={"offload": True}))
    settings = dtrain.deepspeed_config(offload, world_size=2, bf16=False)
    assert settings["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert settings["zero_force_ds_cpu_optimizer"] is False  # torch AdamW stays the client optimizer


def test_workers_without_cuda_get_gloo_even_when_given_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = []
    monkeypatch.setattr(
        dtrain._TorchBackend, "on_start", lambda self, group, config: chosen.append(config.backend)
    )

    class Group:
        def __init__(self, cuda: list[bool]) -> None:
            self.cuda = cuda

        def execute(self, function: Any) -> list[bool]:
            assert function is dtrain._cuda_usable
            return self.cuda

    backend = dtrain.DeviceAwareTorchConfig().backend_cls()
    backend.on_start(Group([False, False]), dtrain.DeviceAwareTorchConfig())  # fake GPUs, no CUDA
    backend.on_start(Group([True, False]), dtrain.DeviceAwareTorchConfig())
    backend.on_start(Group([True, True]), dtrain.DeviceAwareTorchConfig())
    assert chosen == ["gloo", "gloo", "nccl"]


def test_s3_storage_for_ray_uses_the_boto3_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    path, filesystem = dtrain.storage_for_ray("s3://bucket/runs/")
    assert path == "bucket/runs" and type(filesystem).__name__ == "S3FileSystem"
    assert "127.0.0.1:9999" in repr(filesystem.__reduce__())
    local, none = dtrain.storage_for_ray("out/runs")
    assert none is None and Path(local).is_absolute()


def test_bad_configs_and_data_fail_before_any_worker_starts(
    local_latents: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_workers(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a worker was about to start")

    monkeypatch.setattr(dtrain, "build_trainer", no_workers)
    cases = {
        "unknown key": ({"colour": "red"}, "colour: unknown key"),
        "rank 0": ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than or equal to 1"),
        "no dataset": ({"latents": str(tmp_path / "nothing")}, "does not exist or is not committed"),
        "other model": (
            {"model": {"base": "wan2.1-t2v-1.3b", "init": "random"}},
            "architecture does not match the model given (text_dim: dataset 32 vs model 4096)",
        ),
        "no weights": ({"model": {"base": "wan2.1-t2v-14b"}}, "has no embedded weights"),
        "bad target": (
            {"lora": {"rank": 8, "target_modules": ["attn1.to_q", "attn1.q"]}},
            "lora.target_modules ['attn1.q'] name no Linear layer of the DiT (known: ['attn1.to_k'",
        ),
        "nothing to train": (
            {"validation": {"probe_samples": 8, "hold_out": True}},
            "leaves none to train on",
        ),
    }
    for name, (change, message) in cases.items():
        settings = {**config_dict(local_latents, str(tmp_path / "runs"), "r"), **change}
        assert dtrain.main(["--config", write_config(tmp_path / "bad.yaml", settings)]) == 2, name
        error = capsys.readouterr().err
        assert error.startswith("pusa-ray train: error: ") and message in error, (name, error)
    missing = settings_without(config_dict(local_latents, "runs", "r"), "latents")
    assert dtrain.main(["--config", write_config(tmp_path / "bad.yaml", missing)]) == 2
    assert "latents: Field required" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def settings_without(settings: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in settings.items() if name != key}


# ----------------------------------------------------------------------------------------------
# On Ray


@pytest.fixture(scope="module")
def bucket(s3_server: Any) -> Iterator[str]:
    name = f"train-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="module")
def s3_latents(records: pa.Table, bucket: str) -> str:
    return write_dataset(records, f"{bucket}/latents/tiny")


@pytest.fixture
def ray_env(ray_cluster: None, torch_extensions: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", torch_extensions)  # forwarded to the workers


def run_training(settings: dict[str, Any]) -> dtrain.TrainSummary:
    return dtrain.run(parse_config(settings))


@pytest.fixture(scope="module")
def lora_run(ray_cluster: None, torch_extensions: str, s3_latents: str, bucket: str) -> dict[str, Any]:
    """The reference run: LoRA, 2 workers, 30 steps, checkpoints every 10 in S3, 2 kept, exported."""
    settings = config_dict(
        s3_latents,
        f"{bucket}/runs",
        "reference",
        checkpoint={"every": EVERY, "num_to_keep": 2},
        export={"prefix": f"{bucket}/adapters", "name": "tiny-pusa"},
    )
    settings["validation"] = {**settings["validation"], "videos": {"prompts": ["a square"], "steps": 2}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_EXTENSIONS_DIR", torch_extensions)
        started = time.perf_counter()
        summary = run_training(settings)
    return {"summary": summary, "settings": settings, "seconds": time.perf_counter() - started}


def final_adapter(checkpoint_uri: str) -> dict[str, torch.Tensor]:
    return load_adapter(storage.join(checkpoint_uri, "adapter.safetensors")).weights


def assert_same_adapter(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.ray
@pytest.mark.s3
def test_a_lora_run_overfits_a_handful_of_clips(lora_run: dict[str, Any], bucket: str) -> None:
    summary = lora_run["summary"]
    assert summary.steps == STEPS and summary.restarts == 0
    assert summary.probe_loss < 0.85 * summary.initial_probe_loss, summary.line()
    assert summary.exported == f"{bucket}/adapters/tiny-pusa/adapter.safetensors"
    assert summary.line().startswith(f"train: {STEPS} steps")
    snapshot = json.loads(storage.read_bytes(f"{bucket}/runs/reference/{SNAPSHOT}"))
    metrics = snapshot["latest_checkpoint_result"]["metrics"]
    for key in ("loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "probe_loss"):
        assert isinstance(metrics[key], float), key
    steps = [record["step"] for record in metrics["history"]]  # every step since the previous report
    assert steps == list(range(steps[0], STEPS + 1)) and metrics["step"] == STEPS


@pytest.mark.ray
@pytest.mark.s3
def test_checkpoints_are_committed_in_s3_and_only_the_last_two_kept(
    lora_run: dict[str, Any], bucket: str
) -> None:
    run = f"{bucket}/runs/reference"
    names = sorted({path.split("/", 1)[0] for path in storage.list_files(run) if "/" in path})
    assert names == ["checkpoint-00000020", "checkpoint-00000030"]  # num_to_keep: 2
    for name in names:
        manifest = storage.verify_dir(f"{run}/{name}", hashes=True)
        files = {entry.path for entry in manifest.files}
        tag = f"deepspeed/step-{name[-8:]}"
        assert {
            f"samples/step-{name[-8:]}-0.mp4",  # the fixed-seed sample video, at the dataset's size
            "adapter.safetensors",
            "trainer_state.json",
            f"{tag}/mp_rank_00_model_states.pt",
            f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        } <= files
        writers = manifest.extra["writers"]
        assert [writer["rank"] for writer in writers] == [0, 1] and manifest.extra["step"] == int(name[-8:])
    assert lora_run["summary"].checkpoint == f"{run}/checkpoint-00000030"


@pytest.mark.ray
@pytest.mark.s3
def test_zero_2_partitions_the_optimizer_state_across_the_workers(
    lora_run: dict[str, Any], bucket: str
) -> None:
    state = train_checkpoint.read_state(lora_run["summary"].checkpoint)
    zero = state["zero"]
    assert zero["optimizer"] == "DeepSpeedZeroOptimizer" and zero["stage"] == 2
    trainable = zero["trainable_numel"]
    assert trainable == sum(value.numel() for value in final_adapter(lora_run["summary"].checkpoint).values())
    assert len(zero["partition_numel"]) == 2 and sum(zero["partition_numel"]) >= trainable
    for partition, moments in zip(zero["partition_numel"], zero["exp_avg_numel"], strict=True):
        assert partition == moments <= trainable // 2 + 64  # each rank: its half (plus alignment)


@pytest.mark.ray
@pytest.mark.s3
def test_the_exported_adapter_is_listed_and_changes_the_sampler(
    lora_run: dict[str, Any], bucket: str
) -> None:
    listed = {item["id"]: item for item in list_adapters(f"{bucket}/adapters")}
    entry = listed["tiny-pusa"]
    assert entry["architecture"] == load_components("tiny", device="cpu").spec.architecture
    assert (entry["rank"], entry["step"], entry["base_model"]) == (16, STEPS, "tiny")
    exported = load_adapter(entry["uri"]).weights
    assert_same_adapter(exported, final_adapter(lora_run["summary"].checkpoint))
    assert not torch.allclose(sample_latents(entry["uri"]), sample_latents(None), atol=1e-3)


def registered_step(run: str) -> int | None:
    """The step of the latest checkpoint in Ray's registry (the snapshot it keeps in storage)."""
    try:
        snapshot = json.loads(storage.read_bytes(f"{run}/{SNAPSHOT}"))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"][-8:]) if latest else None


def wait_for_registration(run: str, step: int, alive: Any, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        registered = registered_step(run)
        if registered is not None and registered >= step:
            return registered
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= {step} registered under {run}")


def train_worker_pids() -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


def steps_by_checkpoint(run: str) -> dict[int, dict[str, Any]]:
    names = sorted(
        {path.split("/", 1)[0] for path in storage.list_files(run) if path.startswith("checkpoint-0")}
    )
    return {int(name[-8:]): train_checkpoint.read_state(f"{run}/{name}") for name in names}


def assert_continuous(states: dict[int, dict[str, Any]], resumed_from: int) -> None:
    """Every step ran exactly once in the committed history, and the run resumed at `resumed_from`."""
    trained = [step for state in states.values() for step in state["steps"]]
    assert trained == list(range(1, STEPS + 1))  # never skipped, never repeated past a checkpoint
    after = states[resumed_from + EVERY]
    assert (after["resumed_from"], after["restarts"], after["steps"][0]) == (
        resumed_from,
        1,
        resumed_from + 1,
    )


@pytest.mark.ray
@pytest.mark.s3
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(
    lora_run: dict[str, Any], s3_latents: str, bucket: str, ray_env: None
) -> None:
    run = f"{bucket}/runs/killed"
    killed: dict[str, Any] = {}
    finished = threading.Event()

    def kill_after_first_checkpoint() -> None:
        wait_for_registration(run, EVERY, lambda: not finished.is_set())
        pids = train_worker_pids()
        os.kill(pids[-1], signal.SIGKILL)
        killed.update(pid=pids[-1], workers=pids)
        time.sleep(0.5)  # the dead worker's reports can no longer complete a checkpoint
        killed["registered"] = registered_step(run)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        summary = run_training(config_dict(s3_latents, f"{bucket}/runs", "killed"))
    finally:
        finished.set()
        killer.join(timeout=30)
    assert killed.get("pid") and len(killed["workers"]) == 2, killed
    assert summary.steps == STEPS and summary.restarts == 1
    states = steps_by_checkpoint(run)
    assert sorted(states) == [10, 20, 30]
    assert_continuous(states, resumed_from=killed["registered"])
    assert_same_adapter(final_adapter(summary.checkpoint), final_adapter(lora_run["summary"].checkpoint))


@pytest.mark.ray
@pytest.mark.s3
def test_rerunning_after_losing_the_driver_resumes_at_the_last_step(
    lora_run: dict[str, Any],
    local_latents: str,
    bucket: str,
    tmp_path: Path,
    ray_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray

    run = f"{bucket}/runs/driver-lost"
    config = write_config(tmp_path / "job.yaml", config_dict(local_latents, f"{bucket}/runs", "driver-lost"))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "job.log", "wb") as log:
        job = subprocess.Popen(
            [sys.executable, str(JOB), "--config", config], env=env, stdout=log, stderr=log
        )
    try:
        registered = wait_for_registration(run, EVERY, lambda: job.poll() is None)
    finally:
        job.kill()  # the driver is lost: its trainer, workers and placement group go with it
        job.wait(timeout=60)
    assert registered < STEPS, (tmp_path / "job.log").read_text()[-3000:]
    registered = registered_step(run)

    assert dtrain.main(["--config", config]) == 0
    states = steps_by_checkpoint(run)
    assert_continuous(states, resumed_from=registered)
    assert_same_adapter(
        final_adapter(f"{run}/checkpoint-{STEPS:08d}"), final_adapter(lora_run["summary"].checkpoint)
    )
    # The same run name with other timesteps is another run: refused before any work, kept intact.
    changed = config_dict(local_latents, f"{bucket}/runs", "driver-lost")
    changed["timesteps"] = {"p_lead": 0.2}
    capsys.readouterr()
    assert dtrain.main(["--config", write_config(tmp_path / "changed.yaml", changed)]) == 2
    assert "was started with timesteps" in capsys.readouterr().err
    assert steps_by_checkpoint(run) == states


@pytest.mark.ray
def test_a_full_fine_tune_from_a_random_preset_lowers_its_probe_loss(
    local_latents: str, tmp_path: Path, ray_env: None
) -> None:
    settings = settings_without(config_dict(local_latents, str(tmp_path / "runs"), "scratch"), "lora")
    settings.update(
        method="full",
        model={"base": "tiny", "init": "random"},
        steps=20,
        export={"prefix": str(tmp_path / "models"), "name": "tiny-scratch"},
        checkpoint={"every": 20, "num_to_keep": 1},
    )
    summary = run_training(settings)
    assert summary.probe_loss < 0.8 * summary.initial_probe_loss, summary.line()
    state = train_checkpoint.read_state(summary.checkpoint)
    assert state["zero"]["trainable_numel"] == sum(
        p.numel() for p in load_components("tiny").model.parameters()
    )
    trained = load_components(summary.exported, device="cpu")  # a model directory the CLI can use
    seeded = load_components("tiny", device="cpu")
    assert not torch.equal(
        trained.model.transformer.proj_out.weight, seeded.model.transformer.proj_out.weight
    )  # fresh weights from the run seed, then trained


def test_resources_per_worker_reach_ray_and_gpu_configs_fill_whole_training_nodes(tmp_path: Path) -> None:
    """`scaling.resources_per_worker` asks cluster.yaml's `train_node`: a gpu_train node takes as many
    one-GPU ranks as it has GPUs (8 ranks: one node, 16: two) and no rank fits a gpu_serve node."""
    nodes = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    train_node, serve_node = nodes["gpu_train"]["resources"], nodes["gpu_serve"]["resources"]
    for name in ("train.wan14b.yaml", "train.wan1.3b.yaml"):
        scaling = load_config(REPO / "jobs/configs" / name).scaling
        ranks_per_node = train_node["GPU"] / scaling.gpus_per_worker
        assert scaling.resources_per_worker["train_node"] * ranks_per_node == train_node["train_node"], name
        assert "train_node" not in serve_node
    settings = {"workers": 8, "gpus_per_worker": 1, "resources_per_worker": {"train_node": 0.125}}
    trainer = dtrain.build_trainer(parse_config(config_dict("x", str(tmp_path), "r", scaling=settings)))
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 1.0, "train_node": 0.125}
    for bad, message in [
        ({"GPU": 1}, "'GPU' is not a custom resource"),
        ({"train_node": 0}, "'train_node': the amount must be > 0"),
    ]:
        with pytest.raises(UserInputError, match=f"scaling.resources_per_worker: {message}"):
            parse_config(config_dict("x", "runs", "r", scaling={"resources_per_worker": bad}))


def test_caption_dropout_swaps_in_the_null_context_per_slot_reproducibly(local_latents: str) -> None:
    dataset = LatentDataset(local_latents)
    layout = DataLayout(tuple(range(CLIPS)), seed=0, world_size=1, batch_size=CLIPS, accumulation=1)
    plain = load_batch(dataset, layout, 0, 0, 0, TimestepSettings())
    null = torch.full(plain.context.shape[1:], 7.0)
    dropped = [load_batch(dataset, layout, step, 0, 0, TimestepSettings(), 0.5, null) for step in range(8)]
    again = load_batch(dataset, layout, 0, 0, 0, TimestepSettings(), 0.5, null)
    assert torch.equal(dropped[0].context, again.context)  # decided by the slot's seed, not by chance
    assert torch.equal(dropped[0].noise, plain.noise) and torch.equal(dropped[0].sigmas, plain.sigmas)
    rows = torch.cat([batch.context for batch in dropped])  # [8 * CLIPS, L, D]
    is_null = (rows == 7.0).flatten(1).all(dim=1)
    assert 0.2 < is_null.float().mean().item() < 0.8  # about half of 32 slots
    kept = ~is_null[:CLIPS]
    assert torch.equal(dropped[0].context[kept], plain.context[kept])  # the others keep their captions
    with pytest.raises(ValueError, match="null context"):
        load_batch(dataset, layout, 0, 0, 0, TimestepSettings(), 0.5, None)
