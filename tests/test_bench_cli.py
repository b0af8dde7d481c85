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


def test_gpu_shaped_report(tmp_path) -> None:
    """Derived figures and every output format for rows shaped like a GPU run (synthetic
    timings: this checks the arithmetic and the writers, not any speed)."""
    from bench import report, runner
    from bench.presets import PRESETS

    p = PRESETS["vit_b16"]
    rows = [
        {"preset": p.name, "mode": "fwd", "provider": "zeta-fused", "status": "ok", "ms": 0.1},
        {"preset": p.name, "mode": "fwd", "provider": "eager", "status": "ok", "ms": 0.4},
        {
            "preset": p.name,
            "mode": "fwd",
            "provider": "compile",
            "status": "failed",
            "error": "RuntimeError: boom",
        },
        {
            "preset": p.name,
            "mode": "train",
            "provider": "zeta-fused",
            "status": "ok",
            "ms": 0.5,
            "peak_extra_mib": 100.0,
        },
        {
            "preset": p.name,
            "mode": "train",
            "provider": "eager",
            "status": "ok",
            "ms": 1.5,
            "peak_extra_mib": 400.0,
        },
    ]
    peaks = {"copy_tbps": 4.0, "gemm_tflops_bf16": 600.0}
    runner.derive(rows, {p.name: p}, peaks)
    fwd = rows[0]
    floor_ms = 1e3 * max(p.bytes() / 4e12, p.flops() / 600e12)
    assert fwd["roofline_ms"] == pytest.approx(floor_ms)
    assert fwd["pct_roofline"] == pytest.approx(100 * floor_ms / 0.1)
    assert rows[1]["x_vs_fused"] == pytest.approx(4.0) and rows[4]["x_vs_fused"] == pytest.approx(
        3.0
    )
    assert "x_vs_fused" not in rows[2]
    host = {"b1_latency_b16": {"module_us": 30.0, "launch_us": 20.0, "ratio": 1.5}}
    meta = {"zeta_fused": "0", "torch": "t", "triton": "tr", "date": "d", "gpu": "GPU X"}
    text = report.terminal(rows, meta, host)
    assert "GPU X" in text and "failed: RuntimeError: boom" in text and "4.00x" in text
    assert "1.50x" in text
    written = report.write(rows, meta, peaks, host, tmp_path)
    assert (tmp_path / "bench.png").stat().st_size > 0 and str(tmp_path / "bench.png") in written
    assert json.loads((tmp_path / "bench.json").read_text())["host_overhead"] == host


def test_tune_variants_install_and_restore() -> None:
    """Every tuning variant names real Blocks fields and launch constants, and is undone."""
    sys.path.insert(0, str(ROOT))
    from bench import tune
    from zeta_fused import launch
    from zeta_fused.kernels import configs

    names = ("SMALL_GRID", "DW_TARGET_PROGRAMS", "RELAYOUT_MIN_TOKENS")
    before = (configs.BLOCKS[tune.OPERAND_BYTES], *(getattr(launch, c) for c in names))
    for name, (blocks, consts) in tune.VARIANTS.items():
        saved = tune.apply(name)
        current = configs.BLOCKS[tune.OPERAND_BYTES]
        assert all(getattr(current, k) == v for k, v in blocks.items()), name
        assert all(getattr(launch, k) == v for k, v in consts.items()), name
        tune.restore(saved)
        after = (configs.BLOCKS[tune.OPERAND_BYTES], *(getattr(launch, c) for c in names))
        assert after == before, name
    assert all(p in tune.PRESETS and tune.PRESETS[p].dtype == "bf16" for p, _ in tune.PLAN)


def test_tune_needs_cuda(tmp_path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("has CUDA: the tuning run itself is the GPU check")
    r = subprocess.run(
        [sys.executable, "-m", "bench.tune", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "needs a CUDA device" in r.stdout
