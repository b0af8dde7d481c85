"""Bound launches (zeta_fused/op/bound.py) run the compiled kernel Triton's own launch would run,
on the venv's Triton and on the GPU image's (3.6), without a GPU: a signature key at least as
fine as Triton's specialisation, and the launcher called with Triton's own arguments."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import TESTS

from zeta_fused.op import bound

SCRIPT = TESTS / "bound_launch_check.py"
ALT_TRITON = os.environ.get("ZETA_FUSED_ALT_TRITON")


def run_check(env: dict) -> str:
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
    return done.stdout


def test_bound_launches_run_what_triton_chooses() -> None:
    """An unaligned pointer, an int going from 16 to 17 or 24 (or 1), another dtype, a None
    for a tensor, a bool for an int, a constexpr, a launch option: each bound launch runs the
    compiled kernel Triton's binder and cache choose for its arguments, with the launcher
    arguments of Triton's own launch; a launch hook gets Triton's own launch, a changed global
    the kernel reads Triton's error; first calls from 8 threads at once too."""
    run_check(dict(os.environ))


@pytest.mark.skipif(ALT_TRITON is None, reason="ZETA_FUSED_ALT_TRITON unset (make test sets it)")
def test_bound_launches_with_the_gpu_images_triton() -> None:
    path = os.pathsep.join([ALT_TRITON, os.environ.get("PYTHONPATH", "")])
    out = run_check(os.environ | {"PYTHONPATH": path})
    assert f"from {Path(ALT_TRITON).resolve()}" in out, out[:200]


def values() -> list:
    """Arguments of every kind, on both sides of each boundary Triton's specialiser draws."""
    ints = [0, 1, 2, 15, 16, 17, 24, 32, -1, -16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
            2**63 - 1, 2**63, -(2**63), 2**64 - 16]  # fmt: skip
    storage = torch.zeros(64)
    tensors = [storage, storage[1:], storage[4:], storage.half(), storage.half()[8:],
               storage.bool(), storage.to(torch.bfloat16)]  # fmt: skip
    scalars = [*ints, *tensors, None, 0.5, 1.0, -0.0, True, False]
    return [*scalars, (16, 1), (17, 1), (1, 16), (16, 1, 1), (storage, None), (None, storage),
            (None, None), (storage[1:], None), ()]  # fmt: skip


def test_key_is_as_fine_as_tritons_specialiser() -> None:
    """Two arguments with the same key get the same specialisation from Triton's own
    specialiser (the signature type and the divisibility hint or constant 1)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def triton_spec(v):
        return native_specialize_impl(BaseBackend, v, False, True, True)

    for a, b in itertools.combinations(values(), 2):
        if bound._spec(a) == bound._spec(b):
            assert triton_spec(a) == triton_spec(b), (a, b)
    for beyond in (2**64, -(2**63) - 1, [1], "s"):  # Triton refuses them: its path reports it
        with pytest.raises(TypeError):
            bound._spec(beyond)


def test_generated_binder_gives_the_key_of_any_argument() -> None:
    """The binder computes each key inline for the types of its first call; any other type,
    tuple length or value goes to the generic key, so the key of an argument never depends on
    which path gave it."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def kernel(a, b, c, MODE: tl.constexpr, BLOCK: tl.constexpr = 64):
        pass

    jit = JITFunction(kernel)
    every = values()
    for first in every:
        pair = (first, first)  # (a tuple of plain values: its key found by identity first)
        bind = bound._make_binder(jit, (first, first, pair), {"MODE": 1})
        for v in every:
            got, key = bind(v, first, (v, v), MODE=v, num_warps=4)
            assert got[0] is v and got[4] == 64
            assert key[0] == bound._spec(v), (first, v)
            assert key[2] == bound._spec((v, v)), (first, v)
            assert key[3] is v and key[4] == 64 and key[5:] == (("num_warps", 4), int)
        assert bind(first, first, pair, MODE=1)[1][2] == bound._spec(pair)


def test_anything_but_a_jit_kernel_is_launched_as_it_is() -> None:
    """The interpreter's kernels, test spies and the perf probes' stubs get kernel[grid]."""
    calls = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    bound.launch(Spy(), (3,), 1, None, BLOCK=16)
    bound.launch_fixed(Spy(), (3,), {"BLOCK": 16}, 1, None)
    assert calls == [((3,), (1, None), {"BLOCK": 16})] * 2
