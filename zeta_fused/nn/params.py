"""Reading a module's children and parameters on the per-call path, as the eager modules read
them: shared by the modules (``nn``) and the converted peers (``integrations``)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor, nn

from .. import dispatch

T = TypeVar("T")


def param(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` without ``nn.Module.__getattr__`` (the per-call host path reads
    several); anything not registered as a parameter (a parametrization's property) still goes
    through ``getattr``. Each parameter is read once per call, as the eager modules read it."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def forward_of(module: nn.Module | None) -> Callable | None:
    """The forward a call of ``module`` runs: one set on the instance (accelerate's device
    hooks wrap it so, as does a monkeypatch), else its class's."""
    own = getattr(module, "__dict__", {}).get("forward")
    return getattr(type(module), "forward", None) if own is None else own


def plain(module: nn.Module, cls: type) -> bool:
    """``module`` computes what ``cls`` does: an instance whose calls run ``cls.forward`` (a
    LoRA-style subclass that overrides it does not, nor an instance given its own forward)."""
    return isinstance(module, cls) and forward_of(module) is cls.forward


def raw_params(*modules: nn.Module | None) -> list[Tensor]:
    """The registered parameters of ``modules``, read without running any parametrization."""
    return [p for m in modules if m is not None for p in m._parameters.values() if p is not None]


def bound(owner: nn.Module, key: str, children: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, read again whenever ``children`` (the child modules it depends on,
    compared by identity) change: a child replaced, appended or deleted, or given another
    forward (its class swapped in place, a forward set on the instance). Kept in the instance
    dict under ``key`` (not pickled: the owners drop ``_zeta_*`` keys), so each process binds
    again on first use."""
    forwards = [forward_of(c) for c in children]
    entry = owner.__dict__.get(key)
    if (
        entry is None
        or len(entry[0]) != len(children)
        or not all(map(operator.is_, entry[0], children))  # no generator: per-call path
        or not all(map(operator.is_, entry[1], forwards))
    ):
        entry = (children, forwards, compute())
        owner.__dict__[key] = entry
    return entry[2]


def any_hook(owner: nn.Module, key: str, *modules: nn.Module) -> bool:
    """Whether calling ``modules`` one by one would run a hook (:func:`~zeta_fused.dispatch.
    hook_dicts`, the global tables included), the tables bound once to ``modules`` under
    ``key`` on ``owner`` (hooks are added to and removed from them in place)."""
    return any(bound(owner, key, modules, lambda: dispatch.hook_dicts(*modules)))


def forwarded(child: str, name: str, check: Callable | None = None) -> property:
    """A property of a module that reads and writes ``name`` on its child module ``child``
    (``check``: validates a value set)."""

    def set_value(owner: nn.Module, value) -> None:
        setattr(getattr(owner, child), name, value if check is None else check(value))

    return property(lambda owner: getattr(getattr(owner, child), name), set_value)
