"""The benchmark's runner, measurements and providers, their GPU-only paths included (run on
the CPU with stand-ins where they need CUDA)."""

from __future__ import annotations

import json

import pytest
import torch


def test_failing_provider_is_shown_not_dropped() -> None:
    from bench import runner
    from bench.presets import parse_shape

    p = parse_shape("1,3,8,8,4,8,fp32")
    row = runner.run_cell(p, "fwd", "eager", "cpu")
    assert row["status"] == "ok"
    bad = parse_shape("1,3,8,8,3,8,fp32")  # 8 is not a multiple of the patch: eager raises
    row = runner.run_cell(bad, "fwd", "eager", "cpu")
    assert row["status"] == "failed" and "EinopsError" in row["error"]


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
    """The bare-launch arguments match patch_embed_fwd, the F.linear baseline and the training
    step run (interpreter on the CPU: no timing meaning, only that every path runs)."""
    from bench import runner
    from bench.presets import parse_shape

    got = runner.host_overhead(parse_shape("1,3,8,8,4,16,fp32"), device, calls=2)
    assert "failed" not in got, got
    assert got["module_us"] > 0 and got["launch_us"] > 0 and got["ratio"] > 0
    assert got["linear_us"] > 0 and got["train_step_us"] > 0 and got["train_batch"] > 1


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


@pytest.mark.parametrize(
    "layout, spatial, patch",
    [
        ("frames_first", (4, 8, 8), (2, 4, 4)),  # videomae_b16's layout
        ("rows", (2, 4, 4), (2, 4, 4)),  # qwen2_5_vl_rows'
        ("channels_first", (2, 8, 12), (1, 2, 2)),  # wan_latents'
        ("channels_first", (32,), (4,)),  # series'
    ],
)
def test_conv_stems_compute_the_same_projection(layout, spatial, patch, device,
                                                fused_calls) -> None:  # fmt: skip
    """The conv presets' peers (the model's conv, the reshape + F.linear rewrite) and the fused
    conv (on the GPU, else the interpreter) give the same tokens. The model's conv runs on the
    CPU, the reference: cuDNN would round an fp32 conv through TF32."""
    from bench import conv_stems
    from bench.presets import ConvPreset

    p = ConvPreset("t", 2, 3, spatial, patch, 16, "fp32", layout=layout)
    conv = conv_stems.ConvStem(p)
    x = conv_stems.make_input(p, "cpu", "fwd")
    expected = conv(x)
    assert expected.shape == ((2, 16) if layout == "rows" else (2, p.tokens, 16))
    for other in (conv_stems.LinearStem(p), conv_stems.fused(p)):
        other.load_state_dict(conv.state_dict())
        got = other.to(device)(x.to(device))
        assert got.device.type == device
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == 1  # the fused conv ran the op, not its own conv


def test_conv_presets_run_and_are_judged_on_cpu() -> None:
    """A conv preset's cells: on a CPU the model's conv and the GEMM rewrite (the fused conv
    needs CUDA); its goals are judged, here as not measured."""
    from bench import goals, runner
    from bench.presets import PRESETS, QUICK, ConvPreset

    p = ConvPreset("tiny_video", 1, 3, (4, 8, 8), (2, 4, 4), 16, "fp32", layout="frames_first")
    rows, _, _ = runner.run([(p, ("fwd", "train"))], ["zeta-fused", "eager", "compile"], "cpu")
    assert {(r["provider"], r["status"]) for r in rows} == {
        ("zeta-fused", "skipped"), ("eager", "ok"), ("linear-rewrite", "ok"), ("compile", "ok")
    }  # fmt: skip
    assert all(r["tbps"] > 0 for r in rows if r["mode"] == "fwd" and "ms" in r)
    for name in ("videomae_b16", "qwen2_5_vl_rows", "wan_latents", "series"):
        assert PRESETS[name].family == "conv" and (name, ("fwd", "train")) in QUICK
    verdicts = {v.goal: v for v in goals.judge(rows, {})}
    assert verdicts["videomae_b16 train faster than every peer"].met is None
    assert verdicts["series forward >= 60% of the roofline"].met is None


def test_cpu_timing_runs_one_thread_without_collections_and_restores_them() -> None:
    """On a busy machine a parallel region waits a whole time slice for a descheduled thread:
    CPU cells are timed on one thread, the garbage collector off; both restored after."""
    import gc

    from bench import measure

    threads = torch.get_num_threads()
    seen = set()
    try:
        torch.set_num_threads(2)
        measure.time_ms(lambda: seen.add((torch.get_num_threads(), gc.isenabled())), "cpu")
        assert torch.get_num_threads() == 2 and gc.isenabled()
    finally:
        torch.set_num_threads(threads)
    assert seen == {(measure.CPU_THREADS, False)} and measure.CPU_THREADS == 1


@pytest.fixture
def clock(monkeypatch):
    """The CPU timing's clock, advanced by the calls themselves: their durations are what the
    test says, whatever else the machine runs."""
    from bench import measure

    class Clock:
        wall = cpu = 0.0

        def perf_counter(self) -> float:
            return self.wall

        def thread_time(self) -> float:
            return self.cpu

    fake = Clock()
    monkeypatch.setattr(measure, "time", fake)
    monkeypatch.setattr(measure, "CPU_WARMUP_S", 0.0)
    monkeypatch.setattr(measure, "CPU_ROUND_S", 0.0)

    def call(ms: float, waited_ms: float = 0.0) -> None:
        """A call that ran ``ms`` on this thread, after waiting ``waited_ms`` for a core."""
        fake.cpu += ms / 1e3
        fake.wall += (ms + waited_ms) / 1e3

    return call


def test_cpu_timing_repeats_until_the_spread_is_small(clock) -> None:
    """Calls slowed by something else (here: every other call of the first rounds) leave the
    spread wide; the timing goes on until it narrows, and reports the steady time."""
    from bench import measure

    calls = []

    def step():
        calls.append(1)
        noisy = len(calls) <= 3 + 2 * measure.CPU_ROUND_CALLS
        clock(20 if noisy and len(calls) % 2 else 1)

    ms, p20, p80 = measure.time_ms(step, "cpu")
    assert len(calls) > 3 + 2 * measure.CPU_ROUND_CALLS  # more rounds than the noisy ones
    assert ms == pytest.approx(1) and p80 <= measure.CPU_MAX_SPREAD * p20


def test_cpu_time_waiting_for_a_core_is_not_counted(clock) -> None:
    """On a machine kept busy by other processes most calls wait for a core, for as long as the
    cell runs: the figure is the thread's CPU time, not the wall clock's."""
    from bench import measure

    calls = []

    def step():
        calls.append(1)
        clock(1, waited_ms=0 if len(calls) % 3 == 0 else 9)  # two calls in three waited

    ms, p20, p80 = measure.time_ms(step, "cpu")
    assert (ms, p20, p80) == pytest.approx((1, 1, 1))
