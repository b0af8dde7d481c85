"""torch.fx symbolic tracing of converted models (docs/design.md, "torch.fx"): traced, a
converted module runs its peer's own code, so the graph holds the peer's operations.

Checks equivalent to timm's own FX tests (``test_model_forward_fx``, ``test_model_backward_fx``,
``test_model_forward_fx_torchscript`` in timm's tests/test_models.py, written anew here) on a tiny
model of every converter library whose unconverted model traces, converted with the fused
backend and with ``backend="eager"``: the graph built as timm's tests build it (torchvision's
feature extractor on the output node, with timm's leaf modules and functions) gives, bit for
bit, what the unconverted model and the eager-backend converted model give, and within the
accuracy rule what the fused model gives; its backward reaches every parameter; scripted, it
runs. Where the peer itself does not trace, the converted model fails with the peer's error.
FX feature extraction (torchvision's and timm's) and FX quantization of a converted timm ViT
give the unconverted model's results.
"""

from __future__ import annotations

import pytest
import torch
from peers import PEERS, converted, first_tensor

fx_extraction = pytest.importorskip("torchvision.models.feature_extraction",
                                    reason="torchvision is a test extra")  # fmt: skip

TOL = {"rtol": 1e-4, "atol": 1e-5}
# The converted models whose unconverted peer traces, and the part of each that is traced.
TRACEABLE = {"timm_vit": "", "timm_patch_embed": "", "open_clip": "", "segment_anything": "",
             "hf_aimv2": "embeddings"}  # fmt: skip
BACKENDS = ["triton", "eager"]


def tracer_kwargs() -> dict:
    """As timm's FX tests trace: timm's leaf modules and functions, parameter shapes constant."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return {"param_shapes_constant": True}
    return {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
            "param_shapes_constant": True}  # fmt: skip


def fx_graph(module: torch.nn.Module) -> torch.fx.GraphModule:
    """torchvision's feature extractor returning ``module``'s output node, in training and in
    eval mode (the graph of each mode is traced in that mode)."""
    kwargs = tracer_kwargs()
    train_nodes, eval_nodes = fx_extraction.get_graph_node_names(module, tracer_kwargs=kwargs)
    return fx_extraction.create_feature_extractor(
        module, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:],
        tracer_kwargs=kwargs,
    )  # fmt: skip


def traced_case(name: str, backend: str, device: str):
    """(the traced part of the converted model, of the unconverted one, example inputs)."""
    model, before, inputs = converted(name, backend, device)
    part = TRACEABLE[name]
    return model.get_submodule(part), before.get_submodule(part), inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRACEABLE)
def test_forward_fx(name, backend, device, fused_path_calls) -> None:
    """timm's test_model_forward_fx: the traced graph's output is the model's, bit for bit;
    here the unconverted model's and the eager converted model's, while the fused model's
    (which ran the op) agrees within the accuracy rule. The graph holds no fused call."""
    model, before, inputs = traced_case(name, backend, device)
    with torch.inference_mode():
        out = first_tensor(model(*inputs))
        assert len(fused_path_calls) == (backend == "triton"), "the fused path did not run"
        graph = fx_graph(model)
        traced = first_tensor(graph(*inputs))
        expected = first_tensor(before(*inputs))
    assert len(fused_path_calls) == (backend == "triton"), "the graph called the fused op"
    assert torch.equal(traced, expected)
    if backend == "eager":
        assert torch.equal(traced, out)
    else:
        torch.testing.assert_close(traced, out, **TOL)
    assert not out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRACEABLE)
def test_backward_fx(name, backend, device) -> None:
    """timm's test_model_backward_fx: the training graph's backward gives every parameter a
    gradient, here the gradients the converted model's own backward gives."""
    model, _, inputs = traced_case(name, backend, device)
    model.train()
    graph = fx_graph(model).train()
    first_tensor(graph(*inputs)).mean().backward()
    traced = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    first_tensor(model(*inputs)).mean().backward()
    for n, p in model.named_parameters():
        assert traced[n] is not None, f"no gradient for {n}"
        torch.testing.assert_close(traced[n], p.grad, **TOL, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRACEABLE)
def test_forward_fx_torchscript(name, backend, device) -> None:
    """timm's test_model_forward_fx_torchscript: the traced graph scripts and runs (giving the
    unconverted model's output), the converted model keeping its modules (a hand-off norm,
    a leaf of the graph, is scripted as its peer's); the converted model itself does not
    script, with an error naming zeta_fused."""
    model, before, inputs = traced_case(name, backend, device)
    classes = [type(m) for m in model.modules()]
    scripted = torch.jit.script(fx_graph(model))
    assert [type(m) for m in model.modules()] == classes
    with torch.inference_mode():
        out = first_tensor(scripted(*inputs))
        torch.testing.assert_close(out, first_tensor(before(*inputs)), **TOL)
    with pytest.raises(RuntimeError, match="zeta_fused: torch.jit.script cannot compile"):
        torch.jit.script(model)


def trace_outcome(module: torch.nn.Module) -> str:
    try:
        torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - compared by the caller
        return f"{type(exc).__name__}: {exc}"
    return "traced"


@pytest.mark.parametrize("name", sorted(set(PEERS) - set(TRACEABLE)))
def test_trace_fails_as_the_peers(name) -> None:
    """Where the unconverted model does not trace (shapes read in Python, einops' recipe cache,
    transformers' output capture), the converted one fails with the same error, raised by the
    peer's own code: the conversion adds no failure of its own."""
    model, before, _ = converted(name, "triton", "cpu")
    parts = [p for p in ("", "embeddings") if hasattr(model, p) or not p]
    for part in parts:
        expected = trace_outcome(before.get_submodule(part))
        assert expected != "traced", f"{name} {part!r} traces: list it in TRACEABLE"
        assert trace_outcome(model.get_submodule(part)) == expected, part


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_extraction_of_a_converted_timm_vit(backend, device) -> None:
    """torchvision's create_feature_extractor and timm's FX feature extraction: the node names
    of the unconverted model, and its features, bit for bit."""
    from timm.layers import create_feature_extractor, get_graph_node_names

    model, before, (x,) = converted("timm_vit", backend, device)
    assert get_graph_node_names(model) == get_graph_node_names(before)
    nodes = {"blocks.0": "block", "norm_pre": "pre", "norm": "norm"}
    for extract in (create_feature_extractor, fx_extraction.create_feature_extractor):
        with torch.inference_mode():
            got, want = extract(model, nodes)(x), extract(before, nodes)(x)
        assert got.keys() == want.keys() == set(nodes.values())
        for key in got:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_quantization_of_a_converted_timm_vit(backend, device) -> None:
    """FX graph mode post-training quantization (prepare, calibrate, convert) gives the
    quantized unconverted model's outputs, bit for bit."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model, before, (x,) = converted("timm_vit", backend, device)
    outputs = []
    for m in (model, before):
        prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        outputs.append(convert_fx(prepared)(x))
    assert torch.equal(*outputs)
