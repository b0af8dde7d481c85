"""zeta_fused.warmup: runs the model's calls ahead of time without changing the model, its
gradients or the random stream, and reports Triton's compiles (its hooks are driven by hand
on the CPU, where the interpreter compiles nothing; the GPU test checks real compiles)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import zeta_fused
from zeta_fused import PatchEmbeddings, warmup

warmup_mod = pytest.importorskip("zeta_fused.op.warmup")
triton = pytest.importorskip("triton")


class WithStats(nn.Module):
    """A fused stem, then a batch norm over tokens and dropout: buffers and RNG in play."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.embed = PatchEmbeddings(3, 16, patch_size=4, backend="triton", device=device)
        self.norm = nn.BatchNorm1d(16, device=device)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.embed(x)
        return {"tokens": self.drop(self.norm(y.transpose(1, 2))), "raw": y}


@pytest.mark.parametrize("training", [False, True])
def test_warmup_runs_the_calls_and_changes_nothing(device, fused_path_calls, training) -> None:
    model = WithStats(device).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, small = torch.randn(2, 3, 16, 16, device=device), torch.randn(1, 3, 8, 8, device=device)
    torch.manual_seed(7)
    expected_rng = torch.rand(3)
    torch.manual_seed(7)
    report = warmup(model, x, (small,), training=training)
    assert torch.equal(torch.rand(3), expected_rng)  # the random stream is where it was
    assert len(fused_path_calls) == 2  # both examples ran the fused op
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # parameters and batch-norm statistics
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(report, zeta_fused.WarmupReport) and report.seconds > 0
    if device == "cpu":
        assert report.compiled == []  # the interpreter compiles nothing
    assert "warm-up" in str(report)


class Counting(nn.Module):
    """A forward that replaces its buffers (a step count, an EMA of its tokens) and draws from
    a generator of its own."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.embed = PatchEmbeddings(3, 16, patch_size=4, backend="triton", device=device)
        self.register_buffer("steps", torch.zeros((), device=device))
        self.register_buffer("ema", torch.zeros(16, device=device))
        self.noise = torch.Generator(device).manual_seed(3)

    def forward(self, x):
        y = self.embed(x)
        self.steps = self.steps + 1
        self.ema = 0.9 * self.ema + 0.1 * y.detach().mean((0, 1))
        return y + torch.rand(y.shape, generator=self.noise, device=y.device)


@pytest.mark.parametrize("training", [False, True])
def test_warmup_restores_replaced_buffers_and_owned_generators(device, training) -> None:
    model = Counting(device)
    steps, ema = model.steps, model.ema
    expected_draw = torch.rand(4, generator=torch.Generator(device).manual_seed(3), device=device)
    warmup(model, torch.randn(2, 3, 8, 8, device=device), training=training)
    assert model.steps is steps and model.ema is ema  # the very tensors, with their values
    assert model.steps.item() == 0 and not model.ema.any()
    assert dict(model.named_buffers()) == {"steps": steps, "ema": ema}
    assert torch.equal(torch.rand(4, generator=model.noise, device=device), expected_draw)


def test_warmup_needs_an_example() -> None:
    with pytest.raises(ValueError, match="example"):
        warmup(nn.Identity())


def test_warmup_tunes_when_tuning_is_on(monkeypatch, tmp_path) -> None:
    tuning = pytest.importorskip("zeta_fused.op.tuning")
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_loaded", set())
    monkeypatch.setattr(tuning, "_enabled", True)
    timed = []
    monkeypatch.setattr(tuning, "_time_ms", lambda label, fn, cuda: (fn(), timed.append(label))
                        and 1.0 or 1.0)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PatchEmbeddings(3, 16, patch_size=4, backend="triton", device=device)
    warmup(model, torch.randn(2, 3, 16, 16, device=device), training=True)
    assert any(t.startswith("fwd") for t in timed) and any(t.startswith("bwd") for t in timed)
    timed.clear()
    model(torch.randn(2, 3, 16, 16, device=device)).sum().backward()
    assert timed == []  # the real call finds its choices


def hook_call(hook, name: str, key: str):
    fn = SimpleNamespace(name=name, module="zeta_fused.kernels.x", jit_function=None)
    return hook(key=key, repr=f"{name}[num_warps=8, num_stages=3](X: *bf16)", fn=fn,
                compile={}, is_manual_warmup=False, already_compiled=False)  # fmt: skip


def test_compile_times_come_from_tritons_hooks() -> None:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no JIT compile hooks")
    seen = []
    user_pre = lambda **kw: seen.append(("pre", kw["fn"].name))  # noqa: E731
    user_post = lambda **kw: seen.append(("post", kw["fn"].name))  # noqa: E731
    saved = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = user_pre, user_post
    try:
        with warmup_mod.recording() as compiled:
            assert not hook_call(runtime.jit_cache_hook, "_fwd", "k1")  # never skips a compile
            hook_call(runtime.jit_cache_hook, "_bwd", "k2")
            hook_call(runtime.jit_post_compile_hook, "_bwd", "k2")
            hook_call(runtime.jit_post_compile_hook, "_fwd", "k1")
        assert [c.kernel for c in compiled] == ["_bwd", "_fwd"]
        assert all(c.seconds >= 0 for c in compiled)
        assert compiled[0].variant == "[num_warps=8, num_stages=3](X: *bf16)"
        assert seen == [("pre", "_fwd"), ("pre", "_bwd"), ("post", "_bwd"), ("post", "_fwd")]
        assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == (user_pre, user_post)
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = saved


@pytest.mark.gpu
def test_warmup_compiles_what_the_first_call_would(tmp_path, monkeypatch) -> None:
    """After warmup, the same call compiles nothing (a fresh Triton cache and a patch no other
    test uses, which the kernels are specialised on: real compiles)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    model = PatchEmbeddings(2, 40, patch_size=(5, 3), backend="triton", device="cuda")
    x = torch.randn(3, 2, 20, 21, device="cuda")
    report = warmup(model, x, training=True)
    names = {c.kernel for c in report.compiled}
    assert {"_patch_embed_fwd_kernel", "_bwd_dz_kernel", "_bwd_dw_kernel"} <= names, names
    with warmup_mod.recording() as compiled:
        model(x).sum().backward()
    assert compiled == []


KERNELS = ("_patch_embed_fwd_kernel", "_bwd_dz_kernel", "_bwd_dw_kernel",
           "_bwd_dx_kernel", "_segment_sum_kernel")  # fmt: skip


class Variants:
    """Records the variant of every fused launch as a GPU's JIT would key it: Triton's own
    binder specialises the arguments for sm_90 (an int equal to 1 becomes a constant, ints and
    pointers divisible by 16 get a hint; None, dtypes, constexprs, warps and stages), then the
    real kernel runs (the interpreter on the CPU). Two launches of one variant compile once."""

    def __init__(self, monkeypatch) -> None:
        pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        launch = pytest.importorskip("zeta_fused.op.launch")
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.seen: list[tuple] = []
        for name in KERNELS:
            kernel = getattr(launch, name)
            jit = JITFunction(kernel.fn)
            binder = create_function_from_signature(jit.signature, jit.params, self.backend)
            monkeypatch.setattr(launch, name, self._spy(name, kernel, jit, binder))

    def _spy(self, name, kernel, jit, binder):
        variants = self

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    bound, spec, options = binder(*args, **kwargs)
                    options, sig, const, attrs = jit._pack_args(variants.backend, kwargs, bound,
                                                                spec, options)  # fmt: skip
                    variants.seen.append((name, str(sig), str(const), str(attrs),
                                          options.num_warps, options.num_stages))  # fmt: skip
                    return kernel[grid](*args, **kwargs)

                return run

        return Spy()


@pytest.mark.parametrize("loss", ["sum", "mean", "head"])
def test_the_first_call_after_warmup_needs_no_other_variant(device, monkeypatch, loss) -> None:
    """What the GPU test checks with real compiles, on any machine: the first training call
    after warmup launches only variants warmup launched, whatever gradient the loss gives the
    stem (``.sum()`` and ``.mean()`` give a broadcast one, of stride 0; a layer after it a
    dense one)."""
    variants = Variants(monkeypatch)
    model = PatchEmbeddings(2, 40, patch_size=(5, 3), backend="triton", device=device)
    if loss == "head":
        model = nn.Sequential(model, nn.Linear(40, 8, device=device))
    x = torch.randn(3, 2, 20, 21, device=device)
    warmup(model, x, training=True)
    warmed = set(variants.seen)
    assert {v[0] for v in warmed} >= {"_patch_embed_fwd_kernel", "_bwd_dz_kernel"}
    variants.seen.clear()
    y = model(x)
    (y.sum() if loss == "sum" else y.mean() if loss == "mean" else y.square().sum()).backward()
    assert variants.seen and set(variants.seen) <= warmed, set(variants.seen) - warmed
