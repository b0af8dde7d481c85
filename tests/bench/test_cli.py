"""CPU smoke test of the benchmark CLI and the tuning entry point, so the suite never rots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT


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


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--modes", "fwd,sideways"], "unknown mode 'sideways'"),
        (["--providers", "magic"], r"unknown provider\(s\) \['magic'\]"),
        (["--shape", "1,2,3"], "--shape wants B,C,H,W,patch,D"),
    ],
)
def test_cli_rejects_bad_arguments(bad, says, tmp_path) -> None:
    """A usage error: a message naming the argument and a non-zero exit, before anything runs."""
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import main

    with pytest.raises(SystemExit, match=says):
        main([*bad, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_tune_variants_name_policy_fields_and_are_undone() -> None:
    """Every tuning variant names real launch-policy and Blocks fields, and is undone."""
    sys.path.insert(0, str(ROOT))
    from bench import tune
    from zeta_fused.op import policy

    before = policy.current()
    for name, changes in tune.VARIANTS.items():
        with policy.override(**changes) as pol:
            for field, value in changes.items():
                got = getattr(pol, field)
                if isinstance(value, dict):
                    assert all(getattr(got, k) == v for k, v in value.items()), name
                else:
                    assert got == value, name
            assert policy.current() is pol
        assert policy.current() is before, name
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
