"""Backend choice: fused Triton op or the eager PyTorch path.

``backend="auto"`` runs the fused op on CUDA tensors when Triton imports and eager otherwise;
the environment variable ``ZETA_FUSED_BACKEND`` (auto | triton | eager), read at the first
call, overrides ``"auto"``.
``"triton"`` forces the fused op: on a CPU tensor only under the Triton interpreter
(``TRITON_INTERPRET=1``), otherwise it raises. Either way a call runs eager when PyTorch is
doing something the fused op does not take part in (docs/design.md, "Drop-in rule"): a
``torch.func`` transform, forward-mode AD, ``torch.jit.trace``, or an fp64 input under
autocast. Nothing here initialises CUDA or imports Triton at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.fx._symbolic_trace as _fx

BACKENDS = ("auto", "triton", "eager")
ENV_VAR = "ZETA_FUSED_BACKEND"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] = None: deliberately hidden
        return False


# Found once at import without importing Triton; a plain constant keeps torch.compile traces
# free of cache wrappers.
_HAS_TRITON = _find_triton()


_UNTRIED = object()
_triton_error: object = _UNTRIED


def triton_import_error() -> str | None:
    """Why Triton cannot be used (not installed, or it fails to import), or None. Tried once,
    on the first call that would run the fused op outside a torch.compile trace."""
    global _triton_error
    if _triton_error is _UNTRIED:
        # Published once known: a thread arriving during the import must not read "fine" yet.
        error = None if _HAS_TRITON else "the triton package is not installed"
        if _HAS_TRITON:
            try:
                import triton.language  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure means: no fused op
                error = f"the triton package failed to import ({type(exc).__name__}: {exc})"
        _triton_error = error
    return _triton_error


def triton_available() -> bool:
    """True when Triton is installed and imports."""
    return triton_import_error() is None


_warned_no_triton: list[bool] = []


def _warn_no_triton() -> None:
    if not _warned_no_triton:
        _warned_no_triton.append(True)
        warnings.warn(
            f"zeta_fused runs eager on CUDA: {triton_import_error()}", RuntimeWarning, stacklevel=4
        )


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None. Before Triton 3.7 it
    reads a runtime integer used as a loop bound with ``int()`` of a one-element array, which
    numpy 2.4 refuses: every kernel would fail with an InterpreterError."""
    import numpy
    import triton

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
            f"(it needs numpy < 2.4, or Triton >= 3.7)"
        )
    return None


# The backend ZETA_FUSED_BACKEND names for "auto": read once, on the first module call (a
# plain global, which torch.compile traces, rather than a cache wrapper).
_env_choice: object = _UNTRIED


def env_setting(name: str, settings: dict[str, object], default: object, stacklevel: int):
    """The setting the environment variable ``name`` spells, read now: ``settings`` maps each
    accepted spelling (lower case; the value's case and surrounding spaces do not matter) to
    its setting. Unset or empty: ``default``; any other value: ``default`` too, after a
    warning naming the variable and the accepted spellings (``stacklevel`` as
    ``warnings.warn``'s, counted from the caller)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in settings:
        return settings[value]
    warnings.warn(
        f"{name}={raw!r} is not one of {tuple(settings)}: ignored, {default!r} is used",
        stacklevel=stacklevel + 1,
    )
    return default


def _env_backend() -> str:
    global _env_choice
    if _env_choice is _UNTRIED:
        _env_choice = env_setting(ENV_VAR, {b: b for b in BACKENDS}, "auto", stacklevel=5)
    return _env_choice


def effective_backend(backend: str) -> str:
    """The backend after applying the ``ZETA_FUSED_BACKEND`` override to ``"auto"``. The
    variable is read once, at the first call; a value that is not a backend is reported then
    (a warning) and ignored."""
    return _env_backend() if backend == "auto" else backend


def _eager_context(x: torch.Tensor) -> bool:
    """A PyTorch feature the fused op does not take part in is active for this call: a
    torch.func transform (vmap, grad, jvp, jacfwd, ...), forward-mode AD, torch.jit.trace, or
    autocast with an fp64 input (autocast leaves fp64 alone; the op would run it in the
    autocast dtype). Then the call runs the eager modules, which support all of them. Asked
    outside torch.compile only: traced into a graph, the op is what the graph needs."""
    return (
        torch._C._functorch.peek_interpreter_stack() is not None
        or _forward_ad._current_level >= 0
        or torch._C._get_tracing_state() is not None
        or (x.dtype == torch.float64 and torch.is_autocast_enabled(x.device.type))
    )


# torch.fx's tracing flag: a thread-local in recent releases, read through its __dict__ (its
# getter's default for a missing attribute raises and catches an exception on every call
# outside a trace); a module global before.
_fx_tls = getattr(_fx, "_is_fx_tracing_tls", None)
if _fx_tls is not None:

    def _fx_tracing() -> bool:
        return _fx_tls.__dict__.get("flag", False)

else:

    def _fx_tracing() -> bool:
        return _fx._is_fx_tracing_flag


def symbolic_tracing() -> bool:
    """``torch.fx.symbolic_trace`` (or a tracer built on it: torchvision's
    ``create_feature_extractor``, timm's FX feature extraction, FX quantization) is tracing
    the model. Its tensors are Proxies: no Python decision may read their values or sizes, and
    the graph must hold operations, not the result of a call made at trace time. Every fused
    module then runs its peer's own code (docs/design.md, "torch.fx"). torch.export sets the
    same flag while it traces, together with the compiling one: it is not symbolic tracing.
    Compiling is asked first: dynamo folds it to a constant and then never reads the
    thread-local flag, on which it would guard (one graph per thread)."""
    return not torch.compiler.is_compiling() and _fx_tracing()


class traced_as_peer:  # noqa: N801 - a decorator, named as one
    """Decorates a method of a fused class (mixed in front of its peer's class): while
    :func:`symbolic_tracing`, reading the method gives the peer's instead (the next class's in
    the instance's MRO), bound to the instance when read on one. torch.fx then traces the
    peer's code: a module call reads ``module.forward``, and a traced root module's
    ``type(root).forward`` is read on the class, whose signature (argument names, defaults,
    annotations) becomes the graph's. Read on the class otherwise, it is this object (called,
    the method): torch.compile's guards read it so."""

    def __init__(self, method):
        self.method = method
        functools.update_wrapper(self, method)

    def __set_name__(self, owner: type, name: str) -> None:
        self.owner, self.name = owner, name

    def __get__(self, instance, cls=None):
        if symbolic_tracing():
            return getattr(super(self.owner, cls if instance is None else instance), self.name)
        return self if instance is None else self.method.__get__(instance, cls)

    def __call__(self, *args, **kwargs):
        return self.method(*args, **kwargs)


def hook_dicts(*modules: torch.nn.Module) -> tuple[dict, ...]:
    """The hook tables that make a module call differ from its forward: each module's forward
    (pre-)hooks and backward (pre-)hooks, and the global ones. They are mutated in place when a
    hook is added or removed, so ``any(hook_dicts(...))``, kept from binding time, tells on
    every call whether calling the modules one by one would run a hook. (Hook-based
    reparametrisations such as ``torch.nn.utils.prune`` and the legacy ``weight_norm`` /
    ``spectral_norm`` are forward pre-hooks.)"""
    from torch.nn.modules import module as nn_module

    tables = [
        t
        for m in modules
        for t in (m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks)
    ]
    tables += [
        nn_module._global_forward_pre_hooks,
        nn_module._global_forward_hooks,
        nn_module._global_backward_pre_hooks,
        nn_module._global_backward_hooks,
    ]
    return tuple(tables)


def use_fused(backend: str, x: torch.Tensor) -> bool:
    """Whether this call runs the fused Triton op (raises if ``"triton"`` cannot run)."""
    backend = effective_backend(backend)
    if backend == "eager" or (backend == "auto" and not x.is_cuda):
        return False
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Traced into a graph, which calls the op (Triton is imported when it runs).
        why = None if _HAS_TRITON else "the triton package is not installed"
    else:
        why = triton_import_error()
    if backend == "auto":
        if why is not None:
            _warn_no_triton()
            return False
        return compiling or not _eager_context(x)
    if why is not None:
        raise RuntimeError(f"backend='triton' needs Triton, but {why}")
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got a tensor on {x.device}"
        )
    if not x.is_cuda and interpreter_problem() is not None:
        raise RuntimeError(f"backend='triton' on the CPU needs Triton's interpreter, but "
                           f"{interpreter_problem()}")  # fmt: skip
    return compiling or not _eager_context(x)


class NotScriptable:
    """Mixed into every fused module class: ``torch.jit.script`` raises an error naming
    zeta_fused. The fused forwards are Python that TorchScript does not compile, and scripting
    the module's eager forward instead would need ``__prepare_scriptable__`` to return another
    module, which ``torch.jit.script`` then puts in place of this one in its parent: the user's
    model would silently lose its conversion."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"zeta_fused: torch.jit.script cannot compile {type(self).__name__}, a module "
            f"converted or built by zeta_fused (its fused forward is not TorchScript). Script "
            f"the model before converting it (fuse_stems and fuse_patch_embeddings convert in "
            f"place: script a copy.deepcopy made before), or use torch.compile or torch.export, "
            f"which keep the fused op."
        )
