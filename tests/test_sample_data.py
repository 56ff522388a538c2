"""`pusa-ray sample-data`: the clips it writes, read back by the preprocessing job's own listing
and decoding (no Ray) in each of the three layouts, good and broken inputs counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pusa_ray.cli import main as cli_main
from pusa_ray.mini.sample_data import BAD
from pusa_ray.models.description import describe_model
from pusa_ray.preprocessing import config as prep_config
from pusa_ray.preprocessing import decode as decoding
from pusa_ray.preprocessing import plan as planning
from tests.cluster_helpers import derive

COUNT = 5


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "raw"
    assert cli_main(["sample-data", str(root), "--count", str(COUNT), "--with-bad", "--seed", "3"]) == 0
    return root


@pytest.mark.parametrize("layout", ["metadata.csv", "manifest.jsonl", "clips/ (.txt sidecars)"])
def test_every_layout_reads_back_with_the_expected_good_and_bad_clips(sample: Path, layout: str, tmp_path):
    uri = {"metadata.csv": sample, "manifest.jsonl": sample / "manifest.jsonl"}.get(layout, sample / "clips")
    settings = derive(
        "jobs/configs/preprocess.tiny.yaml", {"input.uri": str(uri), "output": str(tmp_path / "o")}
    )
    config = prep_config.parse_config(settings)
    plan = planning.plan(config, describe_model(config.model))

    kinds = Counter(error["kind"] for error in plan.errors)  # found while listing
    good = 0
    for clip in plan.todo:  # what the decode actors do with each planned clip
        try:
            pixels = decoding.decode_row(clip.row(), config)
        except decoding.ClipError as error:
            kinds[error.kind] += 1
            continue
        assert pixels.shape == (config.frames, config.height, config.width, 3)
        good += 1
    assert good == COUNT
    assert kinds == Counter(BAD.values())


def test_sample_data_is_seeded_and_lists_batch_requests(sample: Path, tmp_path: Path, capsys):
    again = tmp_path / "again"
    assert cli_main(["sample-data", str(again), "--count", str(COUNT), "--with-bad", "--seed", "3"]) == 0
    assert "wrote 5 captioned clips and 4 broken inputs" in capsys.readouterr().out
    for name in ("metadata.csv", "manifest.jsonl", "truth.jsonl", "prompts.jsonl"):
        assert (again / name).read_bytes() == (sample / name).read_bytes(), name
    from pusa_ray.video_request import VideoRequest

    prompts = [json.loads(line) for line in (sample / "prompts.jsonl").read_text().splitlines()]
    for prompt in prompts:
        VideoRequest.model_validate({k: v for k, v in prompt.items() if k != "name"})
    captions = (sample / "metadata.csv").read_text().splitlines()[1:]
    assert [p["prompt"] for p in prompts] == [line.split(",", 1)[1] for line in captions[: len(prompts)]]


def test_bad_sample_data_options_are_one_line_errors(tmp_path: Path, capsys):
    assert cli_main(["sample-data", str(tmp_path / "x"), "--count", "0"]) == 2
    assert "count must be at least 1" in capsys.readouterr().err
    assert cli_main(["sample-data", str(tmp_path / "x"), "--height", "10"]) == 2
    assert "sizes >= 16" in capsys.readouterr().err
