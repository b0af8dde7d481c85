"""Converted models called from several threads at once give what the unconverted model gives
(the whole stems' per-call state is per thread), and the first fused calls, made by several
threads together, all run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from support import randomise
from torch import nn

from zeta_fused import fuse_stems

THREADS = 8
ROUNDS = 2


@pytest.fixture
def serial_interpreter(monkeypatch) -> None:
    """The Triton interpreter is not thread-safe (it patches ``triton.language`` while a kernel
    runs): on the CPU the kernels run one at a time, everything around them concurrently."""
    from zeta_fused.dispatch import interpreting

    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        lock, run = threading.RLock(), InterpretedFunction.run

        def serial(self, *args, **kwargs):
            with lock:
                return run(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", serial)


def in_threads(call: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]) -> list:
    """``call`` on each input, ROUNDS times, one thread per input, all started together: each
    thread's outputs, or the exception it raised. One call per input shape runs first, in this
    thread: the first fused call imports the launcher (tested apart), and each shape's first
    call compiles its kernels."""
    with torch.no_grad():
        for x in {x.shape: x for x in inputs}.values():
            call(x)
    barrier = threading.Barrier(len(inputs))
    results: list = [None] * len(inputs)

    def run(i: int) -> None:
        barrier.wait()
        try:
            with torch.no_grad():
                results[i] = [call(inputs[i]) for _ in range(ROUNDS)]
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: races show on every run
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return results


def assert_same_as_unconverted(results: list, expected: list[torch.Tensor]) -> None:
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert not isinstance(got, Exception), f"thread {i}: {got!r}"
        for out in got:
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5, msg=f"thread {i}")


BATCH_SIZES = 3


def inputs(device: str, size: int = 32, batch_sizes: int = BATCH_SIZES) -> list[torch.Tensor]:
    """One input per thread, of ``batch_sizes`` batch sizes."""
    return [torch.randn(1 + i % batch_sizes, 3, size, size, device=device) for i in range(THREADS)]


def timm_vit(device: str, **kw) -> nn.Module:
    """A tiny timm ViT with norm_pre (handed off to the fused stem), in eval mode."""
    vit = pytest.importorskip("timm.models.vision_transformer")
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                  num_classes=5, pre_norm=True, **kw)  # fmt: skip
    return randomise(model).eval().to(device)


def timm_from_threads(device: str, compile_backend=None) -> None:
    model = timm_vit(device, reg_tokens=1)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    xs = inputs(device, batch_sizes=3 if compile_backend is None else 1)
    with torch.no_grad():
        expected = [before.forward_features(x) for x in xs]
    call = model.forward_features
    if compile_backend is not None:
        torch._dynamo.reset()
        call = torch.compile(call, fullgraph=True, backend=compile_backend)
    assert_same_as_unconverted(in_threads(call, xs), expected)


def test_timm_whole_stem_from_threads(device, fused_path_calls, serial_interpreter) -> None:
    """One converted timm ViT (prefix rows, norm_pre handed off) used by 8 threads at once."""
    timm_from_threads(device)
    assert len(fused_path_calls) == THREADS * ROUNDS + BATCH_SIZES


def test_compiled_timm_whole_stem_from_threads(device, serial_interpreter) -> None:
    """The same, compiled (fullgraph: the per-call state is traced), with inputs of one shape:
    dynamo's recompilations from several threads at once are not reliable, for unconverted
    models too (torch 2.14: "Unexpected recompilation"). No call counter here: dynamo guards
    on its list and would compile again on every call."""
    graphs = []

    def keep_graph(gm: torch.fx.GraphModule, example_inputs) -> Callable:
        graphs.append(str(gm.graph))
        return gm.forward

    timm_from_threads(device, keep_graph)
    assert len(graphs) == 1 and "zeta_fused.patch_embed_fwd" in graphs[0]


def test_clip_pre_layrnorm_handoff_from_threads(device, fused_path_calls,
                                                serial_interpreter) -> None:  # fmt: skip
    """One converted transformers CLIP vision model (pre_layrnorm handed off) used by 8 threads
    at once."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=16,
                                           image_size=16, patch_size=8)  # fmt: skip
    model = randomise(transformers.CLIPVisionModel(config)).eval().to(device)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")
    xs = inputs(device, 16)
    with torch.no_grad():
        expected = [before(x).last_hidden_state for x in xs]
    results = in_threads(lambda x: model(x).last_hidden_state, xs)
    assert_same_as_unconverted(results, expected)
    assert len(fused_path_calls) == THREADS * ROUNDS + BATCH_SIZES


def test_handoff_pending_in_one_thread_is_not_seen_by_another() -> None:
    """While one thread's owner has handed its norm over (CLIP's pre_layrnorm, timm's
    norm_pre), the same norm called in another thread normalises its own input, and the first
    thread still gets its hand-off."""
    from zeta_fused.integrations import _base

    owner, stem, norm = nn.Identity(), nn.Identity(), randomise(nn.LayerNorm(8))
    _base.handoff_class(norm)
    y, z = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    handed, other_done, seen = threading.Event(), threading.Event(), {}

    def owner_call() -> None:
        with _base.handoff_scope(owner, stem, norm):
            seen["pending"] = _base.pending_norm(stem, 8)
            _base.hand_off(norm, y)
            handed.set()
            other_done.wait(60)
            seen["norm"] = norm(y)

    thread = threading.Thread(target=owner_call)
    thread.start()
    handed.wait(60)
    try:
        assert _base.pending_norm(stem, 8) is None
        out = norm(z)
    finally:
        other_done.set()
        thread.join()
    assert seen == {"pending": norm, "norm": y} and seen["norm"] is y
    torch.testing.assert_close(out, nn.functional.layer_norm(z, (8,), norm.weight, norm.bias))


FIRST_CALLS = """
import sys
import threading

import torch

import zeta_fused

device = sys.argv[1]
if device == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    lock, run = threading.Lock(), InterpretedFunction.run  # the interpreter is not thread-safe

    def serial(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    InterpretedFunction.run = serial
weight = torch.randn(8, 3 * 4 * 4, device=device)
barrier, errors = threading.Barrier(8), []


def first_call():
    barrier.wait()
    try:
        with torch.no_grad():
            x = torch.randn(1, 3, 8, 8, device=device)
            zeta_fused.patch_embed(x, 4, weight, backend="triton")
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


def test_first_fused_calls_from_threads(device) -> None:
    """The launcher is imported on the first fused call: threads that make it at the same time
    wait for the complete module instead of using a partly initialised one. In a fresh process:
    on a CUDA machine the real kernels on the GPU (compiled by the first calls), else the
    interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", FIRST_CALLS, device], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_per_call_state_is_cleared_when_a_call_fails(device) -> None:
    """An exception inside the converted model's forward leaves no state behind: the next
    call is the unconverted model's again."""
    model = timm_vit(device)
    before = copy.deepcopy(model)
    fuse_stems(model, backend="triton")

    def boom(module: nn.Module, args) -> None:
        raise RuntimeError("boom")

    handle = model.blocks[0].register_forward_pre_hook(boom)
    x = torch.randn(2, 3, 32, 32, device=device)
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    handle.remove()
    torch.testing.assert_close(model.patch_embed(x), before.patch_embed(x), rtol=1e-4, atol=1e-5)
    tokens = torch.randn(2, 17, 24, device=device)
    torch.testing.assert_close(model.norm_pre(tokens), before.norm_pre(tokens))
    torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
