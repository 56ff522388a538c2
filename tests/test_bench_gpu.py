"""`bench/gpu.py --smoke`: every row of the GPU check runs at a tiny shape on this machine, and the
FLOP count it divides by the card's peak matches one worked out by hand for Wan2.1-14B at 480p."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pusa_ray.models.speed import attention_backends

pytestmark = pytest.mark.slow  # a subprocess that builds DeepSpeed's CPU op on a fresh machine (about 45 s)

REPO = Path(__file__).resolve().parents[1]
FIXED_ROWS = (
    "forward",
    "vta",
    "sampler, cache off",
    "sampler, first-block cache",
    "sampler compiled, cache off",
    "sampler compiled, first-block cache",
    "train ZeRO-2 LoRA step",
    "gpus",
)


def wan_14b_forward_flops() -> int:
    """Wan2.1-14B at 81 frames of 480x832: latents 21 x 60 x 104, patches 21 x 30 x 52."""
    tokens, text, dim, ffn, layers = 21 * 30 * 52, 512, 40 * 128, 13824, 40
    assert tokens == 32760
    self_projections = 4 * (2 * tokens * dim * dim)  # Q, K, V, O
    self_attention = 2 * tokens * tokens * dim + 2 * tokens * tokens * dim  # Q K^T, then P V
    cross_projections = 2 * (2 * tokens * dim * dim) + 2 * (2 * text * dim * dim)  # Q, O; K, V on text
    cross_attention = 2 * tokens * text * dim + 2 * tokens * text * dim
    feed_forward = 2 * tokens * dim * ffn + 2 * tokens * ffn * dim
    blocks = layers * (self_projections + self_attention + cross_projections + cross_attention + feed_forward)
    patch_embedding = 2 * tokens * (16 * 1 * 2 * 2) * dim
    text_embedder = 2 * text * 4096 * dim + 2 * text * dim * dim
    time_embedding = 2 * 256 * dim + 2 * dim * dim + 2 * dim * (6 * dim)  # one timestep
    head = 2 * tokens * dim * (16 * 1 * 2 * 2)
    return blocks + patch_embedding + text_embedder + time_embedding + head


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, torch_extensions: str) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench_gpu") / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "TORCH_EXTENSIONS_DIR": torch_extensions},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_row_is_present(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    names = [row["name"] for row in report["rows"]]
    expected = [*FIXED_ROWS[:4], *(f"attention {name}" for name in attention_backends()), *FIXED_ROWS[4:]]
    assert names == expected


def test_no_row_failed(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    statuses = {row["name"]: row["status"] for row in report["rows"]}
    assert "error" not in statuses.values(), [row for row in report["rows"] if row["status"] == "error"]
    assert report["exit_code"] == 0
    for name in FIXED_ROWS[:4] + FIXED_ROWS[6:]:
        assert statuses[name] == "ok", (name, statuses[name])
    assert statuses["attention native"] == "ok"
    on_cpu = report["device"] == "cpu"
    for name in FIXED_ROWS[4:6]:
        assert statuses[name] == ("skipped (cpu)" if on_cpu else "ok")
    for name, status in statuses.items():
        if name.startswith("attention "):
            assert status in ("ok", "refused") or status.startswith("skipped ("), (name, status)


def test_rows_report_what_they_measured(smoke: tuple[dict[str, Any], str]) -> None:
    rows = {row["name"]: row for row in smoke[0]["rows"]}
    assert rows["forward"]["values"]["flops"] > 0 and rows["forward"]["wall_s"] > 0
    assert rows["vta"]["values"]["ratio"] > 0
    assert 0 <= rows["sampler, first-block cache"]["values"]["reused_steps"] <= 2
    assert rows["train ZeRO-2 LoRA step"]["values"]["zero_stage"] == 2
    assert rows["train ZeRO-2 LoRA step"]["values"]["trainable_params"] > 0


def test_one_markdown_table_is_printed(smoke: tuple[dict[str, Any], str]) -> None:
    report, stdout = smoke
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| row | status | wall | peak GPU mem |")
    assert len(table) == 2 + len(report["rows"])


def test_the_14b_forward_flops_match_a_hand_count(smoke: tuple[dict[str, Any], str]) -> None:
    reference = smoke[0]["reference_flops"]
    assert reference["model"] == "wan2.1-t2v-14b" and reference["video"] == "81x480x832"
    expected = wan_14b_forward_flops()
    assert abs(reference["forward"] - expected) / expected < 1e-6, (reference["forward"], expected)
