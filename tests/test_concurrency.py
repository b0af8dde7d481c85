"""The first fused calls, made by several threads together, all run."""

from __future__ import annotations

import os
import subprocess
import sys

FIRST_CALLS = """
import sys
import threading

import torch
from triton.runtime.interpreter import InterpretedFunction

import zeta_fused

lock, run = threading.Lock(), InterpretedFunction.run  # the interpreter is not thread-safe


def serial(self, *args, **kwargs):
    with lock:
        return run(self, *args, **kwargs)


InterpretedFunction.run = serial
weight = torch.randn(8, 3 * 4 * 4)
barrier, errors = threading.Barrier(8), []


def first_call():
    barrier.wait()
    try:
        with torch.no_grad():
            zeta_fused.patch_embed(torch.randn(1, 3, 8, 8), 4, weight, backend="triton")
    except Exception as exc:
        errors.append(repr(exc))


threads = [threading.Thread(target=first_call) for _ in range(8)]
sys.setswitchinterval(1e-6)  # threads take turns often: a race shows on every run
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
"""


def test_first_fused_calls_from_threads() -> None:
    """The launcher is imported on the first fused call: threads that make it at the same time
    wait for the complete module instead of using a partly initialised one."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
