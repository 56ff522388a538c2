"""`pusa-ray generate` end to end for every task on the tiny preset, and its errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pusa_ray import video
from pusa_ray.cli import main
from pusa_ray.conditioning import encode_plan
from pusa_ray.models.loading import load_components
from pusa_ray.pipeline import default_settings, generate
from pusa_ray.tasks import TaskInputs, VideoShape, build_conditions

SIZE = ["--model", "tiny", "--height", "32", "--width", "48", "--steps", "2"]  # not the default model


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A PNG, a JPEG and two clips of moving squares, written as real files."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "first.png")
    Image.fromarray(255 - image).save(root / "last.jpg")
    for name, frames in (("clip.mp4", 25), ("other.mp4", 21)):
        clip = np.zeros((frames, 32, 48, 3), dtype=np.uint8)
        for i in range(frames):
            clip[i, 8:20, i : i + 12] = (200, 40, 40)
        video.write_mp4(root / name, clip, fps=16)
    (root / "notes.txt").write_text("not an image")
    return root


TASK_ARGS = {
    "t2v": [],
    "i2v": ["--image", "{m}/first.png"],
    "start-end": ["--image", "{m}/first.png", "--end-image", "{m}/last.jpg"],
    "keyframes": [
        "--cond",
        "0:{m}/first.png:0.0",
        "--cond",
        "f:8:{m}/last.jpg:0.3",
        "--cond=-1:{m}/first.png:0.5",
    ],
    "extend": ["--video", "{m}/clip.mp4", "--cond-frames", "5"],
    "complete": ["--video", "{m}/clip.mp4", "--cond-frames", "5", "--end-frames", "4"],
    "transition": [
        "--video",
        "{m}/clip.mp4",
        "--end-video",
        "{m}/other.mp4",
        "--cond-frames",
        "5",
        "--end-frames",
        "4",
    ],
}


@pytest.mark.parametrize("task", list(TASK_ARGS))
def test_every_task_writes_a_video(task, media, tmp_path, capsys):
    out = tmp_path / f"{task}.mp4"
    args = [a.format(m=media) for a in TASK_ARGS[task]]
    code = main(
        [
            "generate",
            "--task",
            task,
            "--prompt",
            "a red square",
            "--frames",
            "17",
            *SIZE,
            *args,
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert video.probe_video(out) == {"frames": 17, "height": 32, "width": 48, "fps": 16.0}


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


@pytest.mark.parametrize("task", [t for t in TASK_ARGS if t != "t2v"])
def test_frozen_frames_are_kept_bit_for_bit(task, media, tiny):
    shape = VideoShape(17, 32, 48)
    keyframes = (
        (("0", media / "first.png", 0.0), ("f:8", media / "last.jpg", 0.0)) if task == "keyframes" else ()
    )
    flags = TASK_ARGS[task]
    args = {flag: flags[i + 1] for i, flag in enumerate(flags) if flag.startswith("--") and "=" not in flag}
    inputs = TaskInputs(
        task=task,
        image=media / "first.png" if "--image" in args else None,
        end_image=media / "last.jpg" if "--end-image" in args else None,
        keyframes=keyframes,
        video=media / "clip.mp4" if "--video" in args else None,
        end_video=media / "other.mp4" if "--end-video" in args else None,
        cond_frames=int(args["--cond-frames"]) if "--cond-frames" in args else None,
        end_frames=int(args["--end-frames"]) if "--end-frames" in args else None,
        noise=None if task == "keyframes" else (0.0,),
    )
    conditions = build_conditions(inputs, shape)
    plan = encode_plan(conditions, tiny.codec, shape.num_latents)
    result = generate(
        tiny, "a red square", conditions, default_settings(tiny, frames=17, height=32, width=48, steps=3)
    )
    assert plan.latent_indices and set(plan.noise_multipliers) == {0.0}
    for k, index in enumerate(plan.latent_indices):
        assert torch.equal(result.latents[0, :, index], plan.latents[:, k]), f"latent {index} moved"
    free = [i for i in range(shape.num_latents) if i not in plan.latent_indices]
    noise_only = generate(
        tiny, "a red square", [], default_settings(tiny, frames=17, height=32, width=48, steps=3)
    )
    assert not torch.equal(result.latents[0, :, free], noise_only.latents[0, :, free])


def test_i2v_noisy_condition_is_not_frozen(media, tiny):
    shape = VideoShape(9, 32, 48)
    conditions = build_conditions(TaskInputs(task="i2v", image=media / "first.png", noise=(0.2,)), shape)
    plan = encode_plan(conditions, tiny.codec, shape.num_latents)
    result = generate(tiny, "x", conditions, default_settings(tiny, frames=9, height=32, width=48, steps=2))
    assert not torch.equal(result.latents[0, :, 0], plan.latents[:, 0])


def test_the_lead_schedule_changes_t2v_only(media, tiny, tmp_path):
    """T2V under "lead" runs another schedule; with a given frame the video already leads with it."""
    size = {"frames": 9, "height": 32, "width": 48, "steps": 4}
    sync, lead = (default_settings(tiny, **size, schedule=schedule) for schedule in ("sync", "lead"))
    t2v_sync, t2v_lead = (generate(tiny, "a red square", [], settings).latents for settings in (sync, lead))
    assert not torch.equal(t2v_sync, t2v_lead)
    conditions = build_conditions(TaskInputs(task="i2v", image=media / "first.png"), VideoShape(9, 32, 48))
    i2v_sync, i2v_lead = (generate(tiny, "a red square", conditions, s).latents for s in (sync, lead))
    assert torch.equal(i2v_sync, i2v_lead)
    # The flag reaches the sampler: the CLI's latents are the lead ones.
    out = tmp_path / "lead.safetensors"
    argv = ["generate", "--prompt", "a red square", *SIZE[:6], "--steps", "4", "--frames", "9"]
    argv += ["--schedule", "lead", "--out", str(tmp_path / "a.mp4"), "--save-latents", str(out), "--quiet"]
    assert main(argv) == 0
    assert torch.equal(load_file(out)["latents"], t2v_lead)


def test_console_script_writes_mp4_and_latents(media, tmp_path):
    out, latents = tmp_path / "a.mp4", tmp_path / "a.safetensors"
    command = [
        shutil.which("pusa-ray", path=os.path.dirname(sys.executable)) or "pusa-ray",
        "generate",
        "--prompt",
        "a red square",
        "--frames",
        "13",
        *SIZE,
        "--fps",
        "12",
        "--seed",
        "5",
        "--out",
        str(out),
        "--save-latents",
        str(latents),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "denoising" in done.stderr  # the progress bar
    assert video.probe_video(out) == {"frames": 13, "height": 32, "width": 48, "fps": 12.0}
    saved = load_file(latents)["latents"]
    assert saved.shape == (1, 16, 4, 4, 6) and saved.dtype == torch.float32
    again = tmp_path / "b.safetensors"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a red square",
                "--frames",
                "13",
                *SIZE,
                "--seed",
                "5",
                "--quiet",
                "--out",
                str(tmp_path / "b.mp4"),
                "--save-latents",
                str(again),
            ]
        )
        == 0
    )
    assert torch.equal(load_file(again)["latents"], saved)
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a red square",
                "--frames",
                "13",
                *SIZE,
                "--seed",
                "6",
                "--quiet",
                "--out",
                str(tmp_path / "c.mp4"),
                "--save-latents",
                str(again),
            ]
        )
        == 0
    )
    assert not torch.equal(load_file(again)["latents"], saved)


BAD = [
    (["--task", "i2v", "--image", "{m}/missing.png"], "missing.png"),
    (["--task", "i2v", "--image", "{m}/notes.txt"], "cannot read image"),
    (["--task", "i2v"], "needs --image"),
    (["--task", "t2v", "--image", "{m}/first.png"], "does not take --image"),
    (["--frames", "8"], "got 8"),
    (["--height", "40"], "got 40"),
    (["--width", "0"], "got 0"),
    (["--task", "keyframes", "--cond", "7:{m}/first.png:0"], "'7' is out of range"),
    (
        ["--task", "keyframes", "--cond", "0:{m}/first.png:0", "--cond", "f:0:{m}/last.jpg:0"],
        "two conditions on latent 0",
    ),
    (["--task", "keyframes", "--cond", "0:{m}/first.png"], "is not POS:PATH:NOISE"),
    (["--task", "keyframes", "--cond", "0:{m}/first.png:1.5"], "1.5"),
    (["--task", "i2v", "--image", "{m}/first.png", "--noise", "-0.5"], "-0.5"),
    (["--task", "i2v", "--image", "{m}/first.png", "--noise", "a,b"], "'a,b'"),
    (
        [
            "--task",
            "start-end",
            "--image",
            "{m}/first.png",
            "--end-image",
            "{m}/last.jpg",
            "--noise",
            "0.1,0.2,0.3",
        ],
        "got 3 noise multipliers for 2",
    ),
    (["--task", "extend", "--video", "{m}/clip.mp4", "--cond-frames", "12"], "got 12"),
    (["--task", "extend", "--video", "{m}/other.mp4", "--cond-frames", "9", "--frames", "5"], "do not fit"),
    (
        [
            "--task",
            "transition",
            "--video",
            "{m}/clip.mp4",
            "--end-video",
            "{m}/other.mp4",
            "--end-frames",
            "24",
            "--frames",
            "33",
        ],
        "has 21 frames, 24 are needed",
    ),
    (["--prompt", "  "], "prompt is empty"),
    (["--model", "nope"], "'nope'"),
    (["--model", "wan2.1-t2v-14b"], "no embedded weights"),
    (["--steps", "0"], "got 0"),
    (["--schedule", "lead", "--steps", "1"], "needs steps >= 2"),
    (["--schedule", "late"], "invalid choice: 'late'"),
    (["--lora", "x.safetensors"], "x.safetensors"),
    (["--lora-alpha", "1.0"], "without --lora"),
    (["--task", "morph"], "'morph'"),
    (["--cache", "fast"], "the policy must be one of off, first-block"),
    (["--cache", "first-block:2"], "the threshold must lie in [0, 1]"),
    (["--attention-backend", "flashy"], "'flashy' is unknown"),
    (["--attention-backend", "flash"], "'flash' does not run on this machine"),
    (["--vae-tiling", "--model", "pusa-mini"], "codec has no VAE to tile"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_line(args, message, media, tmp_path, capsys):
    argv = ["generate", "--prompt", "a red square", *SIZE, "--out", str(tmp_path / "x.mp4"), "--quiet"]
    argv += [a.format(m=media) for a in args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_distributed_jobs_are_reached_through_the_cli(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("colour: red\n")
    assert main(["preprocess", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert main(["batch-generate", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "Traceback" not in err


def test_client_connection_flags_go_before_or_after_the_action(monkeypatch):
    from pusa_ray.cli import build_parser

    monkeypatch.delenv("PUSA_RAY_URL", raising=False)
    monkeypatch.delenv("PUSA_RAY_API_KEY", raising=False)
    parse = build_parser().parse_args
    before = parse(["client", "--url", "http://a:1", "--api-key", "k", "submit", "--prompt", "x"])
    after = parse(["client", "submit", "--prompt", "x", "--url", "http://a:1", "--api-key", "k"])
    assert (before.url, before.api_key) == (after.url, after.api_key) == ("http://a:1", "k")
    neither = parse(["client", "status", "vid_1"])
    assert (neither.url, neither.api_key) == ("http://127.0.0.1:8000", None)
    both = parse(["client", "--url", "http://a:1", "list", "--url", "http://b:2"])
    assert both.url == "http://b:2"  # the later one wins
