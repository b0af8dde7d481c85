"""Bound launches against Triton's own, without a GPU (run by tests/op/test_bound.py, in a process
where TRITON_INTERPRET is unset, with whichever Triton is importable).

A Triton driver for an sm_90 device that is not there: kernels are compiled for real (ptxas),
never loaded, and launched through a recording launcher instead of CUDA. A small kernel with
every kind of argument the launchers pass (tensors, ints, tuples of ints and of optional
tensors, None, floats, bools, constexprs, launch options) is launched with a sequence of
argument sets that differ in one thing each. For each, ``bound.launch`` and ``kernel[grid]``
are called: the bound launch must run the compiled kernel Triton's own binder and cache choose
(``kernel.run(..., warmup=True)``), with the launcher arguments of Triton's own launch (launch
metadata and hooks aside, which are None while no hook is installed), and from its second call
without entering Triton's ``JITFunction.run``. Then the same calls from 8 threads at once, on
fresh kernels (first calls together). Prints one line per argument set, then "ok"; exits
non-zero on the first difference.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET first"
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: no CUDA device in this process

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from zeta_fused.op import bound, workspace  # noqa: E402

launches: list[tuple] = []  # (thread, launcher, args) of every launch
_handles = itertools.count(1)


class RecordingLauncher:
    """Stands in for Triton's CudaLauncher of one compiled kernel."""

    def __init__(self, src, metadata) -> None:
        self.hash = metadata.hash  # of the compiled binary

    def __call__(self, *args) -> None:
        launches.append((threading.get_ident(), self, args))


class FakeUtils:
    def load_binary(self, name, kernel, shared, device):
        handle = next(_handles)
        return handle, handle, 32, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}  # fmt: skip


class FakeDriver:
    launcher_cls = RecordingLauncher

    def __init__(self) -> None:
        self.utils = FakeUtils()

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 7

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


driver.set_active(FakeDriver())


OFFSET = tl.constexpr(0)  # a global the kernel reads: Triton checks on every launch that it holds


def make_kernel():
    @triton.jit
    def probe_kernel(
        X, x_stride, strides, pair, n, scale, flag, MODE: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.arange(0, BLOCK)
        y = tl.load(X + offs * x_stride + strides[0] + OFFSET, mask=offs < n, other=0.0)
        if pair[0] is not None:
            y += tl.load(pair[0] + offs * strides[1], mask=offs < n, other=0.0)
        if MODE:
            y = y * scale
        if flag:
            y = y + 1
        tl.store(X + offs, y, mask=offs < n)

    return probe_kernel


x32 = torch.zeros(64, dtype=torch.float32)
x16 = torch.zeros(64, dtype=torch.float16)
# A workspace part (zeta_fused.op.workspace) in the tensor's place: a dtype and an address.
slot32 = workspace.Slot(x32.data_ptr(), torch.float32)
slot32_unaligned = workspace.Slot(x32.data_ptr() + 4, torch.float32)
# Each set differs from the base in one argument; "unaligned" and the int cases are those whose
# specialisation Triton changes on a value (a pointer's 16-byte alignment, n == 1, n % 16).
BASE = ((x32, 1, (16, 1), (x32, None), 16, 0.5, True), {"MODE": 1, "BLOCK": 64})
CHANGES = {
    "base": {},
    "unaligned pointer": {0: x32[1:]},
    "other dtype": {0: x16, 3: (x16, None)},
    "slot": {0: slot32, 3: (slot32, None)},
    "unaligned slot": {0: slot32_unaligned},
    "int 17": {4: 17},
    "int 24": {4: 24},
    "int 32": {4: 32},
    "int 1": {4: 1},
    "int 2**31": {4: 2**31},
    "stride 1 -> 2": {1: 2},
    "tuple element 17": {2: (17, 1)},
    "tuple of 3": {2: (16, 1, 1)},
    "tensor -> None": {3: (None, None)},
    "None -> tensor": {3: (x32, x32)},
    "float 1.0 -> int 1": {5: 1},
    "bool -> int 1": {6: 1},
    "constexpr True": {"MODE": True},
    "constexpr 0": {"MODE": 0},
    "BLOCK 32": {"BLOCK": 32},
    "num_warps 2": {"num_warps": 2},
}


def case(name: str) -> tuple[tuple, dict]:
    args, kwargs = list(BASE[0]), dict(BASE[1])
    for where, value in CHANGES[name].items():
        if isinstance(where, int):
            args[where] = value
        else:
            kwargs[where] = value
    return tuple(args), kwargs


def triton_runs(kernel) -> list[int]:
    """Counts calls of the kernel's JITFunction.run (Triton's own launch path)."""
    calls, run = [], kernel.run
    kernel.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    return calls


def last_launch() -> tuple:
    me = threading.get_ident()
    return next(launch[1:] for launch in reversed(launches) if launch[0] == me)


# Each case's keywords as one dict kept for the run, as the launchers keep a call signature's:
# bound.launch_fixed binds it once.
FIXED: dict[tuple, dict] = {}


def compare(kernel, name: str, bound_path: bool, grid=(2,)) -> object:
    """Launch ``name``'s arguments bound (``bound.launch``, then ``bound.launch_fixed``) and
    through Triton; returns the compiled kernel. ``bound_path``: the bound launches did not go
    through Triton's path (their signature was launched before)."""
    args, kwargs = case(name)
    fixed = FIXED.setdefault((id(kernel), name), dict(kwargs))
    bound.launch(kernel, grid, *args, **kwargs)
    launched = [last_launch()]
    chosen = kernel.run(*args, grid=grid, warmup=True, **kwargs)
    kernel[grid](*args, **kwargs)
    own_launcher, own = last_launch()
    bound.launch_fixed(kernel, grid, fixed, *args)
    launched.append(last_launch())
    for launcher, got in launched:
        # (Threads that compile the same variant together may each keep a copy of the binary.)
        assert launcher.hash == chosen.hash, f"{name}: bound launch ran another compiled kernel"
        assert not bound_path or launcher is chosen.run
        assert own_launcher.hash == launcher.hash
        # The launcher's arguments: grid, stream, function handle (that of the copy launched),
        # packed metadata, launch metadata and hooks (None in a bound launch without hooks),
        # then every parameter's value.
        same_copy = own_launcher is launcher
        for i, (mine, theirs) in enumerate(zip(got, own, strict=True)):
            if 6 <= i <= 8:
                assert not bound_path or mine is None, f"{name}: argument {i} is {mine!r}"
            elif i != 4 or same_copy:
                assert mine is theirs or mine == theirs, f"{name}: argument {i} differs"
    return chosen


def main() -> int:
    print(f"Triton {triton.__version__} from {Path(triton.__file__).resolve().parent}")
    kernel = make_kernel()
    runs = triton_runs(kernel)
    chosen = {}
    for name in CHANGES:
        compare(kernel, name, False)
        before = len(runs)
        compiled = compare(kernel, name, True)  # the second time: no JITFunction.run of ours
        assert len(runs) == before + 2, f"{name}: the bound launch went through Triton's path"
        chosen[name] = compiled
        print(f"{name}: {compiled.hash[:12]}")
    fixed = bound._bindings[id(kernel)].fixed.values()  # launch_fixed bound every case itself
    assert len(fixed) == len(CHANGES) and all(bind is not None for _, bind, _ in fixed)
    distinct = {n for n in CHANGES if n != "base" and chosen[n] is not chosen["base"]}
    # Every other change gives another compiled kernel: 32, like 16, is a multiple of 16, and
    # Triton's cache takes MODE=True for MODE=1 (its key cache compares values with ==).
    # A Slot is specialised as a tensor of its dtype and alignment.
    assert distinct == set(CHANGES) - {"base", "int 32", "constexpr True", "slot"}, distinct
    assert chosen["unaligned slot"] is chosen["unaligned pointer"]

    # A launch hook (a profiler's) gets Triton's own launch, metadata and all.
    from triton import knobs

    def hook(metadata) -> None:
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = len(runs)
        bound.launch(kernel, (2,), *case("base")[0], **case("base")[1])
        passed = last_launch()[1][7]  # the enter hook the launcher calls
        assert len(runs) == before + 1 and passed is knobs.runtime.launch_enter_hook
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    print("launch hook: Triton's path")

    # A global the kernel read, changed since: Triton's path reports it.
    global OFFSET
    saved, OFFSET = OFFSET, tl.constexpr(1)
    try:
        bound.launch(kernel, (2,), *case("base")[0], **case("base")[1])
        raise AssertionError("a changed global was not reported")
    except RuntimeError as exc:
        assert "OFFSET has changed" in str(exc), exc
    finally:
        OFFSET = saved
    compare(kernel, "base", True)
    print("changed global: Triton's error")

    # First calls from 8 threads at once, on a fresh kernel.
    kernel = make_kernel()
    barrier, errors = threading.Barrier(8), []

    def first_calls() -> None:
        barrier.wait()
        try:
            for name in CHANGES:
                compare(kernel, name, False)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=first_calls) for _ in range(8)]
    sys.setswitchinterval(1e-6)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
