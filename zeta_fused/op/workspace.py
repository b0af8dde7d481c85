"""A call's scratch buffers in one allocation (docs/design.md, "Host path").

The forward and backward kernels pass each other up to a dozen small buffers (the folded
weight, partial sums, counters, row offsets, tile lists) that nothing outside the call reads.
Each tensor allocation costs the host about as much as a kernel's whole bound launch, so a call
allocates one byte workspace and hands the kernels pointers into it: a :class:`Layout`, decided
once per call signature with the rest of the call's decisions, gives every part's offset, shape
and dtype; :func:`carve` makes the parts for one call.

Compiled kernels take :class:`Slot` pointers (a dtype and an address, cheaper than a tensor
view); Triton's interpreter copies tensors' storages to run a kernel, so under it the parts are
views of the workspace. Every part starts on a 256-byte boundary: the kernels' pointer
alignment (16 bytes, which Triton specialises on) is the allocator's, and wide parts (the
folded weight) keep whole cache lines. Under ``torch.use_deterministic_algorithms`` every
allocation is filled (NaN for floats): the workspace is filled once.

The call holds the workspace until its kernels are queued on its stream; released then, the
caching allocator hands its memory to nothing that could run before them (as for any temporary
tensor).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

ALIGN = 256  # bytes: every part's offset is a multiple

# The interpreter reads the kernels' memory through tensors: set when the kernels are defined
# (TRITON_INTERPRET at import, as triton.jit reads it), read once.
_VIEWS = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Slot:
    """A pointer into a call's workspace that a Triton launch takes as it takes a tensor:
    Triton reads a pointer argument's ``dtype`` and ``data_ptr()`` alone. Cheaper to make than
    a tensor view. A value: it does not keep the memory alive."""

    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr: int, dtype) -> None:
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


class Part(NamedTuple):
    offset: int  # bytes from the workspace's start
    shape: tuple[int, ...]
    dtype: torch.dtype


class Layout(NamedTuple):
    """Where each part of a call's workspace lies (None for a part the call has not)."""

    nbytes: int
    parts: tuple[Part | None, ...]


def layout(*parts: tuple[tuple[int, ...], torch.dtype] | None) -> Layout:
    """The layout of ``parts``, each (shape, dtype) or None, in order."""
    placed, offset = [], 0
    for p in parts:
        if p is None:
            placed.append(None)
            continue
        shape, dtype = p
        placed.append(Part(offset, tuple(shape), dtype))
        offset += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    return Layout(offset, tuple(placed))


# Per layout, the Slots of the workspace addresses carved last: Slots are values (an address
# and a dtype), so those of an address seen again are the same. A loop's workspaces, freed and
# allocated again at the same sizes, mostly get the same few blocks back.
_seen: dict[int, tuple[Layout, dict[int, tuple]]] = {}
MAX_LAYOUTS = 1024  # a process with ever-new call signatures starts the table afresh
ADDRESSES = 8  # kept per layout


def carve(like: Tensor, lay: Layout, views: bool = _VIEWS) -> tuple[Tensor | None, tuple]:
    """(workspace, parts of ``lay``) for one call, the workspace new on ``like``'s device (None
    for a layout without parts): Slots for compiled kernels, tensor views with ``views`` (the
    interpreter's). The caller holds the workspace until its kernels are queued."""
    if not any(lay.parts):
        return None, lay.parts
    ws = like.new_empty((max(lay.nbytes, 1),), dtype=torch.uint8)  # (parts may all be empty)
    if views:
        return ws, tuple(
            None if p is None
            else ws[p.offset : p.offset + math.prod(p.shape) * p.dtype.itemsize]
            .view(p.dtype).view(p.shape)
            for p in lay.parts
        )  # fmt: skip
    base = ws.data_ptr()
    entry = _seen.get(id(lay))
    if entry is None or entry[0] is not lay:
        if len(_seen) >= MAX_LAYOUTS:
            _seen.clear()
        entry = _seen[id(lay)] = (lay, {})  # (lay kept: its id stays its own)
    parts = entry[1].get(base)
    if parts is None:
        parts = tuple([None if p is None else Slot(base + p.offset, p.dtype) for p in lay.parts])
        if len(entry[1]) >= ADDRESSES:
            entry[1].clear()
        entry[1][base] = parts
    return ws, parts
