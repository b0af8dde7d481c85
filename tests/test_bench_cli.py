"""CPU smoke test of the benchmark CLI, so the suite never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_tiny_shape(tmp_path) -> None:
    r = run_bench(
        "--shape",
        "2,3,16,16,8,16,fp32",
        "--providers",
        "zeta-eager,eager,zeta-fused",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {(x["mode"], x["provider"]): x for x in doc["results"]}
    assert {m for m, _ in rows} == {"fwd", "train", "train_x"}
    for mode in ("fwd", "train", "train_x"):
        assert rows[(mode, "eager")]["status"] == "ok" and rows[(mode, "eager")]["ms"] > 0
    assert rows[("fwd", "eager")]["tflops"] > 0
    assert doc["meta"]["torch"] and doc["meta"]["zeta_fused"]
    assert "| preset |" in (tmp_path / "bench.md").read_text()
    assert "zeta-eager" in r.stdout and "eager" in r.stdout
    if doc["meta"]["device"] == "cpu":
        assert "need CUDA" in r.stdout
        assert rows[("fwd", "zeta-fused")]["status"] == "skipped"


def test_failing_provider_is_shown_not_dropped() -> None:
    from bench import runner
    from bench.presets import parse_shape

    p = parse_shape("1,3,8,8,4,8,fp32")
    row = runner.run_cell(p, "fwd", "eager", "cpu")
    assert row["status"] == "ok"
    bad = parse_shape("1,3,8,8,3,8,fp32")  # 8 is not a multiple of the patch: eager raises
    row = runner.run_cell(bad, "fwd", "eager", "cpu")
    assert row["status"] == "failed" and "EinopsError" in row["error"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--preset", "nope"],
        ["--modes", "fwd,sideways"],
        ["--providers", "magic"],
        ["--shape", "1,2,3"],
    ],
)
def test_cli_rejects_bad_arguments(bad) -> None:
    r = run_bench(*bad)
    assert r.returncode != 0
