"""The drop-in rule for modules (docs/design.md, "Drop-in rule"): with hooks, hook-based
reparametrisations, surgery on the children, pickling and repeated conversion, a fused module
gives what the eager module gives (values, gradients, hooks' effects) or runs eager for the
call. The oracle is always the same module run eager, or a plain nn.Sequential of its children.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from einops.layers.torch import Rearrange
from support import randomise
from torch import nn

from zeta_fused import FusedPatchSequential, PatchEmbeddings, fuse_patch_embeddings
from zeta_fused.op.reference import PATCHIFY


def stem(device: str) -> PatchEmbeddings:
    return randomise(PatchEmbeddings(3, 16, patch_size=4, backend="triton")).to(device)


def step(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Output and the gradients of a training step (image and every parameter)."""
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = m(x)
    y.square().mean().backward()
    return y.detach(), [x.grad, *(p.grad for p in m.parameters())]


def assert_same_step(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    (ya, ga), (yb, gb) = step(a, x), step(b, x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert len(ga) == len(gb)
    for i, (p, q) in enumerate(zip(ga, gb, strict=True)):
        assert (p is None) == (q is None), i
        if p is not None:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"gradient {i}")


def eager_twin(m: nn.Module) -> nn.Module:
    twin = copy.deepcopy(m)
    twin.backend = "eager"
    return twin


# ---------------------------------------------------------------- 1. hooks


@pytest.mark.parametrize("child", [1, 2, 3])
@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
def test_hooks_on_children_run_and_act(child, kind, device, fused_path_calls) -> None:
    m = stem(device)
    twin = eager_twin(m)
    seen = {"fused": 0, "eager": 0}
    for model, key in ((m, "fused"), (twin, "eager")):
        layer = model.embedding[child]

        def hook(mod, inp, out=None, key=key):
            seen[key] += 1
            if kind == "forward":
                return out * 2
            if kind == "pre":
                return (inp[0] + 1,)
            return None

        if kind == "forward":
            layer.register_forward_hook(hook)
        elif kind == "pre":
            layer.register_forward_pre_hook(hook)
        else:
            layer.register_full_backward_hook(lambda mod, gi, go, h=hook: h(mod, gi))
    assert_same_step(m, twin, torch.randn(2, 3, 8, 8, device=device))
    assert seen["fused"] == seen["eager"] == 1
    assert fused_path_calls == []  # the hooked call ran eager


def test_global_module_hooks_run(device, fused_path_calls) -> None:
    m = stem(device)
    names = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: names.append(type(mod).__name__)
    )
    try:
        m(torch.randn(1, 3, 8, 8, device=device))
    finally:
        handle.remove()
    assert names.count("Linear") == 1 and names.count("LayerNorm") == 2
    m(torch.randn(1, 3, 8, 8, device=device))
    assert len(fused_path_calls) == 1  # fused again once the hook is gone


@pytest.mark.parametrize("reparam", ["prune", "weight_norm", "spectral_norm"])
def test_hook_based_reparametrisations_train_two_steps(reparam, device) -> None:
    from torch.nn.utils import prune, spectral_norm, weight_norm

    m = stem(device)
    twin = eager_twin(m)
    apply = {
        "prune": lambda lin: prune.random_unstructured(lin, "weight", amount=0.3),
        "weight_norm": weight_norm,
        "spectral_norm": spectral_norm,
    }[reparam]
    for model in (m, twin):
        torch.manual_seed(1)
        apply(model.embedding[2])
    x = torch.randn(2, 3, 8, 8, device=device)
    for _ in range(2):  # the second step used a stale weight and crashed before
        assert_same_step(m, twin, x)
        for model in (m, twin):
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad


def test_hooks_on_a_converted_timm_stem_run(device, fused_path_calls) -> None:
    timm_layers = pytest.importorskip("timm.layers", reason="timm is a test extra")
    pe = randomise(timm_layers.PatchEmbed(16, 4, 3, 24, norm_layer=nn.LayerNorm)).to(device)
    twin = copy.deepcopy(pe)
    fuse_patch_embeddings(pe, backend="triton")
    for model in (pe, twin):
        model.proj.register_forward_hook(lambda mod, inp, out: out + 1)
        model.norm.register_forward_pre_hook(lambda mod, inp: (inp[0] * 3,))
    assert_same_step(pe, twin, torch.randn(2, 3, 16, 16, device=device))
    assert fused_path_calls == []


def test_a_converted_timm_stem_running_eager_raises_timms_own_errors(device) -> None:
    """When a hook sends the call to timm's own forward, its errors are timm's (a dtype
    mismatch here), not ours."""
    timm_layers = pytest.importorskip("timm.layers", reason="timm is a test extra")
    pe = timm_layers.PatchEmbed(16, 4, 3, 24, norm_layer=nn.LayerNorm).to(device)
    twin = copy.deepcopy(pe)
    fuse_patch_embeddings(pe, backend="triton")
    for model in (pe, twin):
        model.proj.register_forward_hook(lambda mod, inp, out: out)
    x = torch.randn(1, 3, 16, 16, device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError) as want:
        twin(x)
    with pytest.raises(RuntimeError) as got:
        pe(x)
    assert str(got.value) == str(want.value)


def test_hooks_on_a_converted_transformers_projection_run(device, fused_path_calls) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16, image_size=16, patch_size=4)  # fmt: skip
    emb = randomise(transformers.ViTModel(config).embeddings).to(device).eval()
    twin = copy.deepcopy(emb)
    fuse_patch_embeddings(emb, backend="triton")
    seen = []
    for model in (emb, twin):
        proj = model.patch_embeddings.projection
        proj.register_forward_hook(lambda mod, inp, out: seen.append(1) or out * 2)
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.testing.assert_close(emb(x), twin(x), rtol=1e-5, atol=1e-6)
    assert len(seen) == 2 and len(fused_path_calls) == 1  # its own hooks wrap the fused forward


# ---------------------------------------------------------------- 2. surgery


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.down = nn.Linear(base.in_features, 2, bias=False)
        self.up = nn.Linear(2, base.out_features, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x):
        return super().forward(x) + self.up(self.down(x))


SURGERY = {
    "lora": lambda e: e.__setitem__(2, LoRALinear(e[2])),
    "append": lambda e: e.append(nn.Linear(16, 16)),
    "eps": lambda e: (setattr(e[1], "eps", 0.5), setattr(e[3], "eps", 0.5)),
    "eps-of-one": lambda e: setattr(e[3], "eps", 0.5),
    "rmsnorm": lambda e: e.__setitem__(3, nn.RMSNorm(16)),
    "identity": lambda e: e.__setitem__(1, nn.Identity()),
    "delete": lambda e: e.__delitem__(3),
    "affine-free": lambda e: e.__setitem__(3, nn.LayerNorm(16, elementwise_affine=False)),
}
# Each norm keeps its own eps, and an RMSNorm is a norm the op computes.
STAYS_FUSED = {"eps", "eps-of-one", "rmsnorm", "identity", "delete", "affine-free"}


@pytest.mark.parametrize("name", SURGERY)
def test_surgery_after_construction(name, device, fused_path_calls) -> None:
    m = stem(device)
    SURGERY[name](m.embedding)
    m.to(device)
    plain = nn.Sequential(*m.embedding)  # the same children, plainly
    assert_same_step(m, plain, torch.randn(2, 3, 8, 8, device=device))
    assert bool(fused_path_calls) == (name in STAYS_FUSED)
    if name == "lora":
        assert m.embedding[2].up.weight.grad is not None


def test_a_parameter_replaced_by_one_of_another_size_is_an_error(device) -> None:
    """The kernels would read past a short vector: every parameter's shape is checked on every
    call, a parameter replaced or resized in place through .data alike."""
    m = stem(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    m(x)
    m.embedding[3].weight = nn.Parameter(torch.ones(15, device=device))
    with pytest.raises(ValueError, match=r"post_norm weight must have shape \(16,\), got \(15,\)"):
        m(x)
    m = stem(device)
    m(x)
    m.embedding[1].bias.data = torch.zeros(47, device=device)
    with pytest.raises(ValueError, match=r"pre_norm bias must have shape \(48,\), got \(47,\)"):
        m(x)


def test_eager_fallback_survives_surgery_too(device) -> None:
    m = stem(device)
    m.backend = "eager"
    m.embedding[3] = nn.RMSNorm(16).to(device)
    assert_same_step(m, nn.Sequential(*m.embedding), torch.randn(2, 3, 8, 8, device=device))


def test_quantize_dynamic() -> None:
    m = randomise(PatchEmbeddings(3, 16, patch_size=4))
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(q(x), nn.Sequential(*q.embedding)(x))


def test_slices_are_sequentials_that_run() -> None:
    m = randomise(PatchEmbeddings(3, 16, patch_size=4))
    x = torch.randn(2, 3, 8, 8)
    head, tail = m.embedding[:1], m.embedding[1:]
    assert tail.why_not_fused is not None and m.embedding.why_not_fused is None
    torch.testing.assert_close(tail(head(x)), m(x))


@pytest.mark.parametrize("wrapper", ["mae.MAE", "simmim.SimMIM"])
def test_vit_pytorch_masked_models_build_around_a_converted_vit(wrapper) -> None:
    """MAE and SimMIM slice ``to_patch_embedding`` (the Rearrange, then the rest as a new
    Sequential); the slices of a fused one run as the layers they hold."""
    import importlib

    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    vit = vit_pytorch.ViT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, heads=2,
                          mlp_dim=16)  # fmt: skip
    stem = vit.to_patch_embedding
    fuse_patch_embeddings(vit)
    module, cls = wrapper.split(".")
    kwargs = {"decoder_dim": 16} if cls == "MAE" else {}
    model = getattr(importlib.import_module(f"vit_pytorch.{module}"), cls)(encoder=vit, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.patch_to_emb(model.to_patch(x)), stem(x))


def test_timm_norm_replaced_after_conversion(device, fused_path_calls) -> None:
    timm_layers = pytest.importorskip("timm.layers", reason="timm is a test extra")
    pe = randomise(timm_layers.PatchEmbed(16, 4, 3, 24, norm_layer=nn.LayerNorm)).to(device)
    fuse_patch_embeddings(pe, backend="triton")
    twin = copy.deepcopy(pe)
    twin.zeta_backend = "eager"
    pe.norm, twin.norm = nn.RMSNorm(24).to(device), nn.RMSNorm(24).to(device)
    assert_same_step(pe, twin, torch.randn(2, 3, 16, 16, device=device))
    assert fused_path_calls, "an RMSNorm in the LayerNorm's place is fused too"


# ---------------------------------------------------------------- 8. the fallback is literal


def test_eager_path_runs_each_parametrisation_once(device) -> None:
    """spectral_norm (train mode) steps its power iteration on every read of the weight: the
    eager path of the module reads it exactly as a plain Sequential does."""
    from torch.nn.utils.parametrizations import spectral_norm

    m = stem(device)
    m.backend = "eager"
    spectral_norm(m.embedding[2])
    plain = copy.deepcopy(nn.Sequential(*m.embedding))
    x = torch.randn(2, 3, 8, 8, device=device)
    for _ in range(3):
        torch.testing.assert_close(m(x), plain(x))
    u = m.embedding[2].parametrizations.weight[0]._u
    torch.testing.assert_close(u, plain[2].parametrizations.weight[0]._u)


# ---------------------------------------------------------------- 6. pickling


def round_trips(model: nn.Module) -> list[nn.Module]:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return [pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
            torch.load(buf, weights_only=False)]  # fmt: skip


def test_converted_timm_model_pickles(device, fused_path_calls) -> None:
    timm = pytest.importorskip("timm", reason="timm is a test extra")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3
    )
    model = randomise(model).to(device).eval()
    fuse_patch_embeddings(model, backend="triton")
    x = torch.randn(2, 3, 16, 16, device=device)
    expected = model(x)
    for copy_ in round_trips(model):
        assert type(copy_.patch_embed) is type(model.patch_embed)
        fused_path_calls.clear()
        torch.testing.assert_close(copy_(x), expected)
        assert fused_path_calls == [1]
        copy_.patch_embed.proj.register_forward_hook(lambda mod, inp, out: out * 0)
        assert not torch.equal(copy_(x), expected)  # hooks bound to the copy's children


def test_fused_sequential_pickles_and_rebinds(device) -> None:
    m = stem(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    m(x)  # bound to its children
    for copy_ in round_trips(m):
        torch.testing.assert_close(copy_(x), m(x))
        copy_.embedding[2].register_forward_hook(lambda mod, inp, out: out * 0)
        assert torch.equal(copy_(x), nn.Sequential(*copy_.embedding)(x))


# ---------------------------------------------------------------- 7. honest summaries


def test_converting_twice_reports_fused_modules_and_sets_their_backend(fused_path_calls) -> None:
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    timm_layers = pytest.importorskip("timm.layers", reason="timm is a test extra")
    model = nn.ModuleDict({
        "vit": vit_pytorch.SimpleViT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1,
                                     heads=2, mlp_dim=16),
        "timm": timm_layers.PatchEmbed(16, 4, 3, 24),
    })  # fmt: skip
    first = fuse_patch_embeddings(model, backend="triton")
    assert len(first.converted) == 2 and not first.skipped
    again = fuse_patch_embeddings(model, backend="eager")
    assert again.converted == [] and again.skipped == [], str(again)
    assert {n for n, _ in again.already_fused} == {"vit.to_patch_embedding", "timm"}
    assert "already fused 2" in str(again) and "backend 'eager'" in str(again)
    model["timm"](torch.randn(1, 3, 16, 16))
    model["vit"](torch.randn(1, 3, 16, 16))
    assert fused_path_calls == []  # the new backend took effect


def _hf_vision(name: str):
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    config = getattr(transformers, f"{name}VisionConfig")(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=4,
    )  # fmt: skip
    return randomise(getattr(transformers, f"{name}VisionModel")(config)).eval()


@pytest.mark.parametrize("name", ["CLIP", "Siglip"])
def test_clip_and_siglip_patch_convs_convert(name, device, fused_path_calls) -> None:
    model = _hf_vision(name).to(device)
    twin = copy.deepcopy(model)
    summary = fuse_patch_embeddings(model, backend="triton")
    assert [n for n, _ in summary.converted] == ["embeddings.patch_embedding"], str(summary)
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.testing.assert_close(model(x).last_hidden_state, twin(x).last_hidden_state,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert fused_path_calls == [1]


def test_unknown_stems_are_reported() -> None:
    pytest.importorskip("vit_pytorch", reason="vit-pytorch is a test extra")
    from vit_pytorch.na_vit import NaViT

    navit = NaViT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1,
                                     heads=2, mlp_dim=16)  # fmt: skip

    class OwnStem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, kernel_size=4, stride=4, bias=False)

        def forward(self, x):
            return self.conv1(x).flatten(2).transpose(1, 2)

    summary = fuse_patch_embeddings(nn.ModuleDict({"navit": navit, "own": OwnStem()}))
    reasons = dict(summary.skipped)
    assert "already cut" in reasons["navit.to_patch_embedding"], str(summary)
    assert "patch convolution inside OwnStem" in reasons["own.conv1"], str(summary)
    assert summary.converted == []


def test_non_patchifying_sequentials_are_not_candidates() -> None:
    seq = nn.Sequential(Rearrange("b c h w -> b (h w) c"), nn.Linear(3, 8))
    summary = fuse_patch_embeddings(nn.ModuleDict({"a": seq}))
    assert summary.converted == summary.skipped == []
    assert type(seq) is nn.Sequential
    assert (
        FusedPatchSequential(Rearrange(PATCHIFY, p1=2, p2=2), nn.Linear(12, 4)).why_not_fused
        is None
    )
