"""``zeta_fused.warmup``: pay the fused kernels' first-call cost before the first real call.

Triton compiles a kernel variant the first time a launch needs it (each combination of norms,
dtypes, block sizes and alignments is one), which takes about a second of CPU time per variant;
with tuning on, the first call of each kind of call also times its candidates. ``warmup`` runs
a model on example inputs, so that both happen there, and reports each variant Triton compiled
meanwhile with its compile time (Triton's compile hooks).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Compiled(NamedTuple):
    """One kernel variant Triton compiled."""

    kernel: str
    variant: str  # Triton's description: warps, stages and the arguments' specialisation
    seconds: float


class WarmupReport(NamedTuple):
    compiled: list[Compiled]  # in the order they were compiled
    seconds: float  # wall time of the warm-up calls, compiles included

    def __str__(self) -> str:
        lines = [f"warm-up: {self.seconds:.2f} s, {len(self.compiled)} kernel variants compiled"]
        lines += [f"  {c.seconds:7.3f} s  {c.kernel}  {c.variant}" for c in self.compiled]
        return "\n".join(lines)


_recording_lock = threading.Lock()


@contextlib.contextmanager
def recording() -> Iterator[list[Compiled]]:
    """Collect the kernel variants Triton compiles while the block runs, in any thread, through
    its JIT hooks (hooks installed before are still called). Without those hooks (Triton older
    than 3.4) the list stays empty."""
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    compiled: list[Compiled] = []
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        yield compiled
        return
    started: dict[tuple[str, str], float] = {}
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def pre(*, key, fn, **kwargs):
        started[(fn.name, str(key))] = time.perf_counter()
        return before(key=key, fn=fn, **kwargs) if before else None  # truthy: skip the compile

    def post(*, key, repr, fn, **kwargs):
        t0 = started.pop((fn.name, str(key)), None)
        if t0 is not None:
            variant = repr.split("[", 1)[-1] if "[" in repr else repr
            compiled.append(Compiled(fn.name, f"[{variant}", time.perf_counter() - t0))
        return after(key=key, repr=repr, fn=fn, **kwargs) if after else None

    with _recording_lock:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = pre, post
        try:
            yield compiled
        finally:
            runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after


def _tensors(value) -> list[Tensor]:
    """The tensors in a model's output (nested tuples, lists, dicts, ModelOutput)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _restorer(module: nn.Module | None):
    """What a forward may change in ``module``, saved: every submodule's buffers (the tensors
    themselves, which a forward may replace, ``self.steps = self.steps + 1``, and their values,
    which it may update in place, batch-norm statistics) and the ``torch.Generator`` objects
    the submodules own. Returns the function that puts them back."""
    modules = [] if module is None else list(module.modules())
    held = [(m, dict(m._buffers)) for m in modules]
    values = {id(t): (t, t.detach().clone()) for _, bufs in held for t in bufs.values()
              if t is not None}  # fmt: skip
    generators = {id(g): (g, g.get_state()) for m in modules for g in vars(m).values()
                  if isinstance(g, torch.Generator)}  # fmt: skip

    def restore() -> None:
        for m, bufs in held:
            m._buffers.clear()
            m._buffers.update(bufs)
        with torch.no_grad():
            for buffer, value in values.values():
                buffer.copy_(value)
        for generator, state in generators.values():
            generator.set_state(state)

    return restore


def warmup(model, *examples, training: bool = False) -> WarmupReport:
    """Compile (and, with ``zeta_fused.tuning(True)``, tune) the fused kernels ``model`` needs
    for inputs like ``examples``, before its first real call.

    Each example is one call: a tensor (``model(x)``), a tuple of positional arguments or a
    dict of keyword arguments; give one per input shape, dtype or layout the model will see
    (the kernels are specialised on them, and the batch size decides some block sizes).
    Inference calls run under ``torch.no_grad()``; with ``training=True`` they run with autograd
    and a backward of the outputs, whose gradients are discarded (``.grad`` is left as it
    was). Buffers (batch-norm statistics, and buffers the forward replaces), the random number
    generators and the ``torch.Generator`` objects the model's modules own are restored, so the
    model and the random stream are as they were.

    Returns the variants Triton compiled meanwhile (every kernel, in any thread) with their
    compile times. Under ``torch.compile``, warm the compiled model up instead: its first calls
    compile the graph and the same kernels.
    """
    if not examples:
        raise ValueError("warmup needs at least one example input")
    module = model if isinstance(model, nn.Module) else None
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    restore = _restorer(module)
    calls = [
        ((), ex) if isinstance(ex, dict) else (ex if isinstance(ex, tuple) else (ex,), {})
        for ex in examples
    ]
    inputs = [t for args, kwargs in calls for t in _tensors([list(args), kwargs])]
    gpus = sorted({t.device.index or 0 for t in inputs + params if t.is_cuda})
    start = time.perf_counter()
    with recording() as compiled, torch.random.fork_rng(devices=gpus):
        try:
            for args, kwargs in calls:
                if not training:
                    with torch.no_grad():
                        model(*args, **kwargs)
                    continue
                with torch.enable_grad():
                    outs = [t for t in _tensors(model(*args, **kwargs)) if t.requires_grad]
                    wrt = params + [t for t in inputs if t.requires_grad]
                    if outs and wrt:
                        torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs],
                                            allow_unused=True)  # fmt: skip
            for index in gpus:
                torch.cuda.synchronize(index)
        finally:
            restore()
    return WarmupReport(list(compiled), time.perf_counter() - start)
