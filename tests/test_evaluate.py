"""pusa_ray/mini/evaluate.py (jobs/evaluate.py): generation on a held-out set with the tiny preset,
scoring, outputs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pusa_ray.errors import UserInputError
from pusa_ray.mini import evaluate, metrics
from pusa_ray.mini.shapes import BACKGROUNDS, MOTIONS, DomainSettings

TASKS = ["t2v", "i2v", "start-end"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    code = evaluate.main(["--model", "tiny", "--count", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_the_job_runs_on_the_tiny_preset_and_writes_one_row_per_model_task_steps_and_clip(tiny_run):
    rows = _rows(tiny_run)
    generated = [row for row in rows if row["model"] == "tiny"]
    assert len(generated) == 3 * 2 and len(rows) == 2 * 3 * 2  # + the ground-truth rows
    assert {(row["task"], row["clip"]) for row in generated} == {
        (task, f"clips/00000{i}.mp4") for task in TASKS for i in range(2)
    }
    assert {row["steps"] for row in generated} == {2} and {row["seed"] for row in generated} == {0, 1}
    for row in generated:
        assert isinstance(row["caption_correct"], bool) and row["checks"].keys() >= {"colour", "shape"}
        assert row["frame_difference"] >= 0 and row["pixel_jitter"] >= 0 and row["seconds"] > 0
        has_first, has_end = row["task"] != "t2v", row["task"] == "start-end"
        assert ("first_frame_psnr" in row) == has_first and ("end_frame_psnr" in row) == has_end
    # the held-out set was written at the model's size, with its seed recorded, and the condition PNGs
    record = json.loads((tiny_run / "heldout" / "heldout.json").read_text())
    assert record["seed"] == evaluate.HELDOUT_SEED
    assert (record["settings"]["frames"], record["settings"]["height"]) == (9, 64)
    assert sorted(p.name for p in (tiny_run / "inputs").iterdir()) == [
        "000000_first.png",
        "000000_last.png",
        "000001_first.png",
        "000001_last.png",
    ]


def test_the_summary_states_counts_and_seeds_and_has_a_row_per_model_task_and_steps(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["count"] == 2 and summary["seed"] == 0 and summary["size"] == "9x64x64"
    groups = {(g["model"], g["task"], g["steps"]): g for g in summary["groups"]}
    assert set(groups) == {(m, t, s) for m, s in (("ground-truth", None), ("tiny", 2)) for t in TASKS}
    for group in groups.values():
        assert group["n"] == 2
        assert {
            "caption_accuracy",
            "direction_accuracy",
            "first_frame_jump",
            "frame_difference",
        } <= group.keys()
    assert groups[("tiny", "t2v", 2)]["first_frame_psnr"] is None
    assert groups[("tiny", "start-end", 2)]["end_frame_psnr"] is not None
    text = (tiny_run / "summary.md").read_text()
    assert "| tiny | i2v | 2 | 2 |" in text and "generator seed 10000" in text
    assert "I2V first-frame PSNR" in text


def test_a_perfect_model_scores_full_caption_following_and_the_capped_first_frame_psnr(tiny_run, tmp_path):
    groups = json.loads((tiny_run / "summary.json").read_text())["groups"]
    reference = {g["task"]: g for g in groups if g["model"] == "ground-truth"}
    assert reference["i2v"]["caption_accuracy"] == 1.0
    assert reference["i2v"]["first_frame_psnr"] == metrics.PSNR_CAP_DB
    assert reference["start-end"]["end_frame_psnr"] == metrics.PSNR_CAP_DB
    # every motion and background, through the mp4 round trip of the held-out set
    settings = DomainSettings(motions=MOTIONS, backgrounds=BACKGROUNDS)
    evaluate.ensure_heldout(tmp_path / "heldout", 12, settings, seed=3)
    clips = evaluate.load_heldout(tmp_path / "heldout", 12, tmp_path / "inputs")
    sources = [("perfect", evaluate.reference_source, (None,))]
    rows = evaluate.evaluate(sources, clips, TASKS, 4.0, 0, tmp_path / "results.jsonl")
    summary = {g["task"]: g for g in evaluate.summarise(rows)}
    assert {clip.truth.motion for clip in clips} == set(MOTIONS)
    assert all(g["caption_accuracy"] == 1.0 and g["n"] == 12 for g in summary.values())
    assert summary["i2v"]["first_frame_psnr"] == metrics.PSNR_CAP_DB
    assert summary["i2v"]["first_frame_ssim"] == pytest.approx(1.0)
    assert summary["t2v"]["first_frame_jump"] == pytest.approx(summary["t2v"]["truth_first_step"], abs=0.5)


def test_a_steps_sweep_gives_rows_per_step_count_and_reuses_the_held_out_set(tiny_run, tmp_path):
    heldout = tiny_run / "heldout"
    before = (heldout / "manifest.jsonl").stat().st_mtime_ns
    args = ["--model", "t=tiny", "--heldout", str(heldout), "--count", "1", "--tasks", "t2v"]
    assert evaluate.main([*args, "--steps", "1,2", "--no-reference", "--out", str(tmp_path)]) == 0
    assert [(row["model"], row["steps"]) for row in _rows(tmp_path)] == [("t", 1), ("t", 2)]
    assert (heldout / "manifest.jsonl").stat().st_mtime_ns == before


def test_a_schedule_entry_changes_t2v_only_and_the_summary_says_which(tiny_run, tmp_path):
    models = ["--model", "sync=tiny,schedule=sync", "--model", "lead=tiny,schedule=lead"]
    args = [*models, "--heldout", str(tiny_run / "heldout"), "--count", "2", "--tasks", "t2v,i2v"]
    assert evaluate.main([*args, "--steps", "2", "--no-reference", "--out", str(tmp_path)]) == 0
    rows = {(row["model"], row["task"], row["clip"]): row for row in _rows(tmp_path)}
    measured = ("frame_difference", "pixel_jitter", "first_frame_psnr")
    for (model, task, clip), row in rows.items():
        other = rows[("lead" if model == "sync" else "sync", task, clip)]
        same = all(row.get(key) == other.get(key) for key in measured)
        assert same == (task == "i2v"), (model, task, clip)  # I2V already leads with its given frame
    assert "T2V schedule: sync sync, lead lead" in (tmp_path / "summary.md").read_text()


def test_model_flags_parse_names_models_and_adapters():
    entry = evaluate.parse_model("vta=s3://b/models/m,lora=s3://b/a.safetensors:1.2,lora=/x/pusa.pt")
    assert entry == evaluate.ModelEntry(
        "vta", "s3://b/models/m", (("s3://b/a.safetensors", 1.2), ("/x/pusa.pt", 1.4))
    )
    assert evaluate.parse_model("tiny") == evaluate.ModelEntry("tiny", "tiny")
    assert evaluate.parse_model("s3://b/lora-only,lora=s3://b/x.pt").adapters == (("s3://b/x.pt", 1.4),)
    assert evaluate.parse_model("lead=tiny,schedule=lead") == evaluate.ModelEntry("lead", "tiny", (), "lead")
    with pytest.raises(UserInputError, match="is not lora=PATH"):
        evaluate.parse_model("a=tiny,alpha=2")
    with pytest.raises(UserInputError, match=r"or schedule=sync\|lead"):
        evaluate.parse_model("a=tiny,schedule=late")
    with pytest.raises(UserInputError, match="must be letters"):
        evaluate.parse_model("a b=tiny")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "two"], "not a comma list of integers"),
        (["--tasks", "t2v,extend"], "unknown 'extend'"),
        (["--count", "0"], "--count must be >= 1"),
        (["--model", "a=tiny", "--model", "a=tiny"], "names must be distinct"),
        (["--model", "nowhere/at/all"], "neither a preset"),
    ],
)
def test_bad_input_exits_2_with_one_line(flags, message, tmp_path, capsys):
    args = ["--model", "tiny"] if "--model" not in flags else []
    assert evaluate.main([*args, "--count", "1", "--out", str(tmp_path / "o"), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_given_held_out_set_smaller_than_count_is_refused(tiny_run, tmp_path, capsys):
    given = tmp_path / "given"
    given.mkdir()
    for name in ("manifest.jsonl", "truth.jsonl"):
        (given / name).write_text((tiny_run / "heldout" / name).read_text())
    code = evaluate.main(["--model", "tiny", "--heldout", str(given), "--count", "3", "--out", str(tmp_path)])
    assert code == 2 and "has 2 clips, fewer than --count 3" in capsys.readouterr().err
