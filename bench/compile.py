"""Compiled blocks on this machine: compiled / eager DiT forward of tiny-wide, side by side.

`VTAWanTransformer.compile_blocks` compiles the repeated block (ours for per-frame timesteps,
diffusers' through `compile_repeated_blocks` for uniform ones) with dynamic shapes. Printed: the
first call's compile time, the steady forward time of each path eager and compiled, and the time
of the first call at a new resolution (dynamic shapes: no full recompile per request).

    python bench/compile.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sampler import interleaved, median_time  # noqa: E402
from pusa_ray.models.loading import load_components  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-wide")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    eager = load_components(args.model, device="cpu").model
    compiled = load_components(args.model, device="cpu").model
    compiled.compile_blocks()
    config = eager.transformer.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, config.in_channels, 5, 32, 32, generator=generator)
    context = torch.randn(2, 16, config.text_dim, generator=generator)
    inputs = {
        "per-frame": torch.tensor([[900.0, 800.0, 700.0, 600.0, 500.0]] * 2),
        "scalar": torch.full((2, 5), 700.0),
    }
    rows = []
    with torch.no_grad():
        for name, timesteps in inputs.items():
            start = time.perf_counter()
            first = compiled(latents, timesteps, context)
            compile_s = time.perf_counter() - start
            difference = (first - eager(latents, timesteps, context)).abs().max().item()
            times = interleaved(
                {
                    "eager": lambda t=timesteps: eager(latents, t, context),
                    "compiled": lambda t=timesteps: compiled(latents, t, context),
                },
                args.repeats,
            )  # in alternation, so that the machine's drift falls on both alike
            eager_s, compiled_s = times["eager"], times["compiled"]
            rows.append((name, compile_s, eager_s, compiled_s, difference))
        wider = torch.randn(2, config.in_channels, 5, 48, 32, generator=generator)
        start = time.perf_counter()
        compiled(wider, inputs["per-frame"], context)
        new_shape_s = time.perf_counter() - start
        eager_new_s = median_time(lambda: eager(wider, inputs["per-frame"], context), 3)

    print(f"{args.model} on the CPU ({torch.get_num_threads()} threads), latents {tuple(latents.shape)}")
    print("| path | first call (compiles) | eager forward | compiled forward | compiled / eager | max diff |")
    print("|---|---|---|---|---|---|")
    for name, compile_s, eager_s, compiled_s, difference in rows:
        print(
            f"| {name} | {compile_s:.1f} s | {eager_s * 1e3:.0f} ms | {compiled_s * 1e3:.0f} ms | "
            f"{compiled_s / eager_s:.2f} | {difference:.1e} |"
        )
    eager_ms = eager_new_s * 1e3
    print(f"a new resolution (48x32), per-frame: first call {new_shape_s:.1f} s (eager {eager_ms:.0f} ms)")
    ratios = "; ".join(f"{name} {compiled_s / eager_s:.2f}" for name, _, eager_s, compiled_s, _ in rows)
    print(f"compiled/eager forward: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
