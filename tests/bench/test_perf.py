"""``python -m bench.perf`` (make gpu-perf): the smoke plan end to end (on the CPU the fused op's
cells are skipped with the reason, the host probe runs through the interpreter), the cell
order, the time cap and the per-cell writes that let a stopped run keep what it measured, the
forward variants and the launch counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench import host, measure, perf, runner, tune
from bench.presets import PRESETS
from bench.providers import FUSED


@pytest.fixture
def quick_timing(monkeypatch) -> None:
    """One short round per CPU cell: the smoke run checks the script, not the figures."""
    monkeypatch.setattr(measure, "CPU_WARMUP_S", 0.0)
    monkeypatch.setattr(measure, "CPU_ROUND_S", 0.0)
    monkeypatch.setattr(measure, "CPU_MAX_S", 0.0)


def read(out) -> dict:
    return json.loads((out / "perf.json").read_text())


def test_smoke_run_measures_every_section(tmp_path, quick_timing) -> None:
    assert perf.main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = read(tmp_path)
    assert doc["complete"] is True and not doc["not_run"]
    assert {"torch", "triton", "date", "device"} <= set(doc["meta"])
    assert [c["ceiling"] for c in doc["ceilings"]] == [
        "copy", "gemm fp32", "gemm tiny_image", "gemm tiny_rows"
    ]  # fmt: skip
    assert all(c["ms"] > 0 and c["tbps"] > 0 for c in doc["ceilings"])
    assert set(doc["roofline"]) == {"copy_tbps", "gemm_tflops_fp32"}
    sections = {r["section"] for r in doc["results"]}
    assert sections == {"forward", "training", "subsets"}
    variants = [r for r in doc["results"] if r.get("variant")]
    assert {r["variant"] for r in variants} == set(perf.VARIANTS)
    assert all(r["status"] in ("ok", "skipped") for r in doc["results"])
    peers = [r for r in doc["results"] if r["provider"] != FUSED]
    assert peers and all(r["status"] == "ok" and r["ms"] > 0 and r["spread"] >= 1 for r in peers)
    if doc["meta"]["device"] == "cpu":
        fused = [r for r in doc["results"] if r["provider"] == FUSED]
        assert all(r["status"] == "skipped" and r["error"] for r in fused)
    probe = doc["host_overhead"]["tiny_image"]
    if doc["meta"]["device"] == "cuda":
        assert probe["module_us"] > 0 and probe["train_step_us"] > 0 and probe["linear_us"] > 0
        assert probe["launches"]["forward"]["triton_launches"] >= 1
    else:
        assert "needs CUDA" in probe["skipped"] and "needs CUDA" in probe["launches"]["skipped"]
    md = (tmp_path / "perf.md").read_text()
    headings = ("Ceilings of the device:", "Forward:", "Training:", "Subsets:", "host overhead")
    assert all(heading in md for heading in headings)
    assert "[fwd single 128-column tiles]" in md


def test_a_capped_run_keeps_the_cells_it_ran(tmp_path, quick_timing) -> None:
    """--max-cells N: N cells measured and on disk, the others listed as not run."""
    assert perf.main(["--smoke", "--max-cells", "6", "--out", str(tmp_path)]) == 0
    doc = read(tmp_path)
    ran = len(doc["ceilings"]) + len(doc["results"])
    assert ran == 6 and len(doc["not_run"]) == len(perf.cells(perf.SMOKE_PLAN, "cpu")) - 6
    assert all("--max-cells 6" in label for label in doc["not_run"])
    assert "Not run:" in (tmp_path / "perf.md").read_text()


def test_a_killed_run_has_written_every_cell_before(tmp_path, quick_timing, monkeypatch) -> None:
    """The documents are rewritten after every cell: a run killed in its sixth cell (the
    device tool's time limit) leaves the five before it on disk."""
    real, calls = runner.run_cell, []

    def dies_on_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(runner, "run_cell", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        perf.run(perf.SMOKE_PLAN, "cpu", tmp_path, budget_s=600)
    doc = read(tmp_path)
    assert doc["complete"] is False
    assert len(doc["ceilings"]) == 4 and len(doc["results"]) == 1  # the sixth cell died


def test_each_section_stops_at_its_share_of_the_budget(tmp_path, quick_timing) -> None:
    """No budget left: no cell starts, each is listed with its section, the run completes."""
    assert perf.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    doc = read(tmp_path)
    assert doc["complete"] is True and not doc["results"] and not doc["ceilings"]
    assert any("(the host section's time)" in label for label in doc["not_run"])


def test_cells_run_in_section_order_with_the_compile_peers_last() -> None:
    p, q = PRESETS["vit_b16"], PRESETS["vit_l14"]
    plan = perf.Plan(gemms=(p,), forward=(p, q), variant_presets=(p,),
                     training=((p, ("train",)),), host=p, subsets=(),
                     providers=(FUSED, "eager", "compile"))  # fmt: skip
    labels = [(c.section, c.label) for c in perf.cells(plan, "cpu")]
    sections = [s for s, _ in labels]
    assert sections == sorted(sections, key=[s for s, _ in perf.SHARES].index)
    forward = [label for s, label in labels if s == "forward"]
    assert forward[:2] == [f"vit_b16 fwd {FUSED}", f"vit_l14 fwd {FUSED}"]  # the defaults first
    assert forward[2 : 2 + len(perf.VARIANTS)] == [
        f"vit_b16 fwd {FUSED} [{name}]" for name in perf.VARIANTS
    ]
    assert forward[-2:] == ["vit_b16 fwd eager", "vit_l14 fwd eager"]
    # A preset's compile peers together: a run cut short has all of vit_b16's.
    assert [label for s, label in labels if s == "compile"] == [
        "vit_b16 fwd compile", "vit_b16 train compile", "vit_l14 fwd compile"
    ]  # fmt: skip


def test_gpu_plan_times_the_gemm_shapes_of_its_goal_presets() -> None:
    shapes = [perf._gemm_shape(p) for p in perf.PLAN.gemms]
    assert shapes == [(50176, 768, 768), (128 * 256, 588, 1024), (16384, 1176, 1280)]
    names = set(perf.PLAN.presets())
    assert {"b1_latency_b16", "vit_b16_stem", "mae_l16_subset", "timm_vit_b16_e2e"} <= names


def test_forward_variants_apply_or_say_why_not(monkeypatch) -> None:
    """A variant whose field the launch policy lacks is skipped with its name; one that changes
    nothing is skipped; the others run the cell under the changed policy, then undo it."""
    from zeta_fused.op import policy

    seen = []

    def fake_cell(p, mode, name, device):
        seen.append(policy.current().small_grid)
        return {"preset": p.name, "mode": mode, "provider": name, "status": "ok", "ms": 1.0}

    monkeypatch.setattr(tune, "run_cell", fake_cell)
    p, doc = PRESETS["vit_b16"], {"results": []}
    default = policy.current().small_grid
    variants = {"gone": {"no_such_field": 1}, "blocks": {"blocks_16bit": {"zz": 1}},
                "same": {"small_grid": default}, "fewer": {"small_grid": 0}}  # fmt: skip
    for name, changes in variants.items():
        perf._variant_cell(p, name, changes, "cpu").run(doc)
    gone, blocks, same, fewer = doc["results"]
    assert gone["status"] == "skipped" and "no_such_field" in gone["error"]
    assert blocks["status"] == "skipped" and "blocks_16bit.zz" in blocks["error"]
    assert same["status"] == "skipped" and "default" in same["error"]
    assert fewer["status"] == "ok" and fewer["variant"] == "fewer" and seen == [0]
    assert policy.current().small_grid == default


def test_launch_counts_split_the_projects_kernels_from_the_others() -> None:
    """GPU kernels by name, and the innermost aten operator around each launch call (the fused
    op's own launches have none), from events shaped like torch.profiler's."""
    from torch.autograd import DeviceType

    def event(name, parent=None, device=DeviceType.CPU):
        return SimpleNamespace(name=name, device_type=device, cpu_parent=parent)

    op = event("zeta_fused::patch_embed_bwd")
    zeros = event("aten::zeros", op)
    fill = event("aten::fill_", event("aten::zero_", zeros))
    to = event("aten::_to_copy", event("aten::to", op))
    copy = event("aten::copy_", to)
    events = [
        op, zeros, fill, to, copy,
        event("cuLaunchKernelEx", op), event("cuLaunchKernelEx", op),  # Triton's, twice
        event("cudaLaunchKernel", fill), event("cudaLaunchKernel", copy),
        event("cudaLaunchKernel", copy),  # one op, two kernels
        *(event(n, device=DeviceType.CUDA) for n in ("_dw_kernel", "_dw_kernel", "fill", "copy",
                                                     "copy")),
    ]  # fmt: skip
    got = host.launch_counts(events, frozenset({"_dw_kernel"}), calls=2)
    assert got["triton_launches"] == 1.0 and got["other_kernels"] == 1.5
    assert got["torch_ops"] == {"fill_": 0.5, "copy_": 0.5} and got["torch_kernel_ops"] == 1.0
    assert any(name.endswith("_kernel") for name in host.triton_kernel_names())
