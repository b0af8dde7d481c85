"""torch.compile (fullgraph) and torch.export (strict) of a tiny model of every converter
(tests/peers.py), converted with the fused backend: traced without a graph break, the fused op
in the graph, the unconverted model's outputs. Dynamo traces the converters' Python as it is
written (a generator under ``math.prod`` broke VideoMAE's and vit-pytorch's stems)."""

from __future__ import annotations

import pytest
import torch
from peers import PEERS, converted, first_tensor

TOL = {"rtol": 1e-4, "atol": 1e-5}
OP = "zeta_fused.patch_embed_fwd"
# DeiT's and SigLIP's fused forwards are ViT's and CLIP's (the same class, another table).
TRACED = sorted(set(PEERS) - {"hf_deit", "hf_siglip"})


def same_seed_outputs(run, before, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(``run(*inputs)``, ``before(*inputs)``), each from the same seed (ViTMAE draws its mask)."""
    outputs = []
    for call in (run, before):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(first_tensor(call(*inputs)))
    return outputs[0], outputs[1]


@pytest.mark.parametrize("name", TRACED)
def test_compile_fullgraph(name, device) -> None:
    torch._dynamo.reset()
    model, before, inputs = converted(name, "triton", device)
    graphs = []

    def keep_graph(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=keep_graph)
    got, expected = same_seed_outputs(compiled, before, inputs)
    assert len(graphs) == 1 and OP in graphs[0]
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", TRACED)
def test_export_strict(name, device) -> None:
    model, before, inputs = converted(name, "triton", device)
    program = torch.export.export(model, inputs, strict=True)
    assert OP in str(program.graph)
    got, expected = same_seed_outputs(program.module(), before, inputs)
    torch.testing.assert_close(got, expected, **TOL)
