"""Gradients of the fused op: gradcheck in fp64 and the accuracy rule for all seven gradients."""

from __future__ import annotations

import pytest
import torch
from support import compare, grads, make, module_op_inputs

from zeta_fused import patch_embed
from zeta_fused.op import policy
from zeta_fused.op.args import BwdArgs, Grads


@pytest.fixture(params=[False, True], ids=["(i, j, c) order", "re-laid (c, i, j) order"])
def k_order(request):
    """Both orders of the kernels that read the weight: small calls keep a Linear weight's
    (i, j, c) order, large ones re-lay the weight and pre-norm parameters in (c, i, j)."""
    with policy.override(relayout_min_tokens=0 if request.param else 2**31):
        yield


@pytest.fixture
def compiled_branches():
    """The kernels' compiled-code branches (tl.dot with its accumulator operand and
    out_dtype, plain casts), which a GPU runs, here under the interpreter too: its tl.dot is
    exact in fp32 and fp64, only bf16 needs the emulated branch."""
    with policy.override(emulate_bf16=False):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.usefixtures("compiled_branches")
def test_compiled_code_branches(dtype, device) -> None:
    compare(make(3, 40, (4, 2)), torch.randn(3, 3, 16, 12), dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tuning_alternatives(dtype, device, monkeypatch) -> None:
    """The launch alternatives bench.tune times stay correct: (c, i, j) order for a patch width
    that is not a power of two (weight re-laid), and post-norm-backward programs narrower than
    the other kernels' (more rows of column partials)."""
    from zeta_fused.op import layout

    spy = []
    real = layout.k_order_of
    monkeypatch.setattr(layout, "k_order_of", lambda *a: spy.append(real(*a)) or spy[-1])
    narrow = {"dz_m": 16}
    with policy.override(channels_first_any_width=True, relayout_min_tokens=0,
                         blocks_16bit=narrow, blocks_32bit=narrow):  # fmt: skip
        compare(make(3, 40, (3, 5)), torch.randn(2, 3, 12, 20), dtype, device)
    assert spy and all(k.channels_first for k in spy)


FLAGS = {
    "all": (True, True, True),
    "none": (False, False, False),
    "timm": (False, True, True),
    "pre_no_bias": (True, True, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 3, 28, 28, 14, 24), (3, 2, 12, 20, (3, 5), 17), (1, 3, 16, 16, 4, 300)], ids=str
)
@pytest.mark.usefixtures("k_order")
def test_all_gradients(shape, dtype, device) -> None:
    B, C, H, W, patch, D = shape
    compare(make(C, D, patch), torch.randn(B, C, H, W), dtype, device)


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.usefixtures("k_order")
def test_flag_variants(flags, device) -> None:
    compare(make(3, 20, 4, flags), torch.randn(2, 3, 8, 12), torch.float32, device)


def guarded(t: torch.Tensor) -> torch.Tensor:
    """t's values in the middle of a NaN-filled buffer three times its size: a kernel that reads
    past either end of an operand (a ragged edge left unmasked) turns its results NaN."""
    n = max(t.numel(), 256)
    buf = torch.full((t.numel() + 2 * n,), float("nan"), dtype=t.dtype, device=t.device)
    return buf[n : n + t.numel()].view(t.shape).copy_(t)


@pytest.mark.parametrize("tile_rows", [16, 64])
@pytest.mark.usefixtures("k_order")
def test_no_kernel_reads_past_an_operand(tile_rows, device) -> None:
    """Ragged K (45), D (40) and token tiles (48 tokens) with every operand, the upstream
    gradient included, fenced by NaN: forward and all gradients stay finite and unchanged. (A
    stray read whose value a later mask discards goes unseen: that needs a GPU sanitizer.)"""
    m = make(3, 40, (3, 5)).to(device, torch.float32)
    m.backend = "triton"
    x = torch.randn(3, 3, 12, 20, device=device)
    dy = torch.randn(3, 16, 40, device=device)
    with policy.override(small_grid=2**31 if tile_rows == 16 else 0):
        plain = grads(m, x.requires_grad_(), dy)
        for p in m.parameters():
            p.data = guarded(p.data)
        fenced = grads(m, guarded(x).requires_grad_(), guarded(dy))
    names = ["y", "dx", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, plain, fenced, strict=True):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_many_token_tiles(device) -> None:
    """216 tokens: several programs, split token reductions and a ragged last tile."""
    compare(make(2, 24, 4), torch.randn(3, 2, 32, 36), torch.float32, device)


def test_parameter_grads_only(device, monkeypatch) -> None:
    """An image without requires_grad gets no gradient and no image-gradient kernel runs."""
    import zeta_fused.op.launch as launch

    monkeypatch.setattr(launch, "_bwd_dx_kernel", None)  # any launch would raise
    compare(make(3, 20, 4), torch.randn(2, 3, 8, 8), torch.float32, device, needs_x_grad=False)


def test_unnormalised_pixels(device) -> None:
    compare(make(3, 20, 4), torch.randint(0, 256, (2, 3, 8, 8)).double(), torch.float32, device)


def test_stride0_upstream_gradient(device) -> None:
    """y.sum().backward() hands backward an expanded, stride-0 gradient."""
    m = make(3, 16, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    expected = [x.grad.clone(), *(p.grad.clone() for p in m.parameters())]
    m.zero_grad(set_to_none=True)
    xd = x.detach().to(device).requires_grad_()
    m.to(device).backend = "triton"
    m(xd).sum().backward()
    got = [xd.grad, *(p.grad for p in m.parameters())]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("post_norm", [True, False])
def test_transposed_upstream_gradient(post_norm, device) -> None:
    """An upstream gradient whose token rows are not evenly spaced (batch and token axes
    swapped in memory) is read through its strides; without a post-norm the dW and image
    gradient kernels read it directly."""
    m = make(3, 16, 4, (True, post_norm, True))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 3, 16, dtype=torch.float64).transpose(
        0, 1
    )  # (B, N, D), strides (16, 48, 1)
    m(x).backward(dy)
    expected = [x.grad.clone(), *(p.grad.clone() for p in m.parameters())]
    m.zero_grad(set_to_none=True)
    xd = x.detach().to(device).requires_grad_()
    m.to(device).backend = "triton"
    m(xd).backward(dy.to(device))
    got = [xd.grad, *(p.grad for p in m.parameters())]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10)


def test_gradcheck_fp64(device) -> None:
    m = make(2, 6, (2, 3)).to(device)
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    args = module_op_inputs(m, x)
    differentiable = [n for n in Grads._fields if getattr(args, n) is not None]

    def fn(*tensors):
        return torch.ops.zeta_fused.patch_embed_fwd(
            *args._replace(**dict(zip(differentiable, tensors, strict=True)))
        )[0]

    assert torch.autograd.gradcheck(
        fn, tuple(getattr(args, n) for n in differentiable), fast_mode=True
    )


def test_opcheck_backward_op(device) -> None:
    """The backward op itself (it has no double backward: inputs without grad)."""
    m = make(3, 12, 4).to(device, torch.float32).requires_grad_(False)
    args = module_op_inputs(m, torch.randn(2, 3, 8, 8, device=device))
    y, stats = torch.ops.zeta_fused.patch_embed_fwd(*args)
    for needs_x_grad in (True, False):
        bwd = BwdArgs(torch.randn_like(y), stats, needs_x_grad, *args)
        torch.library.opcheck(torch.ops.zeta_fused.patch_embed_bwd.default, tuple(bwd))


def test_backward_never_leaves_fused_path(device, monkeypatch) -> None:
    import zeta_fused.op.reference as reference

    monkeypatch.setattr(reference, "backward_from_stats", lambda *a: pytest.fail("eager ran"))
    m = make(3, 20, 4).to(device, torch.float32)
    m.backend = "triton"
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_eager_op_implementation_matches_kernels(flags, device, monkeypatch) -> None:
    """The op's CPU implementation without the interpreter (eager math) gives the same
    forward and gradients as the Triton kernels."""
    import zeta_fused.op.register as ops

    m = make(3, 20, (4, 2), flags)
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 6, 20, dtype=torch.float64)
    m.to(device).backend = "triton"
    kernels = [g.cpu() for g in grads(m, x.to(device), dy.to(device))]
    m.to("cpu")
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    monkeypatch.setattr("zeta_fused.dispatch.interpreting", lambda: True)  # let CPU reach the op
    eager = grads(m, x, dy)
    for k, e in zip(kernels, eager, strict=True):
        torch.testing.assert_close(k, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv", [False, True], ids=["linear weight", "conv weight"])
@pytest.mark.parametrize(("chans", "dim"), [(3, 0), (0, 8)], ids=["D=0", "C=0"])
def test_empty_projection(chans, dim, conv, device) -> None:
    """D = 0 or C = 0 (an empty GEMM): the output and every gradient the eager path gives,
    every part of a stem in play (its D-side gradients are not empty when C = 0)."""
    k = chans * 16

    def run(backend: str, on: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        shapes = [(2, chans, 8, 8), (dim, chans, 4, 4) if conv else (dim, k), (dim,), (k,), (k,),
                  (dim,), (dim,), (4, dim), (1, dim), (dim,), (dim,)]  # fmt: skip
        t = [torch.randn(s, generator=g, dtype=torch.float64).to(on).requires_grad_()
             for s in shapes]  # fmt: skip
        y = patch_embed(t[0], 4, t[1], t[2], (t[3], t[4]), (t[5], t[6]), pos=t[7], prefix=t[8],
                        stem_norm=(t[9], t[10]), backend=backend)  # fmt: skip
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(on)
        return [y, *torch.autograd.grad(y, t, dy)]

    for got, want in zip(run("triton", device), run("eager", "cpu"), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (4, 3, 224, 224, 16, 768),
        (2, 3, 224, 224, 14, 1024),
        (4, 3, 96, 64, (8, 4), 2048),
        (8, 3, 64, 64, 4, 64),
    ],
    ids=str,
)
def test_gpu_all_gradients(shape, dtype) -> None:
    B, C, H, W, patch, D = shape
    compare(make(C, D, patch), torch.randn(B, C, H, W), dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("needs_x_grad", [False, True])
def test_gpu_backward_is_deterministic(needs_x_grad) -> None:
    """20 backward passes give bitwise-equal gradients (no floating-point atomics)."""
    m = make(3, 768, 16).to("cuda", torch.bfloat16)
    m.backend = "triton"
    x = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(16, 196, 768, device="cuda", dtype=torch.bfloat16)
    first = None
    for _ in range(20):
        got = grads(m, x.requires_grad_(needs_x_grad), dy)[1:]
        if first is None:
            first = [g.clone() for g in got]
        assert all(torch.equal(a, b) for a, b in zip(first, got, strict=True))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_conv2d_weight_in_place(pre_norm, device) -> None:
    """A Conv2d weight (D, C, ph, pw) is used as it is; its gradient keeps that layout."""
    from zeta_fused import patch_embed

    conv = torch.nn.Conv2d(3, 20, kernel_size=(4, 2), stride=(4, 2)).double()
    g1, b1 = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    norm = (g1, b1) if pre_norm else None
    w2d = conv.weight.detach().permute(0, 2, 3, 1).reshape(20, 24).requires_grad_()
    ref = patch_embed(x, (4, 2), w2d, conv.bias, norm, backend="eager")
    dy = torch.randn_like(ref)
    ref.backward(dy)
    w = conv.weight.detach().to(device).requires_grad_()
    y = patch_embed(
        x.to(device),
        (4, 2),
        w,
        conv.bias.to(device),
        None if norm is None else tuple(t.to(device) for t in norm),
        backend="triton",
    )
    y.backward(dy.to(device))
    torch.testing.assert_close(y.detach().cpu(), ref.detach())
    expected = w2d.grad.reshape(20, 4, 2, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(w.grad.cpu(), expected)
    if not pre_norm:
        torch.testing.assert_close(y.detach().cpu(), conv(x).flatten(2).transpose(1, 2).detach())


def test_transposed_linear_weight(device) -> None:
    """A Linear weight whose patch axis is not contiguous (a transposed view) is read through
    its strides: only a contiguous one takes the kernels' flat path."""
    from zeta_fused import patch_embed

    def run(x, base, bias, backend):
        x, base = x.detach().requires_grad_(), base.detach().requires_grad_()
        ones = torch.ones_like(bias)
        y = patch_embed(x, (4, 2), base.t(), bias, None, (ones, bias), backend=backend)
        y.backward(dy.to(y.device))
        return y.detach().cpu(), x.grad.cpu(), base.grad.cpu()

    x, bias = torch.randn(2, 3, 8, 6, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    base = torch.randn(24, 20, dtype=torch.float64)  # (K, D): base.t() has strides (1, 20)
    dy = torch.randn(2, 6, 20, dtype=torch.float64)
    ref = run(x, base, bias, "eager")
    got = run(x.to(device), base.to(device), bias.to(device), "triton")
    for name, g, r in zip(["y", "dx", "dW"], got, ref, strict=True):
        torch.testing.assert_close(g, r, msg=name)


def test_empty_batch_gradients(device) -> None:
    """B = 0: zero parameter gradients and an empty image gradient, as eager gives."""
    m = make(3, 20, 4).to(device, torch.float32)
    m.backend = "triton"
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    m(x).sum().backward()
    assert x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), name
