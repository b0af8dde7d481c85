"""timm's token dropping and the modules between a ViT's stem and its pre-transformer norm, as
the fused timm stem (:mod:`.timm`) reads them per call: whether a module passes its input
tensor on as it is, and whether the stem can make ``PatchDropout``'s draw itself (the same
random numbers and selection as timm's) and embed only the patches it keeps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.params import forward_of, plain
from . import _base


def patch_dropout(m: nn.Module) -> bool:
    """``m`` is timm's ``PatchDropout`` computing what timm's does (as converted: the stem may
    draw for it). Releases before 1.0 return indices too when ``return_indices`` is set."""
    from timm.layers import PatchDropout

    return (
        isinstance(m, PatchDropout)
        and forward_of(m) in (PatchDropout.forward, _base.HandoffTokenDrop.forward)
        and not getattr(m, "return_indices", False)
    )


def keeps_tensor(m: nn.Module) -> bool:
    """The module returns its input tensor itself in this call (eval, or a rate of 0)."""
    if plain(m, nn.Identity):
        return True
    if plain(m, nn.Dropout):
        return not m.training or m.p == 0
    if patch_dropout(m):
        return not m.training or m.prob == 0
    return False


def hands_on(m: nn.Module) -> bool:
    """timm's own call of ``m`` (``patch_drop``) passes on the very tensor it receives, eager
    and as torch.compile traces it: torch 2.11's dynamo gives a traced dropout that keeps the
    tensor an output of its own (2.14's keeps the input's), which a hand-off would refuse."""
    return keeps_tensor(m) and not (plain(m, nn.Dropout) and torch.compiler.is_compiling())


def stem_draws(drop: nn.Module, prefix_rows: int) -> bool:
    """The stem can make ``drop``'s draw in this call and embed only the patches it keeps:
    timm's PatchDropout as converted, active, keeping the stem's prefix rows in front."""
    return (
        plain(drop, _base.HandoffTokenDrop)
        and patch_dropout(drop)
        and drop.training
        and drop.prob > 0
        and drop.num_prefix_tokens == prefix_rows
    )


def draw_keep(drop: nn.Module, x: Tensor, tokens: int) -> Tensor:
    """The patches timm's ``patch_dropout_forward`` keeps of ``tokens`` per image: the same
    random numbers (shape, device, order of the draw), the same selection."""
    num_keep = max(1, int(tokens * (1.0 - drop.prob)))
    ids = torch.argsort(torch.randn(x.shape[0], tokens, device=x.device), dim=-1)[:, :num_keep]
    return ids.sort(dim=-1)[0] if getattr(drop, "ordered", False) else ids
