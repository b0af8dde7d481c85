"""A call's scratch in one workspace (zeta_fused/op/workspace.py): the parts' layout, and the two
ways of handing them to kernels (Slots for compiled kernels, views for the interpreter) giving
the same memory. The kernels' use of the parts is checked by the forward and backward tests
(every call's scratch is carved; the workspace is NaN-filled under the tests)."""

from __future__ import annotations

import math
import random

import torch

from zeta_fused.op import workspace
from zeta_fused.op.workspace import Slot

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int64)


def _random_parts(rng: random.Random) -> list:
    parts = []
    for _ in range(rng.randrange(1, 12)):
        if rng.random() < 0.25:
            parts.append(None)
            continue
        shape = tuple(rng.choice((0, 1, 3, 17, 64, 129)) for _ in range(rng.randrange(1, 4)))
        parts.append((shape, rng.choice(DTYPES)))
    return parts


def test_parts_aligned_apart_and_inside() -> None:
    """Every part starts on an ALIGN boundary, after the end of the one before, and ends
    inside the workspace; absent parts stay absent."""
    rng = random.Random(0)
    for _ in range(300):
        parts = _random_parts(rng)
        lay = workspace.layout(*parts)
        end = 0
        for given, part in zip(parts, lay.parts, strict=True):
            if given is None:
                assert part is None
                continue
            assert (part.shape, part.dtype) == given
            assert part.offset % workspace.ALIGN == 0 and part.offset >= end
            end = part.offset + math.prod(part.shape) * part.dtype.itemsize
            assert end <= lay.nbytes


def test_slots_are_the_views() -> None:
    """A Slot points where the interpreter's view of the same part starts, with its dtype;
    the views are writable apart (writing one part changes no other)."""
    rng = random.Random(1)
    like = torch.empty(1)
    for _ in range(100):
        lay = workspace.layout(*_random_parts(rng))
        ws, views = workspace.carve(like, lay, views=True)
        ws_slots, slots = workspace.carve(like, lay, views=False)
        for part, view, slot in zip(lay.parts, views, slots, strict=True):
            if part is None:
                assert view is None and slot is None
                continue
            assert type(slot) is Slot and slot.dtype == view.dtype == part.dtype
            assert view.shape == part.shape
            assert slot.data_ptr() - ws_slots.data_ptr() == part.offset
            assert view.storage_offset() * view.element_size() == part.offset
        for i, view in enumerate(views):
            if view is None or view.numel() == 0:
                continue
            before = [None if v is None else v.view(torch.uint8).clone() for v in views]
            view.fill_(7)
            for j, other in enumerate(views):
                if j != i and other is not None:
                    assert torch.equal(other.view(torch.uint8), before[j])


class _Given:
    """Stands for the image a call carves on: its new_empty hands out the workspaces given,
    in turn (the caching allocator giving a freed block back, or another one)."""

    def __init__(self, *workspaces: torch.Tensor) -> None:
        self.workspaces = list(workspaces)

    def new_empty(self, shape, dtype):
        ws = self.workspaces.pop(0)
        assert ws.dtype == dtype and ws.shape[0] >= shape[0]
        return ws


def test_slots_of_an_address_seen_again() -> None:
    """The Slots kept for a layout are those of the workspace's address: the same address
    again gives the same Slots, any other address (more than the kept few, in any order) its
    own, each at its part's offset."""
    lay = workspace.layout(((64,), torch.float32), None, ((3, 5), torch.int64))
    blocks = [torch.empty(lay.nbytes, dtype=torch.uint8) for _ in range(workspace.ADDRESSES + 3)]
    order = [*range(len(blocks)), 0, 0, 5, len(blocks) - 1, 2, 2]
    given = _Given(*(blocks[i] for i in order))
    seen, previous = {}, None
    for i in order:
        ws, slots = workspace.carve(given, lay, views=False)
        assert ws is blocks[i]
        for part, slot in zip(lay.parts, slots, strict=True):
            assert (slot is None) == (part is None)
            if slot is not None:
                assert slot.data_ptr() == ws.data_ptr() + part.offset
                assert slot.dtype == part.dtype
        if i == previous:  # the same address twice in a row: the Slots kept for it
            assert slots is seen[i]
        seen[i], previous = slots, i
    assert seen[0] is not seen[5]


def test_no_parts_no_workspace() -> None:
    """A call without scratch allocates nothing; one whose parts are all empty gets them."""
    like = torch.empty(1)
    assert workspace.carve(like, workspace.layout(None, None)) == (None, (None, None))
    _, empty = workspace.carve(like, workspace.layout(((0,), torch.float32), None), views=True)
    assert empty[0].shape == (0,) and empty[1] is None
