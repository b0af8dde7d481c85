"""The framework of whole-stem conversion (docs/design.md, "Whole stems"), shared by the
library modules: ``fuse_stems(model)`` (zeta_fused/integrations/convert.py) fuses, in place, the
patch embedding together with what the peer does right after it (prefix tokens, position
embeddings, the pre-transformer LayerNorm) into one call of the fused op.

Each library module (``timm``, ``transformers``, ...) lists its :class:`StemKind` s in
``STEM_KINDS``: which modules it recognises, why one cannot be fused, and how it is
converted. Conversion only swaps classes (a subclass of the module's own class with a fused
forward, :func:`fused_class`): the same module objects, Parameters and state-dict keys. The
fused forward runs the fused op when the call allows it (:meth:`FusedStem.zeta_fusable`) and the
peer's own code otherwise, so the peer's methods and errors stay.

Norms that the peer applies outside the stem's module (timm's ``norm_pre``, CLIP's
``pre_layrnorm``, OpenCLIP's ``ln_pre``) are fused by a hand-off: while the owner's forward runs
(:func:`handoff_scope`), the stem applies that norm itself and marks its output; the norm module
(class-swapped by :func:`handoff_class`) then returns that very tensor as it is, and normalises
anything else as before. Called on its own, outside the owner's forward, the stem returns what
the peer's stem returns.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import dispatch
from ..checks import check_input
from ..functional import fused_call
from ..nn.norms import norm_kind, norm_problem
from ..nn.params import any_hook, forward_of, param, plain
from ..op.args import Norm, Stem
from .convs import conv_runs_itself, crop_to_grid, patch_conv_problem, patch_grid

# The callbacks a fused attempt takes (each converter's ``try_fused``), called with the patch
# grid of the call once the input is checked:
# - the rest of a whole stem for that grid (prefix rows, position table, stem norm); None: the
#   stem cannot be fused for this input (the peer's code runs and raises its own errors);
StemParts = Callable[[tuple[int, ...]], Stem | None]
# - the (B, L) indices of the patches to embed, drawn only once the call is known to run fused
#   (but for a wrapper operand), so that a peer's random draw is made only then.
Keep = Callable[[tuple[int, ...]], Tensor]


class StemKind(NamedTuple):
    """A family of whole stems the converter knows."""

    name: str  # shown in the summary ("timm VisionTransformer")
    matches: Callable[[nn.Module], bool]  # the module owns such a stem
    problem: Callable[[nn.Module], str | None]  # why it cannot be fused; None: it can
    convert: Callable[[nn.Module, str], None]  # swap the classes; (module, backend)


def peer_class(module: str, name: str) -> type | None:
    """A peer's class if its module is imported already (a model of it exists only then), so
    recognising modules never imports a peer library."""
    return getattr(sys.modules.get(module), name, None)


def is_instance(module: str, name: str) -> Callable[[nn.Module], bool]:
    """A StemKind's ``matches``: an instance of the peer class ``module.name``."""

    def matches(m: nn.Module) -> bool:
        cls = peer_class(module, name)
        return cls is not None and isinstance(m, cls)

    return matches


def overrides(m: nn.Module, cls: type, method: str) -> str | None:
    """Why ``m``'s class is not ``cls`` as far as ``method`` goes (a subclass overriding it
    computes something else), or None."""
    if getattr(type(m), method) is not getattr(cls, method):
        return f"{type(m).__name__} overrides {cls.__name__}.{method}"
    return None


def swapper(mixin: type) -> Callable[[nn.Module, str], None]:
    """A StemKind's ``convert``: the class swap to ``mixin``'s fused class."""
    return lambda m, backend: swap(m, mixin, backend)


def rebuild_fused(cls: type, state: dict, make, *args) -> nn.Module:
    """Unpickle a module whose fused class was made at run time: an instance of the peer's
    ``cls`` with ``state``, its class then swapped to ``make(*args, cls)``."""
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = make(*args, cls)
    return module


class FusedStem(dispatch.NotScriptable):
    """Base of every fused stem class (mixed before the peer's class): its backend, pickling
    as the peer's class, and the per-call decision."""

    zeta_backend: str = "auto"
    _zeta_base: type
    _zeta_mixin: type

    def zeta_fusable(self, x: Tensor, *children: nn.Module) -> bool:
        """This call may run fused: a non-empty input (for an empty batch some peers return an
        empty result and some raise: their own code decides), no hook on the children it
        would not call (the module's own hooks run either way) and no global one, and the
        dispatcher agrees."""
        return (
            x.numel() != 0
            and not any_hook(self, "_zeta_children_hooks", *children)
            and dispatch.use_fused(self.zeta_backend, x)
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in [k for k in state if k.startswith("_zeta_")]:
            del state[key]  # caches bound to this process's objects
        return state

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickled as the peer's class, converted again on load.
        return rebuild_fused, (self._zeta_base, self.__getstate__(), fused_class, self._zeta_mixin)


_CLASSES: dict[tuple[type, type], type] = {}


def fused_class(mixin: type, base: type) -> type:
    """The subclass of ``base`` with ``mixin``'s forward (one per pair)."""
    if isinstance(base, type) and issubclass(base, FusedStem):
        base = base._zeta_base
    key = (mixin, base)
    if key not in _CLASSES:
        # The peer's own name and module: libraries key behaviour on them (transformers'
        # config.architectures on save_pretrained and its output-capture registry; the
        # converters' library checks). isinstance(m, FusedStem) tells a fused module.
        attrs = {"_zeta_base": base, "_zeta_mixin": mixin, "__module__": base.__module__,
                 "__qualname__": base.__qualname__}  # fmt: skip
        _CLASSES[key] = type(base.__name__, (mixin, base), attrs)
    return _CLASSES[key]


def swap(m: nn.Module, mixin: type, backend: str | None = None) -> None:
    """Convert ``m`` in place to ``fused_class(mixin, type(m))``."""
    m.__class__ = fused_class(mixin, type(m))
    if backend is not None:
        m.zeta_backend = backend


# --- Per-call state -----------------------------------------------------------------------


class _CallState(threading.local):
    """The per-call state of fused stems (the owner a stem computes for, the stem's output, the
    norm it hands over), by module identity and per thread: one model called from several
    threads at once keeps each call's state apart, as the unconverted model's locals are.
    (torch.compile traces thread-local attributes; it does not trace ``ContextVar.set``.)"""

    def __init__(self) -> None:
        self.by_module: dict[int, dict] = {}


_CALLS = _CallState()


def call_state(module: nn.Module) -> dict | None:
    """The state of the call ``module`` takes part in, in this thread; None outside one."""
    return _CALLS.by_module.get(id(module))


class call_scope:  # noqa: N801 - used as a context manager, like contextlib's
    """``with call_scope(state, *modules)``: :func:`call_state` gives ``state`` for each of
    ``modules`` in this thread until the block ends, however it ends; then what they had before
    (a model running inside its own call) comes back."""

    def __init__(self, state: dict, *modules: nn.Module):
        self.state, self.ids = state, [id(m) for m in modules]

    def __enter__(self) -> dict:
        table = _CALLS.by_module
        self.saved = [table.get(i) for i in self.ids]
        for i in self.ids:
            table[i] = self.state
        return self.state

    def __exit__(self, *exc) -> None:
        table = _CALLS.by_module
        for i, saved in zip(self.ids, self.saved, strict=True):
            if saved is None:
                table.pop(i, None)
            else:
                table[i] = saved


class HandoffModule(FusedStem):
    """A module of the owner (a norm, a token drop) that a fused stem may do the work of, in
    its owner's call only: when the stem left an entry for it in the call's state
    (:func:`call_state`), the module returns ``_zeta_handed(x, entry)``, else its peer's
    forward runs."""

    _zeta_entry: str  # the key of the call state's entry the stem leaves for it

    @dispatch.traced_as_peer
    def forward(self, x: Tensor) -> Tensor:
        state = call_state(self)
        entry = None if state is None else state.pop(self._zeta_entry, None)
        return super().forward(x) if entry is None else self._zeta_handed(x, entry)

    def _zeta_handed(self, x: Tensor, entry) -> Tensor:
        raise NotImplementedError

    def __prepare_scriptable__(self):
        # Scripted as the peer's module (sharing its parameters, buffers and settings), as in a
        # graph that torch.fx made, which calls a torch.nn norm as a leaf: outside its owner's
        # call it computes what the peer's does. Scripting the owner, which is converted too,
        # raises first (dispatch.NotScriptable): the owner's module is never replaced.
        peer = object.__new__(self._zeta_base)
        peer.__dict__.update(self.__getstate__())
        return peer


# --- Hand-off of a norm applied outside the stem's module --------------------------------------
# In the call's state: "norm", the norm the owner applies after the stem; "done", the tensor
# the stem normalised with it already.


class HandoffNorm(HandoffModule):
    """A norm (a LayerNorm or RMSNorm the op computes) that returns the stem's output as it is
    when the stem applied it already."""

    _zeta_entry = "done"

    def _zeta_handed(self, x: Tensor, done: Tensor) -> Tensor:
        if done is not x:
            # The stem normalised its output already; normalising another tensor instead
            # would silently differ from the peer. The owners check that nothing between the
            # stem and the norm replaces the tensor, so this is a bug worth reporting.
            raise RuntimeError(
                f"{type(self).__name__}: the fused stem applied this norm already, but it "
                f"received another tensor than the stem's output; please report this model"
            )
        return x


def handoff_class(norm: nn.Module) -> None:
    """Make ``norm`` (a norm the op computes, :func:`~zeta_fused.nn.norms.norm_kind`) accept
    hand-offs."""
    if norm_kind(norm) is not None:
        swap(norm, HandoffNorm)


def handoff_scope(owner: nn.Module, stem: nn.Module, norm: nn.Module | None,
                  drop: nn.Module | None = None) -> call_scope:  # fmt: skip
    """The scope of one call of the owner's forward: the stem computes for ``owner`` (the
    call's state ``"owner"``) and may apply ``norm`` (None: none) and hand its output over,
    and draw the tokens that the token drop ``drop`` (a :class:`HandoffTokenDrop`; None: none)
    keeps (the state's ``"drop"``). A stem whose calls run a forward set on the instance
    (accelerate's device hooks, a monkeypatch, which may change the stem's output) hands
    nothing over."""
    if forward_of(stem) is not type(stem).forward:
        norm = drop = None
    modules = [m for m in (owner, stem, norm, drop) if m is not None]
    return call_scope({"owner": owner, "norm": norm, "drop": drop}, *modules)


def pending_norm(stem: nn.Module, dim: int) -> nn.Module | None:
    """The norm the stem may apply in this call: its owner's, within :func:`handoff_scope`,
    when it is a hand-off norm the op computes over the ``dim`` values of a token, without
    hooks."""
    state = call_state(stem)
    norm = None if state is None else state.get("norm")
    if (
        norm is None
        or not plain(norm, HandoffNorm)
        or norm_problem(norm, dim) is not None
        or any_hook(norm, "_zeta_own_hooks", norm)
    ):
        return None
    return norm


def hand_off(norm: nn.Module, y: Tensor) -> Tensor:
    """Mark ``y`` as normalised by ``norm`` already (its next call in this owner's call returns
    it as it is)."""
    call_state(norm)["done"] = y
    return y


# --- Token dropping drawn by the stem ----------------------------------------------------------
# In the call's state: "drawn", (the stem's output or None, prefix rows, the (B, L) indices
# drawn): the draw the stem made in the token drop's place.


def keep_tokens(x: Tensor, prefix_rows: int, ids: Tensor) -> Tensor:
    """What a peer's token drop returns for the indices ``ids`` it drew: the first
    ``prefix_rows`` rows, then the patch tokens ``ids`` of each image (timm's gather)."""
    tokens = x[:, prefix_rows:].gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat((x[:, :prefix_rows], tokens), 1) if prefix_rows else tokens


class HandoffTokenDrop(HandoffModule):
    """A token drop (timm's and OpenCLIP's ``PatchDropout``) whose random draw the stem makes:
    it returns the stem's output as it is when the op kept the drawn tokens already, and
    keeps the drawn ones of the tensor it receives when the stem drew them but the op could
    not run (drawing again would consume the random numbers twice)."""

    _zeta_entry = "drawn"

    def _zeta_handed(self, x: Tensor, drawn: tuple) -> Tensor:
        out, prefix_rows, ids = drawn
        if out is None:
            return keep_tokens(x, prefix_rows, ids.to(x.device))
        if out is not x:  # as HandoffNorm: the owners check that nothing replaces it
            raise RuntimeError(
                f"{type(self).__name__}: the fused stem dropped tokens already, but it "
                f"received another tensor than the stem's output; please report this model"
            )
        return x


# The names that models pickled with a hand-off module refer to (their fused classes are made
# again on load from the mixin; zeta_fused/_legacy.py maps the older paths here).
_HandoffNorm, _HandoffTokenDrop = HandoffNorm, HandoffTokenDrop


def handoff_drop_class(drop: nn.Module, peer: type | None) -> None:
    """Let the stem draw for ``drop`` when it is a plain ``peer`` token drop."""
    if peer is not None and plain(drop, peer):
        swap(drop, HandoffTokenDrop)


def conv_stem(x: Tensor, conv: nn.Module, stem: StemParts, post_norm: Norm | None = None,
              keep: Keep | None = None) -> Tensor | None:  # fmt: skip
    """The whole stem over a patch conv (kernel = stride) as one fused call: (B, P + N, D).
    ``stem(grid)`` gives the prefix rows, the position table of that grid and the stem norm
    (the caller resamples a table for another size with the peer's own function); ``keep(grid)``
    the (B, L) patches to embed (output (B, P + L, D)). None: the peer's code must run (the
    conv must run itself for an unbatched or too small input, a conv changed in place, a stem
    that cannot be fused for this input)."""
    patch = tuple(conv.kernel_size)
    if conv_runs_itself(x, patch) or patch_conv_problem(conv) is not None:
        return None
    x = crop_to_grid(x, patch)
    check_input(x, conv.in_channels, patch, False)
    weight, bias = param(conv, "weight"), param(conv, "bias")
    shape = (conv.out_channels, conv.in_channels, *patch)
    grid = tuple(patch_grid(x, patch))
    parts = stem(grid)
    if parts is None:
        return None
    return fused_call(x, patch, weight, shape, bias, None, post_norm, parts,
                      None if keep is None else keep(grid))  # fmt: skip


__all__ = ["FusedStem", "StemKind", "conv_stem", "peer_class", "swap"]
