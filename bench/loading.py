"""Loading benchmark: host memory of loading a multi-GB DiT, Wan's original layout vs diffusers' layout.

A synthetic DiT with the Wan2.1-1.3B architecture (dim 1536, 30 layers; about 2.8 GB in bf16) is
written once per layout, then each is loaded in bf16 in a fresh process:

    original, sharded   load_original_transformer (safetensors shards + index, original key names)
    original, one file  load_original_transformer (as the 1.3B release ships it)
    diffusers, sharded  WanTransformer3DModel.from_pretrained(..., low_cpu_mem_usage=True)

Reported per load: checkpoint size on disk, peak RSS (VmHWM, reset before loading) minus the RSS
before loading, its ratio to the size (goal <= 1.3), and the peak anonymous RSS growth, sampled
every 10 ms: mmapped file pages count in RSS, so RSS alone cannot tell a zero-copy load from a copy.

    python bench/loading.py [--layers 30] [--shard-mb 600] [--repeats 2] [--keep]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from pusa_ray.checkpoints.wan_original import (
    empty_module,
    load_original_transformer,
    write_original_transformer,
)

GIB = 1024**3


def dit_config(layers: int) -> dict:
    """Wan2.1-T2V-1.3B's DiT (12 heads of 128, ffn 8960, text_dim 4096) with `layers` blocks."""
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


def synthetic_dit(layers: int) -> WanTransformer3DModel:
    """Random bf16 weights, never materialised in float32 (that would be twice the memory)."""
    model = empty_module(lambda: WanTransformer3DModel(**dit_config(layers)))
    generator = torch.Generator().manual_seed(0)
    state = {
        name: torch.empty(parameter.shape, dtype=torch.bfloat16).normal_(std=0.02, generator=generator)
        for name, parameter in model.named_parameters()
    }
    model.load_state_dict(state, assign=True)
    return model


def size_on_disk(path: Path) -> int:
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def fabricate(root: Path, layers: int, shard_bytes: int) -> dict[str, Path]:
    model = synthetic_dit(layers)
    layouts = {
        "original, sharded": root / "original-sharded",
        "original, one file": root / "original-single",
        "diffusers, sharded": root / "diffusers",
    }
    write_original_transformer(model, layouts["original, sharded"], shard_size_bytes=shard_bytes)
    write_original_transformer(model, layouts["original, one file"])
    model.save_pretrained(layouts["diffusers, sharded"], max_shard_size=shard_bytes, safe_serialization=True)
    return layouts


def _status() -> dict[str, int]:
    """/proc/self/status memory fields, in bytes."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


class AnonPeak:
    """Samples RssAnon every `interval` seconds in a thread (/proc keeps no peak for it)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, _status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])


def measure_load(layout: str, path: Path, dtype: torch.dtype) -> dict:
    """In this (fresh) process: load once and report memory growth (bytes) and time."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak RSS mark (VmHWM) to the current RSS
    before = _status()
    with AnonPeak() as anon:
        start = time.perf_counter()
        if layout.startswith("original"):
            model = load_original_transformer(path, dtype, "cpu")
        else:
            model = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=True)
        seconds = time.perf_counter() - start
        loaded = _status()
        # An mmapped (zero-copy) load reads nothing yet: touch every weight, as a first forward would.
        with torch.no_grad():
            checksum = sum(float(tensor.sum(dtype=torch.float32)) for tensor in model.parameters())
    after = _status()
    tensors = [*model.parameters(), *model.buffers()]
    if any(tensor.is_meta for tensor in tensors):
        raise RuntimeError(f"{layout}: tensors left on the meta device")
    return {
        "seconds": seconds,
        "peak_rss": after["VmHWM"] - before["VmRSS"],
        "peak_anon": anon.peak - before["RssAnon"],
        "rss_after_load": loaded["VmRSS"] - before["VmRSS"],
        "checksum": checksum,
        "parameters": sum(tensor.numel() for tensor in model.parameters()),
        "model_bytes": sum(tensor.numel() * tensor.element_size() for tensor in model.parameters()),
    }


def run_child(layout: str, path: Path, dtype: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", layout, str(path), dtype],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{layout} load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_runs(layout: str, dtype: str, path: Path, repeats: int) -> dict:
    """Fresh-process loads, `repeats` times: the fastest time, the largest memory figures.

    The first load after others freed memory pays for reclaiming page cache; repeats hide that.
    """
    runs = [run_child(layout, path, dtype) for _ in range(repeats)]
    merged = {key: max(run[key] for run in runs) for key in runs[0]}
    merged["seconds"] = min(run["seconds"] for run in runs)
    return merged


def report(results: dict[tuple[str, str], dict], sizes: dict[str, int], files: dict[str, int]) -> None:
    header = (
        f"{'layout':20s} {'load as':>8s} {'files':>5s} {'size GB':>8s} {'model GB':>9s} {'load s':>7s} "
        f"{'RSS at load':>12s} {'peak RSS':>9s} {'peak/size':>10s} {'peak anon':>10s} {'anon/model':>11s}"
    )
    print(header)
    print("-" * len(header))
    for (layout, dtype), result in results.items():
        size, model = sizes[layout], result["model_bytes"]
        at_load, peak, anon = result["rss_after_load"], result["peak_rss"], result["peak_anon"]
        print(
            f"{layout:20s} {dtype:>8s} {files[layout]:5d} {size / GIB:8.2f} {model / GIB:9.2f} "
            f"{result['seconds']:7.1f} {at_load / GIB:12.2f} {peak / GIB:9.2f} {peak / size:10.2f} "
            f"{anon / GIB:10.2f} {anon / model:11.2f}"
        )
    print(
        "GB = GiB; memory is growth over the RSS before loading. 'RSS at load': right after the load call;\n"
        "peaks: over the load and one read of every weight (checksums agree across rows).\n"
        "Goal: peak/size <= 1.3 where no cast is needed; with a cast, anon/model near 1 (no second copy)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--shard-mb", type=int, default=600, help="shard size of the sharded layouts")
    parser.add_argument("--repeats", type=int, default=2, help="loads per layout, fresh process each")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (printed path)")
    parser.add_argument("--child", nargs=3, metavar=("LAYOUT", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        layout, path, dtype = args.child
        print(json.dumps(measure_load(layout, Path(path), getattr(torch, dtype))))
        return
    root = Path(tempfile.mkdtemp(prefix="pusa-bench-loading-"))
    try:
        start = time.perf_counter()
        layouts = fabricate(root, args.layers, args.shard_mb * 1024**2)
        gc.collect()
        os.sync()  # no writeback of the fresh files competing with the loads
        print(
            f"fabricated {len(layouts)} layouts of a {args.layers}-layer bf16 DiT in {root} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        sizes = {layout: size_on_disk(path) for layout, path in layouts.items()}
        files = {layout: len(list(path.glob("*.safetensors"))) for layout, path in layouts.items()}
        runs = [(layout, "bfloat16") for layout in layouts]
        runs += [("original, sharded", "float32"), ("diffusers, sharded", "float32")]
        results = {run: measure_runs(*run, layouts[run[0]], args.repeats) for run in runs}
        parameters = {result["parameters"] for result in results.values()}
        checksums = {round(result["checksum"], 1) for result in results.values()}
        if len(checksums) != 1:
            raise RuntimeError(f"the layouts loaded different weights: checksums {checksums}")
        print(f"{parameters.pop() / 1e9:.2f} B parameters in bf16 on disk; fp32-kept modules load in float32")
        report(results, sizes, files)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
