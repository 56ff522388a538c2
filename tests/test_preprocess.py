"""The Ray Data preprocessing job (pusa_ray.distributed.preprocess, jobs/preprocess.py).

Fast tests cover the config, listing the inputs and decoding one clip. The Ray tests run the job
on the session's local 2-CPU cluster (tiny preset, 17 frames at 32x48) over synthetic clips plus
broken ones, against a real S3 endpoint, and compare its records with a single-process encoding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pusa_ray import storage, video
from pusa_ray.config import get_preset
from pusa_ray.data.latents import LatentDataset
from pusa_ray.distributed import preprocess
from pusa_ray.distributed.preprocess import main
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import describe_model
from pusa_ray.models.loading import load_codec, load_components, load_text_encoder, save_model_dir
from pusa_ray.models.text import encode_prompts
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import decode as decoding
from pusa_ray.preprocessing import plan as planning
from pusa_ray.preprocessing.config import load_config, parse_config
from pusa_ray.preprocessing.decode import ClipError
from tests.serve_helpers import moving_square

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "preprocess.py"
FRAMES, HEIGHT, WIDTH = 17, 32, 48
# Fractional CPUs: whole-CPU actors starve Ray Data's other tasks on a 2-CPU cluster (DESIGN.md).
TEST_RESOURCES = {
    "decode": {"num_cpus": 0.25},
    "vae": {"num_cpus": 0.5, "torch_threads": 1},
    "text": {"num_cpus": 0.25, "batch_size": 4, "torch_threads": 1},
    "writer": {"num_cpus": 0.25},
    "io_threads": 8,
}


def counting_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Frame i is flat grey level 4 * i (+ 8): which source frame was sampled can be read back."""
    levels = 8 + 4 * np.arange(frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()


def config_dict(input_uri: str, output: str, **overrides) -> dict:
    settings = {
        "input": input_uri,
        "output": output,
        "model": "tiny",
        "frames": FRAMES,
        "fps": 16,
        "height": HEIGHT,
        "width": WIDTH,
        "shard_records": 2,
        "resources": TEST_RESOURCES,
    }
    return {**settings, **overrides}


def write_config(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Config


def test_shipped_configs_parse() -> None:
    tiny = load_config(REPO / "jobs/configs/preprocess.tiny.yaml")
    assert tiny.model == "tiny" and (tiny.frames - 1) % 4 == 0
    big = load_config(REPO / "jobs/configs/preprocess.wan14b.yaml")
    assert (big.frames, big.height, big.width, big.fps) == (81, 480, 832, 16)
    assert big.resources.vae.num_gpus >= 1 and big.resources.text.num_gpus >= 1
    assert big.context_dtype == "bfloat16"


def test_defaults_follow_the_issue() -> None:
    config = parse_config({"input": "s3://bucket/raw/", "output": "s3://bucket/latents"})
    assert (config.frames, config.fps, config.height, config.width) == (81, 16, 480, 832)
    assert config.max_crop_discard == 0.5 and config.input.uri == "s3://bucket/raw/"
    again = prep_config.PreprocessConfig.model_validate(config.model_dump(mode="json"))
    assert again == config  # what crosses to the Ray workers validates to the same config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, r"colour: unknown key"),
        ({"resources": {"vae": {"gpus": 1}}}, r"resources\.vae\.gpus: unknown key"),
        ({"frames": 0}, r"frames: must be positive, got 0"),
        ({"max_crop_discard": 1.5}, r"max_crop_discard: Input should be less than or equal to 1"),
        ({"latents_dtype": "int8"}, r"latents_dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
        (
            {"output": "gs://bucket/x"},
            r"output: 'gs://bucket/x': expected a local path, file:// or s3:// URI",
        ),
        ({"resources": {"decode": {"num_gpus": 1}}}, r"resources\.decode: decoding runs on CPUs"),
    ],
)
def test_bad_configs_fail_with_clear_messages(change: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        parse_config({"input": "raw", "output": "out", **change})


@pytest.mark.parametrize(
    ("model", "video", "message"),
    [
        ("tiny", (80, 64, 64), r"frames: frames must be 1 \+ 4\*k \(e\.g\. 17\), got 80"),
        ("tiny", (17, 40, 64), r"height: must be a multiple of 16 for tiny \(codec 8x, patch 2\), got 40"),
        ("pusa-mini-scratch", (9, 32, 36), r"width: must be a multiple of 8 for pusa-mini-scratch"),
    ],
)
def test_the_models_codec_sets_the_frame_and_size_rules(model: str, video: tuple, message: str) -> None:
    described = describe_model(model)
    with pytest.raises(UserInputError, match=message):
        described.check_video(*video)
    described.check_video(17, 64, 64)  # valid for both: 1 + 4k frames, multiples of 16
    if model.startswith("pusa-mini"):
        described.check_video(10, 40, 24)  # one latent per frame, 4x4 blocks under 2x2 patches


def test_main_rejects_a_bad_config_before_any_ray_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray work started")

    monkeypatch.setattr(preprocess, "build_pipeline", no_ray)
    monkeypatch.setattr(preprocess, "plan", no_ray)
    config = write_config(
        tmp_path / "bad.yaml", {"input": "raw", "output": str(tmp_path / "out"), "frames": 0}
    )
    assert main(["--config", config]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pusa-ray preprocess: error: invalid preprocess config") and "frames" in error
    wrong_for_the_codec = {"input": "raw", "output": str(tmp_path / "out"), "model": "tiny", "frames": 80}
    assert main(["--config", write_config(tmp_path / "bad-frames.yaml", wrong_for_the_codec)]) == 2
    assert "frames must be 1 + 4*k" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Listing inputs


def _clip_files(folder: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        video.write_mp4(folder / name, moving_square(FRAMES, HEIGHT, WIDTH, index), 16)


def _plan(settings: dict) -> planning.Plan:
    config = parse_config(settings)
    return planning.plan(config, describe_model(config.model))


def test_manifests_jsonl_and_csv_resolve_paths_and_report_bad_rows(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _clip_files(raw / "clips", ["a.mp4", "b.mp4"])
    rows = [
        {"video": "clips/a.mp4", "caption": "first"},
        {"video": str(raw / "clips/b.mp4"), "caption": "second", "start": 0.25},
        {"video": "clips/a.mp4", "caption": "first"},  # the same clip twice: encoded once
        {"video": "../outside.mp4", "caption": "escapes the folder"},
        {"caption": "no video"},
        "not an object",
    ]
    (raw / "manifest.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n{broken\n")
    planned = _plan({"input": str(raw / "manifest.jsonl"), "output": str(tmp_path / "out")})
    assert [(clip.uri, clip.caption, clip.start) for clip in planned.todo] == [
        (str(raw / "clips/a.mp4"), "first", 0.0),
        (str(raw / "clips/b.mp4"), "second", 0.25),
    ]
    assert planned.duplicates == 1
    assert sorted(error["uri"].rsplit(":", 1)[1] for error in planned.errors) == ["4", "5", "6", "8"]
    assert {error["kind"] for error in planned.errors} == {"bad_manifest_row"}

    (raw / "manifest.csv").write_text('video,caption,start\nclips/a.mp4,first,\nclips/b.mp4,"x, y",1.5\n')
    planned = _plan({"input": str(raw / "manifest.csv"), "output": str(tmp_path / "out")})
    assert [(clip.caption, clip.start) for clip in planned.todo] == [("first", 0.0), ("x, y", 1.5)]
    (raw / "wrong.csv").write_text("path,prompt\nclips/a.mp4,first\n")
    with pytest.raises(UserInputError, match=r"needs columns video,caption\[,start\] or file_name,text"):
        _plan({"input": str(raw / "wrong.csv"), "output": str(tmp_path / "out")})


def test_metadata_csv_and_sidecar_folders(tmp_path: Path) -> None:
    diffsynth = tmp_path / "diffsynth"
    _clip_files(diffsynth, ["a.mp4", "b.mp4"])
    (diffsynth / "metadata.csv").write_text("file_name,text\na.mp4,a cat\nb.mp4,a dog\n")
    planned = _plan({"input": str(diffsynth), "output": str(tmp_path / "out1")})
    assert sorted(clip.caption for clip in planned.todo) == ["a cat", "a dog"]

    sidecar = tmp_path / "sidecar"
    _clip_files(sidecar, ["a.mp4", "sub/b.MP4", "c.mp4", "d.mp4"])
    (sidecar / "a.txt").write_text("a cat\n")
    (sidecar / "sub/b.txt").write_text("a dog")
    (sidecar / "d.txt").write_text("   \n")
    (sidecar / "notes.txt").write_text("not a caption of anything")
    planned = _plan({"input": str(sidecar), "output": str(tmp_path / "out2")})
    assert sorted((Path(clip.uri).name, clip.caption) for clip in planned.todo) == [
        ("a.mp4", "a cat"),
        ("b.MP4", "a dog"),
    ]
    assert sorted((Path(e["uri"]).name, e["kind"]) for e in planned.errors) == [
        ("c.mp4", "missing_caption"),
        ("d.mp4", "empty_caption"),
    ]
    with pytest.raises(UserInputError, match="is empty or does not exist"):
        _plan({"input": str(tmp_path / "nowhere"), "output": str(tmp_path / "out3")})


def test_keys_follow_content_start_caption_and_encoding_settings(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _clip_files(raw, ["a.mp4"])
    (raw / "a.txt").write_text("a cat")
    settings = {"input": str(raw), "output": str(tmp_path / "out")}
    key = _plan(settings).todo[0].key
    assert _plan(settings).todo[0].key == key
    assert _plan({**settings, "resources": {"vae": {"actors": 3}}, "shard_records": 5}).todo[0].key == key
    assert _plan({**settings, "max_crop_discard": 0.1}).todo[0].key == key
    assert _plan({**settings, "frames": 21}).todo[0].key != key
    assert _plan({**settings, "context_dtype": "bfloat16"}).todo[0].key != key
    (raw / "a.txt").write_text("a dog")
    assert _plan(settings).todo[0].key != key
    (raw / "a.txt").write_text("a cat")
    video.write_mp4(raw / "a.mp4", moving_square(FRAMES + 4, HEIGHT, WIDTH, 5), 16)  # new content
    assert _plan(settings).todo[0].key != key


# ----------------------------------------------------------------------------------------------
# One clip


def test_frames_are_sampled_at_the_target_rate_from_the_start_time() -> None:
    assert decoding.source_frame_indices(0.0, 5, 16, 16).tolist() == [0, 1, 2, 3, 4]
    assert decoding.source_frame_indices(0.5, 5, 16, 30).tolist() == [15, 16, 18, 20, 22]
    assert decoding.source_frame_indices(0.0, 5, 16, 8).tolist() == [0, 0, 1, 1, 2]  # slower source


def test_prepare_clip_samples_crops_and_rejects(tmp_path: Path) -> None:
    path = tmp_path / "count.mp4"
    video.write_mp4(path, counting_clip(40, 48, 64), fps=30)
    clip = decoding.prepare_clip(path, 0.5, 9, 16.0, 32, 48, 0.5)  # [9, 32, 48, 3]
    assert clip.shape == (9, 32, 48, 3) and clip.dtype == np.uint8
    expected = 8 + 4 * decoding.source_frame_indices(0.5, 9, 16, 30)
    assert np.abs(clip.reshape(9, -1).mean(axis=1) - expected).max() < 2  # the right source frames

    with pytest.raises(ClipError, match="need 53 frames at 30 fps; the video has 40") as error:
        decoding.prepare_clip(path, 0.75, 17, 16.0, 32, 48, 0.5)
    assert error.value.kind == "too_short" and error.value.permanent
    discard = video.crop_discard_fraction(48, 64, 32, 96)
    with pytest.raises(ClipError, match=f"would discard {discard:.0%} of it") as error:
        decoding.prepare_clip(path, 0.0, 9, 16.0, 32, 96, 0.5)
    assert error.value.kind == "crop" and error.value.details == {"crop_discard": round(discard, 6)}
    assert decoding.prepare_clip(path, 0.0, 9, 16.0, 32, 96, 0.6).shape == (9, 32, 96, 3)
    (tmp_path / "text.mp4").write_text("not a video at all")
    with pytest.raises(ClipError, match="cannot read video") as error:
        decoding.prepare_clip(tmp_path / "text.mp4", 0.0, 9, 16.0, 32, 48, 0.5)
    assert error.value.kind == "unreadable"


# ----------------------------------------------------------------------------------------------
# The model, part by part, from a committed s3:// directory


@pytest.mark.s3
def test_actors_load_only_their_part_of_an_s3_model(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PUSA_RAY_CACHE", str(tmp_path / "cache"))
    tiny = load_components("tiny", device="cpu")
    model = save_model_dir(tiny, f"{s3_bucket}/models/tiny")
    described, preset = (
        describe_model(model),
        describe_model("tiny"),
    )
    assert described.architecture == preset.architecture == get_preset("tiny").architecture
    assert described.vae == preset.vae and described.text_encoder["dim"] == 32
    assert described.fingerprint != preset.fingerprint

    codec = load_codec(model, torch.device("cpu"))
    pixels = video.frames_to_tensor(moving_square(FRAMES, HEIGHT, WIDTH, 1))[None]  # [1, 3, F, H, W]
    assert torch.allclose(codec.encode(pixels), tiny.codec.encode(pixels), atol=1e-6)
    tokenizer, encoder, length = load_text_encoder(model, torch.device("cpu"))
    ours = encode_prompts(tokenizer, encoder, ["a cat"], length)
    assert torch.allclose(ours, encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a cat"]), atol=1e-6)
    fetched = {path.relative_to(tmp_path / "cache").parts[3] for path in (tmp_path / "cache").rglob("*.*")}
    assert "transformer" not in fetched and {"vae", "text_encoder", "tokenizer"} <= fetched


# ----------------------------------------------------------------------------------------------
# The job on Ray


GOOD = {  # name: (frames, height, width, source fps, start s, caption)
    "a.mp4": (17, 32, 48, 16, 0.0, "a red square drifts right"),
    "b.mp4": (21, 32, 48, 16, 0.0, "a longer clip, cut to 17 frames"),
    "c.mp4": (20, 48, 64, 16, 0.0, "a 4:3 clip, centre-cropped"),
    "d.mp4": (40, 32, 48, 24, 0.25, "24 fps from a quarter second in"),
    "e.mp4": (17, 64, 96, 16, 0.0, "twice the size, scaled down"),
}
BROKEN = {  # name: (kind, part of the reason, caption)
    "truncated.mp4": ("unreadable", "cannot read video", "cut in half"),
    "zero.mp4": ("empty_file", "0 bytes", "nothing"),
    "three.mp4": ("too_short", "the video has 3", "three frames"),
    "text.mp4": ("unreadable", "cannot read video", "not a video"),
    "wide.mp4": ("crop", "would discard 70% of it", "far too wide"),
    "silent.mp4": ("empty_caption", "the caption is empty", "   "),
    "gone.mp4": ("missing", "no such object", "listed, never uploaded"),
}


def write_inputs(folder: Path) -> None:
    """The GOOD clips and the BROKEN files, locally."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, (frames, height, width, fps, _, _)) in enumerate(GOOD.items()):
        video.write_mp4(folder / name, moving_square(frames, height, width, seed), fps)
    data = (folder / "a.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "zero.mp4").write_bytes(b"")
    video.write_mp4(folder / "three.mp4", moving_square(3, HEIGHT, WIDTH, 7), 16)
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    video.write_mp4(folder / "wide.mp4", moving_square(FRAMES, 32, 160, 8), 16)
    video.write_mp4(folder / "silent.mp4", moving_square(FRAMES, HEIGHT, WIDTH, 9), 16)


def reference_latents(path: Path, start: float) -> torch.Tensor:
    """Single-process reference: decode, pick frames by hand, crop/resize, encode. [C, F_lat, h, w]"""
    frames, fps = video.read_video(path)
    indices = [int(np.floor((start + i / 16) * fps + 1e-6)) for i in range(FRAMES)]
    pixels = video.frames_to_tensor(video.resize_center_crop(frames[indices], HEIGHT, WIDTH))
    return load_components("tiny", device="cpu").codec.encode(pixels[None])[0]


def output_state(output: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(output, name)) for name in storage.list_files(output)}


@pytest.mark.ray
@pytest.mark.s3
def test_job_on_s3_matches_a_single_process_encoding(
    ray_cluster, s3_bucket: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PUSA_RAY_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "raw"
    write_inputs(local)
    raw = f"{s3_bucket}/raw"
    for name in [*GOOD, *BROKEN]:
        if (local / name).exists():
            storage.upload_file(local / name, f"{raw}/clips/{name}")
    rows = [{"video": f"clips/{n}", "caption": c, "start": s} for n, (*_, s, c) in GOOD.items()]
    rows += [{"video": f"clips/{name}", "caption": caption} for name, (_, _, caption) in BROKEN.items()]
    storage.write_bytes(f"{raw}/manifest.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    output = f"{s3_bucket}/latents/tiny"
    config = write_config(tmp_path / "job.yaml", config_dict(f"{raw}/manifest.jsonl", output))

    assert main(["--config", config]) == 0
    summary = capsys.readouterr().out
    assert "preprocess: 5 clips written, 7 skipped, 0 already present;" in summary and "clips/s" in summary

    errors = [json.loads(line) for line in storage.read_bytes(f"{output}/errors.jsonl").decode().splitlines()]
    reported = {record["uri"].rsplit("/", 1)[1]: record for record in errors}
    assert set(reported) == set(BROKEN)
    for name, (kind, reason, _) in BROKEN.items():
        assert reported[name]["kind"] == kind and reason in reported[name]["reason"], reported[name]

    dataset = LatentDataset(output, verify_hashes=True, architecture=get_preset("tiny"))
    assert len(dataset) == len(GOOD) and len(set(dataset.keys)) == len(GOOD)
    tiny = load_components("tiny", device="cpu")
    for record in dataset:
        name = record.uri.rsplit("/", 1)[1]
        *_, start, caption = GOOD[name]
        assert (record.caption, record.start) == (caption, start)
        assert record.latents.shape == (16, 5, 4, 6)
        torch.testing.assert_close(
            record.latents, reference_latents(local / name, start), atol=1e-4, rtol=1e-4
        )
        expected = encode_prompts(tiny.tokenizer, tiny.text_encoder, [caption])[0]  # [512, D]
        torch.testing.assert_close(record.context, expected, atol=1e-5, rtol=1e-5)
        assert record.context[record.context_length :].abs().max() == 0
    extra = dataset.manifest.extra
    assert extra["model"]["architecture"] == get_preset("tiny").architecture
    assert extra["text_encoder"]["id"] == "tiny/text_encoder"
    assert extra["counts"] == {"clips": 5, "shards": len(extra["shards"]), "skipped": 7}

    def no_ray(*args, **kwargs):
        raise AssertionError("a rerun with nothing to do started Ray work")

    before = output_state(output)
    monkeypatch.setattr(preprocess, "build_pipeline", no_ray)
    assert main(["--config", config]) == 0
    assert "preprocess: 0 clips written, 7 skipped, 5 already present;" in capsys.readouterr().out
    assert output_state(output) == before  # nothing new, nothing rewritten


@pytest.mark.ray
def test_a_killed_run_restarts_and_holds_each_clip_once(ray_cluster, tmp_path: Path, capsys) -> None:
    import ray

    raw, output = tmp_path / "raw", tmp_path / "latents"
    raw.mkdir()
    names = [f"clip{index}.mp4" for index in range(8)]
    for index, name in enumerate(names):
        video.write_mp4(raw / name, moving_square(FRAMES + 4 * (index % 3), HEIGHT, WIDTH, index), 16)
    (raw / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},clip number {n}\n" for n in names))
    config = write_config(tmp_path / "job.yaml", config_dict(str(raw), str(output), shard_records=1))

    # The real entry point, as `ray job submit` runs it, attached to the test's cluster.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "job.log", "wb") as log:
        job = subprocess.Popen(
            [sys.executable, str(JOB), "--config", config], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 240
    sidecars: list[Path] = []
    while job.poll() is None and not sidecars and time.monotonic() < deadline:
        time.sleep(0.05)
        sidecars = sorted((output / "shards").glob("*.json")) if (output / "shards").is_dir() else []
    if job.poll() is None:
        os.kill(job.pid, signal.SIGKILL)  # half-way: some shards written, no manifest
    job.wait(timeout=60)
    log_text = (tmp_path / "job.log").read_text()
    assert sidecars or job.returncode == 0, log_text[-3000:]
    storage.delete(str(output / "_MANIFEST.json"))  # in case the job was faster than the kill
    sidecars = sorted((output / "shards").glob("*.json"))
    sidecars[0].unlink()  # and one shard lost its sidecar: killed between the two writes
    complete_before = len(sidecars) - 1

    assert main(["--config", config]) == 0
    summary = capsys.readouterr().out
    assert f"{len(names) - complete_before} clips written, 0 skipped, {complete_before} already" in summary

    dataset = LatentDataset(str(output), verify_hashes=True)
    assert sorted(record.uri for record in dataset) == sorted(str(raw / name) for name in names)
    listed = [read(output, shard["path"]) for shard in dataset.manifest.extra["shards"]]
    assert sorted(key for keys in listed for key in keys) == sorted(dataset.keys)  # each clip once
    assert not sidecars[0].with_suffix("").exists()  # the shard without a sidecar was removed
    assert not (output / "_work").exists()


def read(output: Path, shard: str) -> list[str]:
    return list(json.loads((output / f"{shard}.json").read_text())["keys"])


@pytest.mark.ray
def test_a_killed_encoder_actor_is_replaced_and_the_run_completes(ray_cluster, tmp_path: Path) -> None:
    import threading

    from tests.serve_helpers import sigkill_descendant, wait_for

    raw, output = tmp_path / "raw", tmp_path / "latents"
    raw.mkdir()
    names = [f"clip{index}.mp4" for index in range(12)]
    for index, name in enumerate(names):
        video.write_mp4(raw / name, moving_square(FRAMES, HEIGHT, WIDTH, index), 16)
    (raw / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},clip number {n}\n" for n in names))
    config = load_config(
        write_config(tmp_path / "job.yaml", config_dict(str(raw), str(output), shard_records=1))
    )

    summary: list = []
    job = threading.Thread(target=lambda: summary.append(preprocess.run(config)))
    job.start()
    shards = output / "shards"
    wait_for(lambda: (shards.is_dir() and any(shards.glob("*.json"))) or not job.is_alive(), 240, "a shard")
    assert job.is_alive(), "the run finished before its actor could be killed"
    sigkill_descendant("MapBatches(EncodeLatents)")  # the VAE actor, mid-run
    job.join(timeout=300)

    assert summary and summary[0].written == len(names)  # Ray Data replaced the actor: no rerun needed
    dataset = LatentDataset(str(output), verify_hashes=True)
    assert sorted(record.uri for record in dataset) == sorted(str(raw / name) for name in names)
    listed = [read(output, shard["path"]) for shard in dataset.manifest.extra["shards"]]
    assert sorted(key for keys in listed for key in keys) == sorted(dataset.keys)  # each clip once
