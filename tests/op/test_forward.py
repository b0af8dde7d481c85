"""The fused forward op against the fp64 reference (docs/design.md, "Accuracy rule"), on the
interpreter or a GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import assert_accurate, check, make, module_op_inputs

import zeta_fused.op.reference as reference
from zeta_fused import patch_embed
from zeta_fused.op import policy

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLAGS = {
    "all": (True, True, True),
    "none": (False, False, False),
    "timm": (False, True, True),
    "pre_only": (True, False, False),
}


SHAPES = [  # (B, C, H, W, patch, D): odd sizes on purpose
    (2, 3, 32, 32, 8, 64),
    (1, 3, 28, 28, 14, 48),  # K = 588, not a power of two
    (3, 1, 12, 20, (3, 5), 17),  # non-square patch, C = 1, odd D
    (1, 8, 8, 12, (4, 2), 33),  # C = 8
    (2, 3, 16, 32, 4, 300),  # D wider than one register tile: second post-norm pass
    (3, 2, 32, 36, 4, 24),  # 216 tokens: several programs, a ragged last token tile
]


SMALL = dict(fwd_m=16, fwd_n=16, fwd_small_m=16, fwd_small_n=16)


@pytest.fixture(
    params=[(True, False), (False, False), (True, True)],
    ids=["owned rows, paired tiles", "rows shared by programs", "re-laid (c, i, j) order"],
)
def token_tiles(request):
    """Every way the forward tiles a call, with 16-wide tiles so that the small shapes take
    several: row blocks owning all their columns (two column tiles per patch tile), small
    tiles whose columns are split across programs and finished by a second kernel, and the
    (c, i, j) order with the weight re-laid without a pre-norm, which large calls take."""
    owned, relayout = request.param
    with policy.override(small_grid=0 if owned else 2**31, fwd_target_programs=2**20,
                         relayout_min_tokens=0 if relayout else 2**31, blocks_16bit=SMALL,
                         blocks_32bit=SMALL):  # fmt: skip
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.usefixtures("token_tiles")
def test_shape_grid(shape, dtype, device) -> None:
    B, C, H, W, patch, D = shape
    check(make(C, D, patch), torch.randn(B, C, H, W), dtype, device)


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.usefixtures("token_tiles")
def test_flag_combinations(flags, dtype, device) -> None:
    check(make(3, 40, 4, flags), torch.randn(2, 3, 16, 12), dtype, device)


def test_wide_output_2048(device) -> None:
    check(make(3, 2048, 4), torch.randn(1, 3, 8, 8), torch.float32, device)


@pytest.mark.parametrize("flags", [FLAGS["all"], FLAGS["timm"]], ids=["all", "timm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unnormalised_pixels(flags, dtype, device) -> None:
    """Raw 0..255 images: |mean| >> std per patch, where one-pass statistics cancel."""
    x = torch.randint(0, 256, (2, 3, 16, 16)).double()
    check(make(3, 24, 4, flags), x, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_patches_are_finite(dtype, device) -> None:
    x = torch.full((2, 3, 16, 16), 7.0)
    x[1] = torch.randn(3, 16, 16)
    y = check(make(3, 24, 8), x, dtype, device)
    assert torch.isfinite(y).all()


def test_huge_magnitudes(device) -> None:
    check(make(3, 24, 4), 1e6 * torch.randn(2, 3, 8, 8), torch.float32, device)


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_nan_stays_in_its_token(flags, device) -> None:
    x = torch.randn(2, 3, 16, 16)
    x[1, 2, 5, 6] = float("nan")  # token (hp=1, wp=1) of image 1 with a 4x4 patch
    y = check(make(3, 24, 4, flags), x, torch.float32, device)
    bad = y.isnan().any(-1)
    assert bad[1, 1 * 4 + 1] and bad.sum() == 1


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_strided_images_read_in_place(layout, device, monkeypatch) -> None:
    base = torch.randn(2, 3, 40, 36)
    if layout == "channels_last":
        x = base[..., :32, :32].contiguous().to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, :, 3:35, 2:34]
    else:
        x = base[..., :32, :32].transpose(-1, -2)
    # No host-side copy of the image: .contiguous() on it would be a hidden rearrange.
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copy"))
    check(make(3, 16, 8), x, torch.float32, device)


def test_empty_batch(device) -> None:
    m = make(3, 16, 4).to(device, torch.float32)
    m.backend = "triton"
    assert m(torch.randn(0, 3, 8, 8, device=device)).shape == (0, 4, 16)


def test_inference_never_leaves_fused_path(device, monkeypatch) -> None:
    for name in ("forward_with_stats", "patch_embed_reference"):
        monkeypatch.setattr(reference, name, lambda *a, **k: pytest.fail("eager path ran"))
    m = make(3, 16, 4).to(device, torch.float32)
    m.backend = "triton"
    with torch.no_grad():
        assert m(torch.randn(2, 3, 8, 8, device=device)).shape == (2, 4, 16)


def test_functional_matches_module(device) -> None:
    m = make(3, 20, (4, 2)).to(device, torch.float32)
    x = torch.randn(2, 3, 8, 8, device=device)
    e = m.embedding
    y = patch_embed(
        x,
        (4, 2),
        e[2].weight,
        e[2].bias,
        (e[1].weight, e[1].bias),
        (e[3].weight, e[3].bias),
        backend="triton",
    )
    torch.testing.assert_close(y, m.to(torch.float32)(x))


def test_dynamic_img_pad(device) -> None:
    m = make(3, 16, 4)
    m.dynamic_img_pad = True
    check(m, torch.randn(2, 3, 13, 10), torch.float32, device)


def test_fp64_is_exact(device) -> None:
    """fp64 runs fp64 end to end (the gradcheck path): error at fp64 rounding level."""
    m = make(3, 16, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = m(x)
    m.to(device).backend = "triton"
    torch.testing.assert_close(m(x.to(device)).cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("post_norm", [True, False])
def test_autocast_dtype_and_values(post_norm, device) -> None:
    """Under autocast the output dtype is the eager module's; the GEMM runs in bf16."""
    m = make(3, 24, 4, (True, post_norm, True)).to(device, torch.float32)
    x = torch.randn(2, 3, 16, 16, device=device)
    ref = m.double()(x.double())
    m.float()
    with torch.autocast(device, dtype=torch.bfloat16):
        eager = m(x)
        m.backend = "triton"
        fused = m(x)
    assert fused.dtype == eager.dtype
    assert_accurate(fused, eager, ref, torch.bfloat16, "autocast")


def test_half_input_with_fp32_params_in_autocast(device) -> None:
    m = make(3, 24, 4).to(device, torch.float32)
    x = torch.randn(2, 3, 16, 16, device=device)
    ref = m.double()(x.double())
    m.float()
    with torch.autocast(device, dtype=torch.bfloat16):
        eager = m(x.bfloat16())
        m.backend = "triton"
        fused = m(x.bfloat16())
    assert fused.dtype == eager.dtype
    assert_accurate(fused, eager, ref, torch.bfloat16, "bf16 input, fp32 params")


def _op_args(device, dtype=torch.float32, requires_grad=False):
    m = make(3, 24, (4, 2)).to(device, dtype)
    x = torch.randn(2, 3, 8, 6, device=device, dtype=dtype, requires_grad=requires_grad)
    return module_op_inputs(m, x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, device) -> None:
    args = _op_args(device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_fwd.default, tuple(args))


def test_opcheck_channels_last(device) -> None:
    args = _op_args(device)
    args = args._replace(x=args.x.to(memory_format=torch.channels_last))
    torch.library.opcheck(torch.ops.zeta_fused.patch_embed_fwd.default, tuple(args))


# ---------------------------------------------------------------- GPU only: large and exact grids


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (8, 3, 224, 224, 16, 768),
        (4, 3, 224, 224, 14, 1024),
        (2, 3, 256, 256, 16, 1280),
        (3, 3, 64, 96, (8, 4), 2048),
        (2, 4, 60, 60, 6, 4000),
        (16, 3, 224, 224, 4, 64),
    ],
    ids=str,
)
def test_gpu_preset_shapes(shape, dtype) -> None:
    B, C, H, W, patch, D = shape
    check(make(C, D, patch), torch.randn(B, C, H, W), dtype, "cuda")


@pytest.mark.gpu
def test_gpu_fp32_follows_matmul_precision(monkeypatch) -> None:
    """IEEE fp32 by default (error at fp32 level); TF32 only once torch allows it."""
    m = make(3, 256, 16)
    x = torch.randn(4, 3, 64, 64)
    ref = m(x.double())
    m.to("cuda", torch.float32).backend = "triton"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ieee = (m(x.cuda()).cpu().double() - ref).abs().max().item()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = (m(x.cuda()).cpu().double() - ref).abs().max().item()
    assert ieee < 1e-4 < tf32


@pytest.mark.gpu
def test_gpu_tensors_on_another_device() -> None:
    """Tensors on cuda:1 while cuda:0 is current (no torch.cuda.set_device): forward and
    backward run on the tensors' GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    m = make(3, 64, 8)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = m(x)
    m.to("cuda:1", torch.float32).backend = "triton"
    with torch.cuda.device(0):
        xg = x.to("cuda:1", torch.float32).requires_grad_()
        y = m(xg)
        y.sum().backward()
    assert y.device == torch.device("cuda", 1) and xg.grad.device == y.device
    assert (y.double().cpu() - ref).abs().max() < 1e-3


@pytest.mark.gpu
def test_gpu_int64_offsets() -> None:
    """B*N*D beyond 2**31 elements: the last tokens must still be right."""
    B, D = 14_300, 768
    need = B * 3 * 224 * 224 * 2 + B * 196 * D * 2
    if torch.cuda.mem_get_info()[0] < 1.5 * need:
        pytest.skip(f"needs {1.5 * need / 2**30:.1f} GiB free GPU memory")
    assert B * 196 * D > 2**31
    m = make(3, D, 16).to("cuda", torch.bfloat16)
    m.backend = "triton"
    x = torch.randn(B, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)[-2:]
        tail = m.to(torch.float64)(x[-2:].double())
    assert (y.double() - tail).abs().max() < 0.1


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    batch=st.integers(0, 3),
    chans=st.integers(1, 4),
    patch=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    dim=st.integers(1, 40),
    flags=st.sampled_from(list(FLAGS.values())),
)
def test_random_configurations(batch, chans, patch, grid, dim, flags) -> None:
    """Any patch, grid and width, down to 1x1 patches and D = 1, in fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(batch, chans, grid[0] * patch[0], grid[1] * patch[1])
    if batch == 0:
        m = make(chans, dim, patch, flags).to(device, torch.float32)
        m.backend = "triton"
        assert m(x.to(device)).shape == (0, grid[0] * grid[1], dim)
        return
    check(make(chans, dim, patch, flags), x, torch.float32, device)
