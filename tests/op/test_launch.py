"""The launchers: numerics settings (TF32) and the device guard."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

launch = pytest.importorskip("zeta_fused.op.launch", reason="needs Triton")
plan = pytest.importorskip("zeta_fused.op.plan", reason="needs Triton")


TF32_SETTINGS = """
import os, torch
from zeta_fused import PatchEmbeddings
from zeta_fused.op import plan
from zeta_fused.op import policy

matmul = torch.backends.cuda.matmul
new_api = hasattr(torch.backends, "fp32_precision")
steps = [
    ("default", None, "ieee"),
    ("set_float32_matmul_precision high",
     lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    ("set_float32_matmul_precision highest",
     lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    ("allow_tf32 = True", lambda: setattr(matmul, "allow_tf32", True), "tf32"),
]
if new_api:  # after these, reading the legacy allow_tf32 raises
    steps += [
        ("fp32_precision = ieee", lambda: setattr(matmul, "fp32_precision", "ieee"), "ieee"),
        ("fp32_precision = tf32", lambda: setattr(matmul, "fp32_precision", "tf32"), "tf32"),
    ]
for name, apply, want in steps:
    if apply:
        apply()
    got = plan.numerics(torch.float32, policy.current())["DOT_PRECISION"]
    assert got == want, (name, got, want)
    assert plan.numerics(torch.bfloat16, policy.current())["DOT_PRECISION"] == "ieee", name
device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
m = PatchEmbeddings(3, 8, patch_size=4, backend="triton", device=device)
y = m(torch.randn(1, 3, 8, 8, device=device))
y.sum().backward()
assert torch.isfinite(y).all()
print("ok", len(steps))
"""


def test_fp32_precision_follows_every_torch_setter() -> None:
    """TF32 for fp32 GEMMs exactly when torch's matmul precision allows it, through the legacy
    and the new (torch >= 2.9) setters; a program that used the new one still runs (torch
    raises on reading the legacy flag then). A fresh process: these settings are global."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", TF32_SETTINGS], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


def test_launchers_switch_to_their_tensors_gpu(monkeypatch) -> None:
    """Triton launches on the current device: a call whose tensors are on another GPU runs
    under that GPU's device guard (logic checked with stand-ins; the 2-GPU run is a gpu test)."""
    entered = []

    class Guard:
        def __init__(self, device) -> None:
            entered.append(device)

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc) -> None:
            pass

    class OnGpu:
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    calls = []

    class Args(NamedTuple):
        x: object
        n: int

    wrapped = launch.on_tensor_device(lambda args: calls.append(args.n) or "ran")
    assert wrapped(Args(OnGpu(1), 2)) == "ran" and entered == [torch.device("cuda", 1)]
    assert wrapped(Args(OnGpu(0), 4)) == "ran" and len(entered) == 1
    assert wrapped(Args(torch.zeros(1), 5)) == "ran" and len(entered) == 1
    assert calls == [2, 4, 5]
    for launcher in (launch.patch_embed_fwd, launch.patch_embed_bwd):
        assert launcher.__wrapped__.__code__.co_filename == launch.__file__
