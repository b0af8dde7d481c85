"""bench.first_call on the CPU: the fresh Triton cache of every measurement, the tables from
stand-in figures, and the honest label of a run without a GPU (its cross-compiles are the
compile harness's; the GPU path runs with make gpu-check's tools)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import first_call
from bench.presets import PRESETS


def test_the_default_presets_exist() -> None:
    assert set(first_call.PRESETS) <= set(PRESETS)


def test_each_gpu_cell_runs_in_its_own_process_with_an_empty_cache(monkeypatch) -> None:
    seen = []

    def fake_run(command, env, cwd, **kw):
        cache = Path(env["TRITON_CACHE_DIR"])
        seen.append((command[-2:], cache, list(cache.iterdir())))
        compiles = [{"kernel": "k", "variant": "v", "seconds": 0.5}]
        row = {"preset": command[-2], "mode": command[-1], "status": "ok", "first_call_s": 1.0,
               "warm_call_ms": 0.1, "compiles": compiles}  # fmt: skip
        out = "noise\n" + json.dumps(row) if command[-2] == "vit_b16" else ""
        return subprocess.CompletedProcess(command, 0, out, "boom")

    monkeypatch.setattr(subprocess, "run", fake_run)
    rows = first_call.gpu_rows(["vit_b16", "vit_l14"])
    assert [s[0] for s in seen] == [
        [n, m] for n in ("vit_b16", "vit_l14") for m in first_call.MODES
    ]
    assert len({s[1] for s in seen}) == len(seen) and all(s[2] == [] for s in seen)
    assert rows[0]["status"] == "ok" and rows[-1] == {
        "preset": "vit_l14", "mode": "train", "status": "failed", "error": "boom"}  # fmt: skip
    table = first_call.gpu_table(rows)
    assert "| vit_b16 | fwd | 1.00 | 0.50 | 1 | 0.100 |" in table
    assert "| k | 2 | 0.50 | 0.50 | 1.0 |" in table and "failed: boom" in table


def test_without_a_gpu_the_kernels_are_cross_compiled(monkeypatch, tmp_path) -> None:
    seen, real_run = {}, subprocess.run

    def fake_run(command, env=None, **kw):
        if "aot_compile.py" not in str(command):  # device_info's own probes
            return real_run(command, env=env, **kw)
        seen.update(command=command, env=env)
        records = [{"kernel": "_fwd", "compile_s": 1.5}, {"kernel": "_fwd", "compile_s": 0.5},
                   {"kernel": "_dw", "compile_s": 2.0}]  # fmt: skip
        Path(command[command.index("--json") + 1]).write_text(json.dumps(records))
        return subprocess.CompletedProcess(command, 0, "Triton 9.9 from somewhere\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(first_call.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert first_call.main(["--target", "sm_120", "--out", str(tmp_path)]) == 0
    assert seen["command"][seen["command"].index("--target") + 1] == "sm_120"
    assert "TRITON_INTERPRET" not in seen["env"]
    assert not any(Path(seen["env"]["TRITON_CACHE_DIR"]).glob("*"))  # empty when it started
    doc = json.loads((tmp_path / "first_call.json").read_text())
    assert "no GPU: cross-compiled for sm_120" in doc["meta"]["method"]
    text = (tmp_path / "first_call.md").read_text()
    assert "| _fwd | 2 | 1.00 | 1.50 | 2.0 |" in text and "Triton 9.9" in text
