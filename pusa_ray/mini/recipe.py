"""The pusa-mini recipe: train it from scratch with our own jobs, and ship it (`make pusa-mini`,
the entry point jobs/pusa_mini.py).

    python jobs/pusa_mini.py                  # every stage, each skipped once its output exists
    python jobs/pusa_mini.py --stage base     # one stage (data, preprocess, base, vta, package, evaluate)

Stages, all under out/pusa-mini/ (ignored by git) until `package` copies the final weights into
pusa_ray/weights/pusa-mini/:

1. data        procedural shape clips (`pusa_ray.mini.shapes`): a training set, a subset of it
               for the VTA fine-tune, and a held-out set for the evaluation (other seed)
2. preprocess  the Ray Data preprocessing job on both training sets (jobs/configs/preprocess.pusa-mini.yaml)
3. base        the Ray Train job: the T2V base from random weights, one timestep per clip
               (p_async 0; jobs/configs/train.pusa-mini-base.yaml), exported as a model directory
4. vta         the Ray Train job: the VTA LoRA fine-tune of that base, 1 clip in 5 laid out as
               the lead T2V schedule's first half (p_lead 0.2), 4 in 5 of the others as a
               conditioned generation (p_condition 0.8), the rest PTSS (p_async 0.5: half
               independent per-frame timesteps; jobs/configs/train.pusa-mini-vta.yaml), exported
               as an adapter
5. package     the base model directory and the adapter into the package (`pusa-mini-base`,
               `pusa-mini` presets), and the example images (pusa_ray/mini/examples/)
6. evaluate    pusa_ray/mini/evaluate.py on the held-out set: base, base with zero-shot VTA, pusa-mini;
               T2V under both schedules (`sync`, `lead`)

Everything survives an interrupted session: the data and preprocessing stages write only what
is missing, and a training stage rerun resumes from the run's last checkpoint (raise `steps` in its
config to train further; a finished run only exports again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from pusa_ray.mini import evaluate
from pusa_ray.mini.shapes import DomainSettings, write_dataset

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs in jobs/configs, weights in the package

WORK = ROOT / "out" / "pusa-mini"
CONFIGS = ROOT / "jobs" / "configs"
PACKAGE = ROOT / "pusa_ray" / "weights" / "pusa-mini"
STAGES = ("data", "preprocess", "base", "vta", "package", "evaluate")

# The training domain: one shape moving 2 px a frame in one of four directions on a plain
# background, from a start that does not give the direction away (see `DomainSettings.start`).
DOMAIN = DomainSettings(
    frames=5, height=32, width=32, motions=("moves",), backgrounds=("plain",), travel=0.25, start="centre"
)
TRAIN_CLIPS, VTA_CLIPS, HELDOUT_CLIPS = 2048, 1024, 256
TRAIN_SEED, HELDOUT_SEED = 0, 10_000
FPS = 4


def log(message: str) -> None:
    print(f"[pusa-mini {time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage_data() -> None:
    data = WORK / "data"
    if not (data / "manifest.jsonl").is_file():
        log(f"writing {TRAIN_CLIPS} training clips to {data}")
        write_dataset(data, DOMAIN, TRAIN_CLIPS, TRAIN_SEED, FPS)
    lines = (data / "manifest.jsonl").read_text().splitlines(keepends=True)
    (data / "manifest-vta.jsonl").write_text("".join(lines[:VTA_CLIPS]))  # the fine-tune's subset
    heldout = WORK / "heldout"
    manifest = heldout / "manifest.jsonl"
    if not manifest.is_file() or len(manifest.read_text().splitlines()) < HELDOUT_CLIPS:
        log(f"writing {HELDOUT_CLIPS} held-out clips (a smaller set is extended: clip i depends on i only)")
        write_dataset(heldout, DOMAIN, HELDOUT_CLIPS, HELDOUT_SEED, FPS)
    evaluate.record_heldout(heldout, DOMAIN, HELDOUT_SEED)  # the evaluation scores motion by its travel


def _config_with(path: Path, changes: dict, name: str) -> str:
    """The shipped YAML with `changes` (top-level keys) applied, written as out/pusa-mini/NAME.yaml."""
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    derived = WORK / f"{name}.yaml"
    derived.write_text(yaml.safe_dump(config))
    return str(derived)


def _run(job: str, config: str) -> None:
    if job == "preprocess":
        from pusa_ray.distributed.preprocess import main
    else:
        from pusa_ray.distributed.train import main
    status = main(["--config", config])
    if status != 0:
        raise SystemExit(f"pusa-mini: the {job} job failed (exit status {status})")


def stage_preprocess() -> None:
    shipped = CONFIGS / "preprocess.pusa-mini.yaml"
    _run("preprocess", str(shipped))
    subset = {
        "input": {"uri": "out/pusa-mini/data/manifest-vta.jsonl", "format": "manifest"},
        "output": "out/pusa-mini/latents-vta",
    }
    _run("preprocess", _config_with(shipped, subset, "preprocess.pusa-mini-vta"))


def _export(config_name: str) -> Path:
    """Where a training config exports its result (a model directory or an adapter directory)."""
    export = yaml.safe_load((CONFIGS / config_name).read_text())["export"]
    return ROOT / export["prefix"] / export["name"]


def _train(config_name: str) -> None:
    """Run (or resume, or re-export) a training job: a finished run only exports again."""
    _run("train", str(CONFIGS / config_name))


def stage_base() -> None:
    _train("train.pusa-mini-base.yaml")


def stage_vta() -> None:
    _train("train.pusa-mini-vta.yaml")


def stage_package() -> None:
    """The exported base directory and adapter -> pusa_ray/weights/pusa-mini/ (what git ships)."""
    base = _export("train.pusa-mini-base.yaml")
    adapter = _export("train.pusa-mini-vta.yaml") / "adapter.safetensors"
    for done in (base / "transformer" / "config.json", adapter):
        if not done.is_file():
            raise SystemExit(f"pusa-mini: {done} is missing: run the base and vta stages first")
    staging = PACKAGE.with_name(".pusa-mini.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for part in ("transformer", "text_encoder", "tokenizer", "scheduler", "vae"):
        shutil.copytree(base / part, staging / part)
    saved = json.loads((base / "pusa_ray.json").read_text())
    (staging / "pusa_ray.json").write_text(json.dumps({**saved, "name": "pusa-mini"}, indent=2) + "\n")
    (staging / "vta").mkdir()
    shutil.copy2(adapter, staging / "vta" / "adapter.safetensors")
    shutil.rmtree(PACKAGE, ignore_errors=True)
    staging.rename(PACKAGE)
    size = sum(f.stat().st_size for f in PACKAGE.rglob("*") if f.is_file())
    log(f"packaged {PACKAGE} ({size / 1e6:.1f} MB)")
    write_examples()
    log(f"wrote the example images to {EXAMPLES}")


EXAMPLES = ROOT / "pusa_ray" / "mini" / "examples"
EXAMPLE_SEED = 20_000  # neither a training nor the held-out evaluation seed
EXAMPLE_CLIPS = (("red", "circle", "right"), ("blue", "square", "up"), ("green", "square", "down"),
                 ("yellow", "circle", "left"))  # fmt: skip


def write_examples() -> None:
    """First and last frames of one clip per example caption (`NAME.png`, `NAME-end.png`), for the
    README's I2V and start-end commands and the tests; from their own seed, so never trained on."""
    from PIL import Image

    from pusa_ray.mini.shapes import clips

    wanted = {"-".join(key) for key in EXAMPLE_CLIPS}
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for truth, frames in clips(DOMAIN, 10_000, EXAMPLE_SEED):
        name = f"{truth.colour}-{truth.shape}-{truth.direction}"
        if name in wanted:
            wanted.remove(name)
            Image.fromarray(frames[0]).save(EXAMPLES / f"{name}.png")
            Image.fromarray(frames[-1]).save(EXAMPLES / f"{name}-end.png")
        if not wanted:
            return
    raise SystemExit(f"pusa-mini: no example clip for {sorted(wanted)}")


def stage_evaluate() -> None:
    """The README's table (base vs pusa-mini, every task, each model's T2V schedule), T2V under the
    other schedule (the base with "lead" is zero-shot VTA; pusa-mini with "sync" is Pusa's T2V), and
    the I2V steps sweep (paper Table 2b) on the first 64 clips."""
    heldout = ["--heldout", str(WORK / "heldout")]
    clips = ["--count", str(HELDOUT_CLIPS)]
    models = ["--model", "base=pusa-mini-base", "--model", "pusa-mini=pusa-mini"]
    runs = [
        clips + models + ["--out", str(WORK / "eval")],
        clips
        + ["--model", "base-lead=pusa-mini-base,schedule=lead", "--tasks", "t2v", "--no-reference"]
        + ["--model", "pusa-mini-sync=pusa-mini,schedule=sync", "--out", str(WORK / "eval-schedules")],
        ["--count", "64", "--model", "pusa-mini=pusa-mini", "--tasks", "i2v", "--steps", "2,5,10,20"]
        + ["--no-reference", "--out", str(WORK / "eval-steps")],
    ]
    for arguments in runs:
        status = evaluate.main(heldout + arguments)
        if status != 0:
            raise SystemExit(f"pusa-mini: the evaluation failed (exit status {status})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=STAGES, action="append", help="run only these stages")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the configs' paths are relative to the checkout
    WORK.mkdir(parents=True, exist_ok=True)
    stages = args.stage or list(STAGES)
    if {"preprocess", "base", "vta"} & set(stages):
        import ray

        if not ray.is_initialized():  # a job's cluster (RAY_ADDRESS), else a fresh local one
            ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    started = time.perf_counter()
    for stage in stages:
        log(f"stage {stage}")
        globals()[f"stage_{stage}"]()
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
