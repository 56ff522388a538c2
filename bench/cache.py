"""Step caching on pusa-mini: speed against quality, side by side from one run.

For each step count and cache setting, every held-out clip (the evaluation job's set, written
here when missing) is generated as T2V and as I2V from its first frame, timed, and scored with
`jobs/evaluate.py`'s metrics: direction accuracy, first-frame PSNR (I2V) and the first frame's
jump. The table is the README's; the last line is the headline ratio.

    python bench/cache.py [--count 16] [--steps 20,50] [--caches first-block:0.05,first-block:0.3:4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pusa_ray.mini import evaluate, metrics
from pusa_ray.mini.shapes import DomainSettings
from pusa_ray.models.loading import load_components

TASKS = ("t2v", "i2v")


def measure(components, clips, steps: int, caches: list[str], seed: int, min_travel: float) -> list[dict]:
    """Every (clip, task) under every cache in turn, so that a drift in the machine's speed falls
    on all settings alike; one summary per cache."""
    reused: dict[str, list[int]] = {cache: [] for cache in caches}
    sources = {
        cache: evaluate.pipeline_source(components, seed, None, cache=cache, reused=reused[cache])
        for cache in caches
    }
    rows: dict[str, list[dict]] = {cache: [] for cache in caches}
    for clip in clips:
        for task in TASKS:
            uncached = None
            for cache in caches:  # "off" first: each video is also compared with the uncached one
                start = time.perf_counter()
                frames = sources[cache](clip, task, steps)
                seconds = time.perf_counter() - start
                uncached = frames if cache == "off" else uncached
                row = {"model": cache, "task": task, "steps": steps, "seconds": seconds}
                row["psnr_vs_uncached"] = metrics.capped_psnr(metrics.psnr(frames, uncached))
                rows[cache].append({**row, **evaluate.score(clip, task, frames, min_travel)})
    results = []
    for cache in caches:
        by_task = {entry["task"]: entry for entry in evaluate.summarise(rows[cache])}
        results.append(
            {
                "cache": cache,
                "steps": steps,
                "generate_s": sum(row["seconds"] for row in rows[cache]),
                "reused": sum(reused[cache]) / (steps * len(reused[cache])),
                "psnr_vs_uncached": sum(row["psnr_vs_uncached"] for row in rows[cache]) / len(rows[cache]),
                "t2v_direction": by_task["t2v"]["direction_accuracy"],
                "i2v_direction": by_task["i2v"]["direction_accuracy"],
                "i2v_first_psnr": by_task["i2v"]["first_frame_psnr"],
                "t2v_jump": by_task["t2v"]["first_frame_jump"],
                "i2v_jump": by_task["i2v"]["first_frame_jump"],
            }
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pusa-mini")
    parser.add_argument("--count", type=int, default=16, help="held-out clips (default 16)")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument(
        "--caches", default="first-block:0.05,first-block,first-block:0.2,first-block:0.3:4,first-block:0.5:8"
    )
    parser.add_argument("--headline", default="first-block:0.5:8", help="the setting of the last line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the rows here (default: a temporary directory)")
    args = parser.parse_args()

    components = load_components(args.model, device="cpu")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    heldout = out / "heldout"
    size = {
        "frames": components.spec.frames,
        "height": components.spec.height,
        "width": components.spec.width,
    }
    evaluate.ensure_heldout(heldout, args.count, DomainSettings(**size), evaluate.HELDOUT_SEED)
    clips = evaluate.load_heldout(heldout, args.count, out / "inputs")
    min_travel = metrics.min_travel_px(size["height"], size["width"])
    caches = ["off", *(cache for cache in args.caches.split(",") if cache != "off")]
    steps_list = [int(text) for text in args.steps.split(",")]

    evaluate.pipeline_source(components, args.seed, None)(clips[0], "t2v", 2)  # warm up
    results = [
        result
        for steps in steps_list
        for result in measure(components, clips, steps, caches, args.seed, min_travel)
    ]
    print(f"\n{args.model}, {len(clips)} held-out clips x {', '.join(TASKS)}, CPU, {torch_threads()} threads")
    columns = ["steps", "cache", "time / uncached", "steps reused", "PSNR vs uncached"]
    columns += ["T2V direction", "I2V direction"]
    columns += ["I2V first-frame PSNR", "jump T2V / I2V"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    headline = []
    for result in results:
        base = next(r for r in results if r["steps"] == result["steps"] and r["cache"] == "off")
        ratio = result["generate_s"] / base["generate_s"]
        result["ratio"] = ratio
        print(
            f"| {result['steps']} | {result['cache']} | {ratio:.2f} | {result['reused']:.0%} | "
            f"{'identical' if result['cache'] == 'off' else format(result['psnr_vs_uncached'], '.1f')} | "
            f"{result['t2v_direction']:.2f} | {result['i2v_direction']:.2f} | "
            f"{result['i2v_first_psnr']:.1f} | "
            f"{result['t2v_jump']:.2f} / {result['i2v_jump']:.2f} |"
        )
    (out / "cache.json").write_text(json.dumps(results, indent=1) + "\n")
    for steps in steps_list:
        chosen = [r for r in results if r["steps"] == steps and r["cache"] == args.headline]
        if chosen:
            headline.append(
                f"cached/uncached {chosen[0]['ratio']:.2f} at {steps} steps "
                f"(PSNR {chosen[0]['psnr_vs_uncached']:.1f} dB vs uncached)"
            )
    print(f"rows in {out}")
    print("; ".join(headline) + f"; {args.headline}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
