"""The whole stem in the fused op: position table, prefix rows and the stem norm, forward and
every gradient against the fp64 reference (the accuracy rule), for every combination of prefix
counts, table, norm kinds (LayerNorm, RMSNorm, affine parts), an epsilon per norm, and row
widths that take different kernel passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import assert_accurate, assert_kernels_match_eager_math

from zeta_fused import Norm
from zeta_fused.functional import op_inputs, patch_embed
from zeta_fused.kernels.contract import LAYER_NORM, RMS_NORM
from zeta_fused.op.args import BwdArgs, Stem

# (prefix rows, position table, pre-norm, post-norm, stem norm); a norm is a LayerNorm "ln"
# (weight and bias), "no-affine" or "no-bias", an RMSNorm "rms" (weight) or "rms-no-affine",
# or None.
CASES = {
    "vit (cls + pos)": (1, True, None, None, None),
    "clip (cls + pos, ln_pre)": (1, True, None, None, "ln"),
    "dinov2-reg (1 + 4)": (5, True, None, None, None),
    "deit distilled (2)": (2, True, None, None, None),
    "sam / siglip (pos only)": (0, True, None, None, None),
    "dit (affine-free post-norm + pos)": (0, True, None, "no-affine", None),
    "prefix only": (1, False, None, None, None),
    "stem norm only": (0, False, None, None, "no-bias"),
    "vit-pytorch + ln_pre": (1, True, "ln", "ln", "ln"),
    "both norms over D, no table": (2, False, None, "ln", "no-affine"),
    "rms everywhere (cls + pos)": (1, True, "rms", "rms", "rms"),
    "aimv2 (rms post-norm + pos)": (0, True, None, "rms", None),
    "rms pre, ln post, affine-free rms stem": (2, True, "rms", "ln", "rms-no-affine"),
}
# Each norm its own epsilon, so that a kernel taking the wrong one fails.
EPS = {"pre_norm": 1e-5, "post_norm": 1e-4, "stem_norm": 1e-6}
DIMS = {"one tile": 40, "wide rows": 300}  # 300: wider than any BLOCK_N, the extra passes


def norm_params(kind, size, dtype, eps):
    if kind is None:
        return None
    weighted = kind in ("ln", "no-bias", "rms")
    weight = (1 + 0.3 * torch.randn(size, dtype=dtype)) if weighted else None
    bias = 0.3 * torch.randn(size, dtype=dtype) if kind == "ln" else None
    return Norm(RMS_NORM if kind.startswith("rms") else LAYER_NORM, weight, bias, eps)


def make_inputs(case, dim, batch=2, dtype=torch.float64):
    n_prefix, with_pos, pre, post, stem = CASES[case]
    x = 3 * torch.randn(batch, 3, 8, 12, dtype=dtype)
    k, tokens = 3 * 16, 6
    tensors = {
        "x": x,
        "weight": torch.randn(dim, k, dtype=dtype) / k**0.5,
        "bias": torch.randn(dim, dtype=dtype),
        "pos": torch.randn(tokens, dim, dtype=dtype) if with_pos else None,
        "prefix": torch.randn(n_prefix, dim, dtype=dtype) if n_prefix else None,
    }
    norms = {
        "pre_norm": norm_params(pre, k, dtype, EPS["pre_norm"]),
        "post_norm": norm_params(post, dim, dtype, EPS["post_norm"]),
        "stem_norm": norm_params(stem, dim, dtype, EPS["stem_norm"]),
    }
    return tensors, norms


def cast_norm(norm, cast):
    """A norm value with its tensors passed through ``cast``."""
    if norm is None:
        return None
    return norm._replace(weight=cast(norm.weight), bias=cast(norm.bias))


def leaves(tensors, norms):
    out = {n: t for n, t in tensors.items() if t is not None}
    for name, norm in norms.items():
        for part in ("weight", "bias"):
            t = None if norm is None else getattr(norm, part)
            if t is not None:
                out[f"{name}.{part}"] = t
    return out


def run(tensors, norms, dtype, device, backend):
    """Forward and every gradient in ``dtype`` on ``device``."""

    def on(t):
        return None if t is None else t.detach().to(device, dtype)

    cast = {n: on(t) for n, t in tensors.items()}
    cast_norms = {n: cast_norm(norm, on) for n, norm in norms.items()}
    inputs = leaves(cast, cast_norms)
    for t in inputs.values():
        t.requires_grad_()
    y = patch_embed(cast["x"], 4, cast["weight"], cast["bias"], cast_norms["pre_norm"],
                    cast_norms["post_norm"], pos=cast["pos"], prefix=cast["prefix"],
                    stem_norm=cast_norms["stem_norm"], backend=backend)  # fmt: skip
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(y, list(inputs.values()), dy.to(device, y.dtype))
    return {"y": y, **dict(zip(inputs, grads, strict=True))}


@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stem_forward_and_gradients(case, dim, dtype, device) -> None:
    tensors, norms = make_inputs(case, dim)
    ref = run(tensors, norms, torch.float64, "cpu", "eager")
    eager = run(tensors, norms, dtype, "cpu", "eager")
    fused = run(tensors, norms, dtype, device, "triton")
    n_prefix = CASES[case][0]
    assert fused["y"].shape == (2, n_prefix + 6, dim)
    for name in ref:
        assert fused[name].dtype == eager[name].dtype, name
        assert_accurate(fused[name], eager[name], ref[name], dtype, f"{case} {name}")


@pytest.mark.parametrize("case", ["vit-pytorch + ln_pre", "rms everywhere (cls + pos)"])
def test_stem_gradcheck(case, device) -> None:
    tensors, norms = make_inputs(case, 8)
    tensors["prefix"] = torch.randn(2, 8, dtype=torch.float64)
    inputs = leaves(tensors, norms)
    names = list(inputs)

    def fn(*values):
        v = dict(zip(names, values, strict=True))

        def norm(name):
            n = norms[name]
            return n and n._replace(weight=v.get(f"{name}.weight"), bias=v.get(f"{name}.bias"))

        return patch_embed(v["x"], 4, v["weight"], v["bias"], norm("pre_norm"),
                           norm("post_norm"), pos=v["pos"], prefix=v["prefix"],
                           stem_norm=norm("stem_norm"), backend="triton")  # fmt: skip

    values = tuple(t.to(device).requires_grad_() for t in inputs.values())
    assert torch.autograd.gradcheck(fn, values, fast_mode=True)


def op_args(case, dim, device, requires_grad=True, dtype=torch.float32):
    tensors, norms = make_inputs(case, dim, dtype=dtype)
    t = {n: None if v is None else v.to(device).requires_grad_(requires_grad)
         for n, v in tensors.items()}  # fmt: skip
    n = {k: cast_norm(norm, lambda v: None if v is None else v.to(device))
         for k, norm in norms.items()}  # fmt: skip
    stem = Stem(t["pos"], t["prefix"], n["stem_norm"])
    return op_inputs(t["x"], (4, 4), t["weight"], t["bias"], n["pre_norm"], n["post_norm"], stem)


@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_ops_eager_math(case, dim, device) -> None:
    args = op_args(case, dim, device, requires_grad=False, dtype=torch.float64)
    assert_kernels_match_eager_math(args)


# Tiles of 16 and a grid this small never fills the GPU: every row block is shared by programs.
SHARED_ROWS = dict(small_grid=2**31, fwd_target_programs=2**20,
                   blocks_16bit=dict(fwd_small_m=16, fwd_small_n=16, fwd_k=16),
                   blocks_32bit=dict(fwd_small_m=16, fwd_small_n=16, fwd_k=16))  # fmt: skip


@pytest.mark.parametrize("conv", [False, True], ids=["linear weight", "conv weight"])
@pytest.mark.parametrize(
    "case",
    [
        "vit-pytorch + ln_pre",
        "rms pre, ln post, affine-free rms stem",
        "both norms over D, no table",
        "clip (cls + pos, ln_pre)",
    ],
)
def test_rows_shared_by_programs(case, conv, device, monkeypatch) -> None:
    """Row blocks shared by the main kernel's programs are finished by the last program of
    each to arrive when the fold ran first (it zeroes their counters), else by the finishing
    kernel: two launches either way (a conv weight without a pre-norm needs no fold). Outputs,
    statistics and gradients are the op's eager math (fp64): a block finished twice, never,
    or before every part arrived would differ."""
    from zeta_fused.op import launch, policy

    launched = []
    for name in ("_fold_weight_kernel", "_patch_embed_fwd_kernel", "_finish_rows_kernel"):
        real = getattr(launch, name)

        class Spy:
            def __getitem__(self, grid, name=name, real=real):
                launched.append(name)
                return real[grid]

        monkeypatch.setattr(launch, name, Spy())
    args = op_args(case, 300, device, requires_grad=False, dtype=torch.float64)
    if conv:
        args = args._replace(weight=args.weight.reshape(300, 3, 4, 4))
    with policy.override(**SHARED_ROWS):
        assert_kernels_match_eager_math(args)
    fwd = launched[: launched.index("_patch_embed_fwd_kernel") + 2]
    folds = not conv or CASES[case][2] is not None
    if folds:
        assert fwd == ["_fold_weight_kernel", "_patch_embed_fwd_kernel"], launched
    else:
        assert fwd == ["_patch_embed_fwd_kernel", "_finish_rows_kernel"], launched


@pytest.mark.parametrize("stem_norm", [False, True], ids=["no stem norm", "stem norm"])
def test_no_prefix_rows_given_as_an_empty_table(stem_norm, device) -> None:
    """Prefix rows given as a (0, D) tensor (a model without class token, vit-pytorch's mean
    pool): no prefix programs run, and the prefix's gradient is empty, as eager gives."""
    args = op_args("vit-pytorch + ln_pre" if stem_norm else "vit (cls + pos)", 40, device,
                   requires_grad=False, dtype=torch.float64)  # fmt: skip
    args = args._replace(prefix=args.prefix[:0])
    assert_kernels_match_eager_math(args)


@pytest.mark.parametrize(
    "case", ["clip (cls + pos, ln_pre)", "vit-pytorch + ln_pre", "rms everywhere (cls + pos)"]
)
def test_opcheck_stem(case, device) -> None:
    args = op_args(case, 40, device)
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_fwd.default, tuple(args))
    frozen = op_args(case, 40, device, requires_grad=False)
    y, stats = torch.ops.zeta_fused.patch_embed_fwd(*frozen)
    bwd = BwdArgs(torch.randn_like(y), stats, True, *frozen)
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_bwd.default, tuple(bwd))


def test_compile_fullgraph_stem(device, fused_calls) -> None:
    torch._dynamo.reset()
    tensors, norms = make_inputs("clip (cls + pos, ln_pre)", 40, dtype=torch.float32)
    weight = tensors["weight"].to(device).requires_grad_()
    pos = tensors["pos"].to(device).requires_grad_()
    cls = tensors["prefix"].to(device).requires_grad_()
    g3, b3 = (t.to(device).requires_grad_() for t in norms["stem_norm"][1:3])

    def stem(x, backend):
        return patch_embed(x, 4, weight, None, pos=pos, prefix=cls, stem_norm=(g3, b3),
                           backend=backend)  # fmt: skip

    compiled = torch.compile(stem, fullgraph=True, backend="aot_eager")
    x = tensors["x"].float().to(device)
    params = [weight, pos, cls, g3, b3]
    y = compiled(x, "triton")
    assert fused_calls, "the compiled graph does not call the fused op"
    grads = torch.autograd.grad(y.square().sum(), params)
    y_ref = stem(x, "eager")
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_gradients_are_deterministic(device) -> None:
    tensors, norms = make_inputs("vit-pytorch + ln_pre", 300, batch=3)
    first = run(tensors, norms, torch.float32, device, "triton")
    again = run(tensors, norms, torch.float32, device, "triton")
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_tables_with_a_leading_one_and_strides(device) -> None:
    tensors, _ = make_inputs("vit (cls + pos)", 40, dtype=torch.float32)
    x, w = tensors["x"].to(device), tensors["weight"].to(device)
    pos, cls = tensors["pos"].to(device), tensors["prefix"].to(device)
    expected = patch_embed(x, 4, w, pos=pos, prefix=cls, backend="eager")
    strided_pos = pos.t().contiguous().t()  # column-major: the op copies it
    got = patch_embed(x, 4, w, pos=strided_pos[None], prefix=cls[None], backend="triton")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    manual = torch.cat([cls.expand(2, 1, 40), F.linear(x.unfold(2, 4, 4).unfold(3, 4, 4).permute(
        0, 2, 3, 4, 5, 1).reshape(2, 6, 48), w) + pos], 1)  # fmt: skip
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_wrong_table_sizes_name_the_sizes(backend, device) -> None:
    tensors, _ = make_inputs("vit (cls + pos)", 40, dtype=torch.float32)
    x, w = tensors["x"].to(device), tensors["weight"].to(device)
    with pytest.raises(ValueError, match=r"pos must have shape \(6, 40\) for the 6 patch tokens"):
        patch_embed(x, 4, w, pos=torch.randn(7, 40, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"prefix must have shape \(P, 40\).*\(1, 32\)"):
        patch_embed(x, 4, w, prefix=torch.randn(1, 32, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"stem_norm weight must have shape \(40,\)"):
        patch_embed(x, 4, w, stem_norm=(torch.ones(8, device=device), None), backend=backend)


def test_autocast_dtypes_follow_eager(device) -> None:
    tensors, norms = make_inputs("clip (cls + pos, ln_pre)", 40, dtype=torch.float32)
    t = {n: None if v is None else v.to(device) for n, v in tensors.items()}
    for stem_norm in (None, tuple(v.to(device) for v in norms["stem_norm"][1:3])):
        outs = []
        for backend in ("eager", "triton"):
            with torch.autocast(device, dtype=torch.bfloat16):
                outs.append(patch_embed(t["x"], 4, t["weight"], t["bias"], pos=t["pos"],
                                        prefix=t["prefix"], stem_norm=stem_norm,
                                        backend=backend))  # fmt: skip
        assert outs[0].dtype == outs[1].dtype
