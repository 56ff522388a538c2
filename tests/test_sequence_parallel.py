"""Sequence parallelism on the CPU: 2 gloo ranks (real processes) against the 1-rank forward.

The video has 27 tokens (3 latent frames of 3 x 3 patches), so the ranks hold 14 and 13 and the
boundary falls inside a frame: the per-frame modulation must follow the tokens it belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pusa_ray.models.vta import FrameRuns
from pusa_ray.parallel_launch import free_port
from pusa_ray.sequence_parallel import communication_bytes, token_ranges
from pusa_ray.timesteps import frame_schedule, sigma_to_timestep

pytestmark = pytest.mark.timeout(300)

WORLD = 2
LATENTS = (2, 16, 3, 6, 6)  # [cond, uncond] x C x F x h x w: 27 tokens with 2x2 patches


def cases() -> dict[str, torch.Tensor]:
    """Timesteps [B, F] (or [B]) of the tasks: uniform (T2V), a noisy first frame (I2V with noise),
    keyframes with different noise, and a row of the `lead` schedule (frames on their own steps)."""
    t = 800.0
    lead = sigma_to_timestep(frame_schedule(4, 5.0, 3, "lead")[1])
    return {
        "t2v": torch.full((2,), t),
        "i2v noise": torch.tensor([[0.2 * t, t, t]] * 2),
        "keyframes": torch.tensor([[0.0, t, 0.3 * t]] * 2),
        "lead": lead[None].expand(2, -1).clone(),
    }


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(LATENTS, generator=generator)
    context = torch.randn(2, 16, 32, generator=generator)
    return latents, context


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pusa_ray.models.loading import load_components
    from pusa_ray.sequence_parallel import SequenceParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = load_components("tiny", device="cpu").model
        parallel = SequenceParallel.current()
        latents, context = inputs()
        results = {name: parallel.forward(model, latents, steps, context) for name, steps in cases().items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("sp")
    mp.start_processes(_rank, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def test_two_ranks_equal_one_for_every_kind_of_timesteps(ranks):
    from pusa_ray.models.loading import load_components

    model = load_components("tiny", device="cpu").model
    latents, context = inputs()
    with torch.no_grad():
        for name, steps in cases().items():
            single = model(latents, steps, context)
            for rank, results in enumerate(ranks):
                assert results[name].shape == single.shape, name
                difference = (results[name] - single).abs().max().item()
                assert difference <= 1e-5, (name, rank, difference)
            assert torch.equal(ranks[0][name], ranks[1][name])  # every rank holds the whole velocity


def test_token_ranges_and_frame_runs():
    assert token_ranges(27, 2) == [(0, 14), (14, 27)]
    assert token_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]
    # 9 tokens a frame: rank 0 holds frame 0 and 5 tokens of frame 1; rank 1 the rest of 1 and frame 2
    assert FrameRuns.of_range(0, 14, 9).runs == [(0, 1, 9), (1, 1, 5)]
    assert FrameRuns.of_range(14, 27, 9).runs == [(1, 1, 4), (2, 1, 9)]
    assert FrameRuns.of_range(3, 40, 9).runs == [(0, 1, 6), (1, 3, 9), (4, 1, 4)]
    with pytest.raises(ValueError):
        FrameRuns.of_range(5, 5, 9)


def test_communication_volume():
    # Wan2.1-14B at 480p over 8 ranks, bf16: 40 blocks x 4 all-to-alls + the output all-gather
    sent = communication_bytes(1, 32760, 5120, 40, 64, 8, 2)
    assert sent == 2 * (40 * 4 * 4095 * 5120 * 7 // 8 + 4095 * 64 * 7)
    assert communication_bytes(1, 32760, 5120, 40, 64, 1, 2) == 0


GENERATE = ["generate", "--model", "tiny", "--prompt", "a red square", "--frames", "9", "--height", "48"]
GENERATE += ["--width", "48", "--steps", "3", "--seed", "4", "--quiet"]


def test_generate_on_two_cpu_ranks_equals_one_rank(tmp_path):
    from safetensors.torch import load_file

    from pusa_ray.cli import main

    for ranks in (1, 2):
        argv = [
            *GENERATE,
            "--out",
            str(tmp_path / f"{ranks}.mp4"),
            "--save-latents",
            str(tmp_path / f"{ranks}.st"),
        ]
        assert main([*argv, "--gpus", str(ranks), "--device", "cpu"]) == 0
    one, two = (load_file(tmp_path / f"{ranks}.st")["latents"] for ranks in (1, 2))
    assert (one - two).abs().max() <= 1e-5
    assert (tmp_path / "2.mp4").stat().st_size > 0  # written once, by rank 0


REFUSED = [
    (["--gpus", "3", "--device", "cpu"], "tiny has 2 attention heads, which 3 ranks must divide"),
    (["--gpus", "2", "--device", "cpu", "--cache", "first-block"], "does not run sequence parallel"),
    (["--gpus", "0", "--device", "cpu"], "--gpus must be >= 1"),
]
if torch.cuda.device_count() < 2:  # GPU ranks where there are too few GPUs (this CPU machine: none)
    REFUSED.append((["--gpus", "2"], f"this machine has {torch.cuda.device_count()} GPUs"))


@pytest.mark.parametrize("extra,message", REFUSED)
def test_what_cannot_run_on_n_ranks_is_one_clear_line(extra, message, tmp_path, capsys):
    from pusa_ray.cli import main

    assert main([*GENERATE, "--out", str(tmp_path / "x.mp4"), *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
