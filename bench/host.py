"""What a fused call costs the host, and the kernels it launches.

One case, the module of a small preset (``b1_latency_b16``: batch 1), serves the benchmark's
host-overhead figures (:func:`bench.runner.host_overhead`), the launch counts of
``python -m bench.perf`` and ``bench.host_profile``'s profiles:

- the module's forward under ``no_grad``;
- the same call as a bare launch of the forward kernel (no module, no checks, no custom op);
- ``F.linear`` on the same rows: torch's own dispatch cost on this machine, a baseline;
- a training step at a small batch: gradients set to None (as optimizers do), forward,
  ``backward`` of a fixed output gradient (no loss ops, so that every kernel counted is the
  op's or autograd's).
"""

from __future__ import annotations

import collections
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .presets import Preset

# Batch of the training step: small, so that its time is the host's, not the kernels'.
TRAIN_BATCH = 8
# The CUDA runtime and driver calls that put work on the GPU (a kernel, a memset or a copy),
# as the profiler names them (prefixes: cudaLaunchKernelExC, cuLaunchKernelEx, ...).
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel",
                "cudaMemsetAsync", "cudaMemcpyAsync", "cuMemsetD", "cuMemcpy")  # fmt: skip


@dataclass(frozen=True)
class Case:
    """The calls of the host probe, each ready to call with no arguments."""

    module: nn.Module
    forward: Callable[[], object]
    launch: Callable[[], object]
    linear: Callable[[], object]
    train_step: Callable[[], object]
    train_batch: int


def case(p: Preset, device: str, train_batch: int = TRAIN_BATCH) -> Case:
    """The host probe's calls for an image preset on ``device`` (a GPU, or the interpreter)."""
    from zeta_fused import PatchEmbeddings
    from zeta_fused.functional import op_inputs
    from zeta_fused.kernels.contract import LAYER_NORM
    from zeta_fused.op.args import Norm
    from zeta_fused.op.launch import patch_embed_fwd

    m = PatchEmbeddings(p.channels, p.dim, patch_size=p.patch, backend="triton")
    m = m.to(device, p.torch_dtype)
    shape = (p.channels, p.height, p.width)
    x = torch.randn(p.batch, *shape, device=device, dtype=p.torch_dtype)
    xb = torch.randn(train_batch, *shape, device=device, dtype=p.torch_dtype)
    ln1, proj, ln2 = m.embedding[1], m.embedding[2], m.embedding[3]
    norms = (Norm(LAYER_NORM, ln.weight, ln.bias, ln.eps) for ln in (ln1, ln2))
    args = op_inputs(x, p.patch, proj.weight, proj.bias, *norms)
    rows = torch.randn(p.batch * p.tokens, p.patch_dim, device=device, dtype=p.torch_dtype)
    dy = torch.randn(train_batch, p.tokens, p.dim, device=device, dtype=p.torch_dtype)

    @torch.no_grad()
    def forward():
        return m(x)

    @torch.no_grad()
    def launch():
        return patch_embed_fwd(args)

    @torch.no_grad()
    def linear():
        return torch.nn.functional.linear(rows, proj.weight, proj.bias)

    def train_step():
        m.zero_grad(set_to_none=True)
        m(xb).backward(dy)

    return Case(m, forward, launch, linear, train_step, train_batch)


def triton_kernel_names() -> frozenset[str]:
    """Names of the project's Triton functions (kernels and the helpers they call): a GPU
    kernel of one of these names is a launch of the fused op."""
    import triton.runtime.jit

    import zeta_fused.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, triton.runtime.jit.KernelInterface):
                names.add(obj.fn.__name__)
    return frozenset(names)


def count_launches(fn: Callable[[], object], device: str, calls: int = 3) -> dict:
    """Per call of ``fn`` (after one untimed call), read from torch.profiler on a GPU: the
    kernels it runs (the project's Triton kernels, and the others by name) and the torch
    operators that launch them. Without CUDA nothing is launched: empty counts."""
    fn()
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return launch_counts(prof.events(), triton_kernel_names(), calls)


def launch_counts(events: Iterable, triton_names: frozenset[str], calls: int) -> dict:
    """The counts of :func:`count_launches` from the profiler's events: GPU events (kernels,
    memsets, copies) by name, and the innermost aten operator around each launch call (the
    Triton kernels' launches have none: the fused op is not an aten operator)."""
    from torch.autograd import DeviceType

    kernels, launching = collections.Counter(), {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            kernels[e.name] += 1
        elif e.name.startswith(LAUNCH_CALLS):
            op = e.cpu_parent
            while op is not None and not op.name.startswith("aten::"):
                op = op.cpu_parent
            if op is not None:
                launching[id(op)] = op.name.removeprefix("aten::")
    ops = collections.Counter(launching.values())
    triton = collections.Counter({k: n for k, n in kernels.items() if k in triton_names})

    def per_call(counter: collections.Counter) -> dict[str, float]:
        return {name: n / calls for name, n in counter.most_common()}

    return {
        "triton_launches": triton.total() / calls,
        "other_kernels": (kernels - triton).total() / calls,
        "torch_kernel_ops": ops.total() / calls,
        "kernels": per_call(kernels),
        "torch_ops": per_call(ops),
    }
