"""CPU smoke test of the benchmark CLI, so the suite never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert doc["meta"]["torch"] and doc["meta"]["zeta_fused"] and doc["complete"] is True
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


def test_tune_variants_install_and_restore() -> None:
    """Every tuning variant names real Blocks fields and launch constants, and is undone."""
    sys.path.insert(0, str(ROOT))
    from bench import tune
    from zeta_fused import launch
    from zeta_fused.kernels import configs

    names = ("SMALL_GRID", "DW_TARGET_PROGRAMS", "RELAYOUT_MIN_TOKENS", "CIJ_ANY_WIDTH")
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


def test_cuda_timing_follows_triton_return_convention(monkeypatch) -> None:
    """do_bench hands back a bare float for one quantile and a list for several: every caller
    goes through time_ms, which asks for several. A stand-in do_bench (CPU clock, Triton's own
    summary function) runs the CUDA branch here."""
    import inspect
    import time

    import triton.testing

    from bench import measure

    summarize = getattr(triton.testing, "_summarize_statistics", None)
    if summarize is None:
        pytest.skip("this Triton has no _summarize_statistics to mirror do_bench with")
    assert "quantiles" in inspect.signature(triton.testing.do_bench).parameters

    def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, **kw):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return summarize(times, quantiles, kw.get("return_mode", "mean"))

    assert isinstance(fake_do_bench(lambda: None, quantiles=[0.5]), float)  # the trap
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    ms = measure.time_ms(lambda: sum(range(100)), "cuda")
    assert len(ms) == 3 and all(isinstance(v, float) and v >= 0 for v in ms)


def test_roofline_probes_measure_on_any_device() -> None:
    from bench import measure

    assert measure.peak_copy_tbps("cpu", nbytes=1 << 20) > 0
    assert measure.peak_gemm_tflops("fp32", "cpu", size=64) > 0


def test_failed_roofline_and_host_probe_are_reported(monkeypatch, tmp_path) -> None:
    from bench import measure, report, runner
    from bench.presets import PRESETS

    def boom(*a, **k):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(measure, "peak_copy_tbps", boom)
    p = PRESETS["vit_b16"]
    peaks = runner.roofline([p], "cuda")
    assert peaks == {"failed": "RuntimeError: probe broke"}
    rows = [{"preset": p.name, "mode": "fwd", "provider": "eager", "status": "ok", "ms": 0.4}]
    runner.derive(rows, {p.name: p}, peaks)
    assert "pct_roofline" not in rows[0] and rows[0]["tbps"] > 0
    monkeypatch.setattr(measure, "host_us", boom)
    host = {"b1": runner.host_overhead(p, "cpu")}
    assert host["b1"] == {"failed": "RuntimeError: probe broke"}
    meta = {"zeta_fused": "0", "torch": "t", "triton": "tr", "date": "d", "gpu": "GPU X"}
    report.write(rows, meta, peaks, host, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "failed: RuntimeError: probe broke" in md and "host overhead b1: failed" in md


def test_host_overhead_probe_runs_the_launcher(device) -> None:
    """The bare-launch arguments match patch_embed_fwd (interpreter on the CPU: no timing
    meaning, only that both paths run)."""
    from bench import runner
    from bench.presets import parse_shape

    got = runner.host_overhead(parse_shape("1,3,8,8,4,16,fp32"), device, calls=2)
    assert "failed" not in got, got
    assert got["module_us"] > 0 and got["launch_us"] > 0 and got["ratio"] > 0


def test_run_checkpoints_after_every_cell(tmp_path) -> None:
    """A run cut short (a device-time limit) keeps what it measured: bench.json is rewritten
    after each cell, marked incomplete until the end."""
    from bench import report, runner
    from bench.presets import parse_shape

    seen = []

    def checkpoint(rows, peaks, host):
        seen.append(len(rows))
        report.write_json(rows, {"device": "cpu"}, peaks, host, tmp_path, complete=False)

    plan = [(parse_shape("1,3,8,8,4,8,fp32"), ("fwd", "train"))]
    rows, _, _ = runner.run(plan, ["eager", "zeta-eager"], "cpu", checkpoint=checkpoint)
    assert seen == [1, 2, 3, 4] and len(rows) == 4
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["complete"] is False and len(doc["results"]) == 4


def test_conv_peers_run_with_cudnn_benchmark(monkeypatch) -> None:
    """The timm Conv2d peers are timed as a timm user trains: cudnn.benchmark on."""
    from bench.presets import parse_shape
    from bench.providers import PROVIDERS

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    p = parse_shape("1,3,8,8,4,8,fp32")
    PROVIDERS["eager"].build(p, "cpu", "fwd")
    assert torch.backends.cudnn.benchmark is False
    PROVIDERS["timm-conv-cl"].build(p, "cpu", "fwd")
    assert torch.backends.cudnn.benchmark is True


def test_slow_starting_providers_run_last(monkeypatch) -> None:
    """torch.compile cells run after every other cell (a time limit then cuts only them);
    the rows still come back in plan order."""
    from bench import runner
    from bench.presets import parse_shape

    ran = []

    def fake_cell(p, mode, name, device):
        ran.append((mode, name))
        return {"preset": p.name, "mode": mode, "provider": name, "status": "ok", "ms": 1.0}

    monkeypatch.setattr(runner, "run_cell", fake_cell)
    plan = [(parse_shape("1,3,8,8,4,8,fp32"), ("fwd", "train"))]
    rows, _, _ = runner.run(plan, ["compile", "eager"], "cpu")
    assert ran == [("fwd", "eager"), ("train", "eager"), ("fwd", "compile"), ("train", "compile")]
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("fwd", "compile"),
        ("fwd", "eager"),
        ("train", "compile"),
        ("train", "eager"),
    ]


@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_whole_model_providers_build_and_step(mode, device) -> None:
    """The end-to-end timm ViT providers (GPU-only in the benchmark) convert and run a step:
    here on a tiny model, under the interpreter on a CPU."""
    pytest.importorskip("timm.models.vision_transformer", reason="timm is a test extra")
    from bench.presets import Preset
    from bench.providers import PROVIDERS

    p = Preset("tiny_e2e", 2, 3, 16, 16, (8, 8), 24, "fp32", e2e=True)
    for name in ("timm-vit-fused", "timm-vit"):
        model, step = PROVIDERS[name].build(p, device, mode)
        step()
        if mode == "train":
            assert all(q.grad is not None for q in model.parameters() if q.requires_grad)


def test_goals_are_judged_on_the_runs_own_figures() -> None:
    from bench import goals

    def row(preset, mode, provider, ms, **extra):
        return {"preset": preset, "mode": mode, "provider": provider, "ms": ms} | extra

    rows = [
        row("vit_b16", "fwd", "zeta-fused", 0.1, pct_roofline=70.0),
        row("vit_b16", "fwd", "compile", 0.25),
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
    assert all(v.line().strip() for v in got.values())


def test_compile_peers_compile_fresh_and_static(monkeypatch) -> None:
    """Each compile peer starts from a reset dynamo and asks for a static graph: otherwise the
    second preset would be timed with a dynamic-shape graph built from the first one's."""
    from bench.presets import parse_shape
    from bench.providers import PROVIDERS

    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    PROVIDERS["compile"].build(parse_shape("1,3,8,8,4,8,fp32"), "cpu", "fwd")
    assert calls == ["reset", {"mode": "default", "dynamic": False}]
