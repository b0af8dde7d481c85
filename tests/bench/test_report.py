"""The benchmark's derived figures, its outputs and the goal verdicts, on rows shaped like a GPU
run (synthetic timings: this checks the arithmetic and the writers, not any speed)."""

from __future__ import annotations

import json

import pytest


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
    # The fused op under a launch-policy variant, timed after its default.
    variant = {"preset": p.name, "mode": "fwd", "provider": "zeta-fused", "variant": "k=64"}
    variant |= {"status": "ok", "ms": 0.05, "ms_p20": 0.04, "ms_p80": 0.06}
    peaks = {"copy_tbps": 4.0, "gemm_tflops_bf16": 600.0}
    runner.derive([*rows, variant], {p.name: p}, peaks)
    fwd = rows[0]
    floor_ms = 1e3 * max(p.bytes() / 4e12, p.flops() / 600e12)
    assert fwd["roofline_ms"] == pytest.approx(floor_ms)
    assert fwd["pct_roofline"] == pytest.approx(100 * floor_ms / 0.1)
    assert rows[1]["x_vs_fused"] == pytest.approx(4.0) and rows[4]["x_vs_fused"] == pytest.approx(
        3.0
    )
    # Compared with the default, never taken for it.
    assert variant["x_vs_fused"] == pytest.approx(0.5) and variant["spread"] == pytest.approx(1.5)
    assert fwd["x_vs_fused"] == pytest.approx(1.0)
    assert report.table([variant])[1][2] == "zeta-fused [k=64]"
    assert "x_vs_fused" not in rows[2]
    assert rows[3]["pct_eager_mib"] == pytest.approx(25.0) and "pct_eager_mib" not in rows[0]
    host = {"b1_latency_b16": {"module_us": 30.0, "launch_us": 20.0, "ratio": 1.5}}
    meta = {"zeta_fused": "0", "torch": "t", "triton": "tr", "date": "d", "gpu": "GPU X"}
    text = report.terminal(rows, meta, host)
    assert "GPU X" in text and "failed: RuntimeError: boom" in text and "4.00x" in text
    assert "1.50x" in text
    written = report.write(rows, meta, peaks, host, tmp_path)
    assert (tmp_path / "bench.png").stat().st_size > 0 and str(tmp_path / "bench.png") in written
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["host_overhead"] == host and doc["complete"] is True
    met = {g["goal"]: g["met"] for g in doc["goals"]}
    assert met["vit_b16 train >= 3x the fastest peer"] is True  # eager 1.5 ms / fused 0.5 ms
    assert "Goals, judged on this run:" in text
    assert "- met  vit_b16 training step" in (tmp_path / "bench.md").read_text()


def test_goals_are_judged_on_the_runs_own_figures() -> None:
    from bench import goals

    def row(preset, mode, provider, ms, **extra):
        return {"preset": preset, "mode": mode, "provider": provider, "ms": ms} | extra

    rows = [
        row("vit_b16", "fwd", "zeta-fused", 0.1, pct_roofline=70.0),
        row("vit_b16", "fwd", "compile", 0.25),
        # A launch-policy variant of the fused op is neither its figure nor a peer.
        row("vit_l14", "fwd", "zeta-fused", 0.01, pct_roofline=90.0, variant="fwd k=32"),
        row("vit_l14", "fwd", "zeta-fused", 0.3, pct_roofline=50.0),
        row("vit_l14", "fwd", "eager", 0.29),
        row("vit_b16", "train", "zeta-fused", 0.4, peak_extra_mib=150.0, pct_eager_mib=30.0),
        row("vit_b16", "train", "eager", 1.0),
        row("vit_b16", "train", "compile", 1.3),
        row("b1_latency_b16", "fwd", "zeta-fused", 0.012),
        {"preset": "vit_b16", "mode": "train_x", "provider": "zeta-fused", "status": "failed"},
    ]
    host = {"b1_latency_b16": {"module_us": 30.0, "launch_us": 24.0, "ratio": 1.25}}
    got = {v.goal: v for v in goals.judge(rows, host)}
    assert got["vit_b16 forward >= 60% of the roofline"].met is True
    assert got["vit_l14 forward >= 60% of the roofline"].met is False
    assert got["sam_h16_1024 forward >= 60% of the roofline"].met is None
    assert got["vit_l14 forward faster than every peer"].met is False
    assert (
        "2.50x the fastest peer (compile)" in got["vit_b16 forward faster than every peer"].detail
    )
    assert got["vit_b16 train >= 3x the fastest peer"].met is False  # 1.0 / 0.4 = 2.5
    assert got["vit_b16 train_x >= 2x the fastest peer"].met is None  # fused failed
    b1 = got["b1_latency_b16 forward <= 25 us per call, host included"]
    assert b1.met is False and b1.detail.startswith("30.0 us")  # host-bound: 30 us > 25
    assert got["vit_b16 training step <= 40% of eager's extra memory"].met is True
    assert got["host time per call <= 1.5x a bare launch"].met is True
    assert got["b1_latency_b16 forward <= 20 us of GPU time"].met is True  # 12 us
    assert got["vit_b16 forward >= 1.5x torch.compile"].met is True  # 0.25 / 0.1
    assert got["vit_l14 forward >= 1.5x torch.compile"].met is None  # no compile timing
    assert got["seed_doc_example train >= 2x the fastest peer"].met is None
    assert got["dit_xl2_256_stem train faster than every peer"].met is None
    assert all(v.line().strip() for v in got.values())
