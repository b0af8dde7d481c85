"""The drop-in rule for the functional API and PyTorch's transforms and modes (docs/design.md,
"Drop-in rule"): parameters checked as ``F.linear`` / ``F.layer_norm`` check them, torch.func
transforms, forward-mode AD, FakeTensorMode, jit tracing and double backward give what the
eager module gives, and fp64 keeps fp64's precision. The oracle is the eager module (or
``F.layer_norm`` / fp64 math)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from support import randomise

from zeta_fused import PatchEmbeddings, patch_embed, patch_embed_rows
from zeta_fused.op.reference import patchify


def pair_of(device: str, dtype=torch.float32) -> tuple[PatchEmbeddings, PatchEmbeddings]:
    """A fused module and its eager twin (the same parameters, copied)."""
    m = randomise(PatchEmbeddings(3, 16, patch_size=4, backend="triton")).to(device, dtype)
    twin = copy.deepcopy(m)
    twin.backend = "eager"
    return m, twin


# ---------------------------------------------------------------- 3. functional parameters


def _vectors(device, dtype=torch.float64):
    x = torch.randn(2, 3, 8, 8, dtype=dtype, device=device)
    w = torch.randn(16, 48, dtype=dtype, device=device)
    return x, w, *(torch.randn(n, dtype=dtype, device=device) for n in (16, 48, 48, 16, 16))


@pytest.mark.parametrize("which", ["weight-only", "bias-only", "none"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_partial_norm_pairs_are_what_f_layer_norm_makes_of_them(which, backend, device) -> None:
    x, w, b, g1, b1, g2, b2 = _vectors(device)
    pre = {"weight-only": (g1, None), "bias-only": (None, b1), "none": (None, None)}[which]
    p = F.layer_norm(patchify(x, (4, 4)), (48,), pre[0], pre[1], 1e-5)
    expected = F.layer_norm(F.linear(p, w, b), (16,), g2, b2, 1e-5)
    y = patch_embed(x, 4, w, b, pre, (g2, b2), backend=backend)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("bias", r"bias must have shape \(16,\), got \(15,\)"),
        ("g1", r"pre_norm weight must have shape \(48,\), got \(47,\)"),
        ("b1", r"pre_norm bias must have shape \(48,\), got \(47,\)"),
        ("g2", r"post_norm weight must have shape \(16,\), got \(15,\)"),
        ("b2", r"post_norm bias must have shape \(16,\), got \(2, 8\)"),
    ],
)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_wrong_sized_vectors_are_rejected(bad, match, backend, device) -> None:
    x, w, *vectors = _vectors(device)
    named = dict(zip(["bias", "g1", "b1", "g2", "b2"], vectors, strict=True))
    named[bad] = named[bad][:-1] if bad != "b2" else named[bad].reshape(2, 8)
    with pytest.raises(ValueError, match=match):
        patch_embed(x, 4, w, named["bias"], (named["g1"], named["b1"]), (named["g2"],
                    named["b2"]), backend=backend)  # fmt: skip


def test_a_norm_that_is_not_a_pair_is_rejected(device) -> None:
    x, w, b, g1, *_ = _vectors(device)
    with pytest.raises(
        TypeError,
        match=r"pre_norm must be a zeta_fused.Norm, a LayerNorm.s \(weight, bias\).*got Tensor",
    ):
        patch_embed(x, 4, w, b, g1)


def test_strided_vectors_are_read_correctly(device) -> None:
    x, w, *_ = _vectors(device)
    wide = torch.randn(5, 96, dtype=torch.float64, device=device)
    g1, b1, g2 = wide[0, ::2], wide[1, 1::2], wide[2, ::6]  # strides 2, 2, 6
    expected = patch_embed(x, 4, w, None, (g1.clone(), b1.clone()), (g2.clone(), None),
                           backend="eager")  # fmt: skip
    y = patch_embed(x, 4, w, None, (g1, b1), (g2, None), backend="triton")
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- 4. transforms and modes


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "grad"])
def test_vmap_model_ensembling(grad_mode, device) -> None:
    from torch.func import functional_call, stack_module_state, vmap

    models = [pair_of(device) for _ in range(3)]
    params, buffers = stack_module_state([m for m, _ in models])
    eager_params, eager_buffers = stack_module_state([t for _, t in models])
    x = torch.randn(2, 3, 8, 8, device=device)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "grad": torch.enable_grad}[grad_mode]  # fmt: skip

    def run(base, p, b):
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(p, b)

    with ctx():
        got = run(copy.deepcopy(models[0][0]).to("meta"), params, buffers)
        want = run(copy.deepcopy(models[0][1]).to("meta"), eager_params, eager_buffers)
    torch.testing.assert_close(got, want)


def test_fake_tensor_mode_under_no_grad(device) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    m, _ = pair_of(device)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        y = m(mode.from_tensor(torch.randn(2, 3, 8, 8, device=device)))
    assert y.shape == (2, 4, 16) and type(y).__name__ == "FakeTensor"


@pytest.mark.parametrize(("where", "backend"), [("meta", "eager"), ("meta", "auto"),
                                               ("fake", "eager"), ("fake", "triton")])  # fmt: skip
def test_indices_without_values_give_shapes(where, backend, device) -> None:
    """keep= and pos_index= on the meta device or under FakeTensorMode (shape inference,
    memory planning): shapes as the real call's, no index value read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    on = "meta" if where == "meta" else device
    mode = FakeTensorMode() if where == "fake" else contextlib.nullcontext()
    with mode:
        x, w = torch.randn(2, 3, 8, 8, device=on), torch.randn(16, 48, device=on)
        table, index = torch.randn(5, 16, device=on), torch.zeros(2, 3, dtype=torch.long, device=on)
        kept = patch_embed(x, 4, w, pos=table[:4], keep=index, backend=backend)
        indexed = patch_embed(x, 4, w, pos=table, pos_index=index.repeat(1, 2)[:, :4],
                              backend=backend)  # fmt: skip
        rows = torch.randn(6, 48, device=on)
        packed = patch_embed_rows(rows, w, pos=table, pos_index=index.view(-1), backend=backend)
    assert kept.shape == (2, 3, 16) and indexed.shape == (2, 4, 16) and packed.shape == (6, 16)


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
def test_forward_mode_ad(grad_mode, device) -> None:
    import torch.autograd.forward_ad as fwad

    m, twin = pair_of(device)
    x, t = torch.randn(2, 3, 8, 8, device=device), torch.randn(2, 3, 8, 8, device=device)
    tangents = []
    for model in (m, twin):
        with fwad.dual_level(), torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
            out = fwad.unpack_dual(model(fwad.make_dual(x, t)))
        assert out.tangent is not None
        tangents.append(out.tangent)
    torch.testing.assert_close(*tangents)
    assert tangents[0].abs().max() > 0


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "grad", "jacrev", "vjp"])
def test_torch_func_transforms(transform, device) -> None:
    from torch import func

    m, twin = pair_of(device)
    x = torch.randn(1, 3, 4, 8, device=device)
    t = torch.randn_like(x)

    def apply(model):
        f = model
        if transform == "jvp":
            return func.jvp(f, (x,), (t,))[1]
        if transform == "jacfwd":
            return func.jacfwd(f)(x)
        if transform == "jacrev":
            return func.jacrev(f)(x)
        if transform == "vjp":
            out, pull = func.vjp(f, x)
            return pull(torch.ones_like(out))[0]
        return func.grad(lambda x: f(x).square().sum())(x)

    got, want = apply(m), apply(twin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want.abs().max() > 0


def test_jit_trace(device) -> None:
    m, twin = pair_of(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    traced = torch.jit.trace(m, x, check_trace=False)
    torch.testing.assert_close(traced(x), twin(x))


@pytest.mark.parametrize("target", ["image", "parameters"])
def test_double_backward_gradient_penalty(target, device, fused_path_calls) -> None:
    """create_graph=True (an R1 penalty on the images): the fused op's backward is
    differentiated once more, as the eager module's is."""
    m, twin = pair_of(device, torch.float64)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    results = []
    for model in (m, twin):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = model(xx)
        wrt = [xx] if target == "image" else list(model.parameters())
        grads = torch.autograd.grad(y.square().sum(), wrt, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        penalty.backward()
        results.append([penalty.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert fused_path_calls == [1]  # the forward ran fused; its backward was differentiated


# ---------------------------------------------------------------- 5. fp64


@pytest.mark.parametrize("dim", [96, 300])
def test_fp64_post_norm_of_wide_rows_keeps_fp64_precision(dim, device) -> None:
    """Rows wider than one tile and not a power-of-two multiple of it: the merged statistics
    must not pass through fp32 (1e-8 errors before)."""
    m = randomise(PatchEmbeddings(3, dim, patch_size=4)).double().to(device)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    ref = m(x)
    m.backend = "triton"
    assert (m(x) - ref).abs().max() < 1e-12


def test_fp64_under_autocast_stays_fp64(device, fused_path_calls) -> None:
    m, twin = pair_of(device, torch.float64)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, want = m(x), twin(x)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fused_path_calls == []  # autocast leaves fp64 alone: eager for that call
