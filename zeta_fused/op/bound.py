"""Bound launches of the Triton kernels (docs/design.md, "Host path").

``kernel[grid](*args, **kwargs)`` costs 15-40 µs of host time per launch: Triton's binder
specialises every argument through generic code, builds a cache key string and looks the
compiled kernel up on every call. :func:`launch` takes the same arguments and launches the same
compiled kernel with less work: a binder generated once per kernel computes a signature key of
the arguments (everything Triton specialises on: constexpr values, each tensor's
dtype and 16-byte alignment, each integer's width class, ``== 1`` and ``% 16 == 0``, floats,
bools, ``None`` and tuple structure) and the argument list; the key finds the compiled kernel
Triton chose for that signature the first time, which is launched on the current stream as
Triton's own launch does (``CompiledKernel.run``, hooks and launch metadata left out while no
launch hook is installed).

The first call of each signature, and every call this module cannot reproduce exactly, goes
through ``kernel[grid]``: the interpreter (``TRITON_INTERPRET=1``: the kernels are not
``JITFunction`` objects), anything standing in for a kernel (test spies, the perf probes' stubs),
a Triton whose ``JITFunction.run`` launches otherwise than :data:`TRITON_LAUNCH` says, a backend
that specialises arguments its own way (AMD's buffer-op checks), launch or pre-run hooks, a
changed global the kernel reads, and argument types the key does not know.

The key is at least as fine as Triton's: two calls with the same key get the same Triton
specialisation (tests/op/test_bound.py checks it against Triton's own specialiser and cache), so a
call never runs a kernel compiled for another one. Threads may make first calls together: each
miss is Triton's own launch, and the entry it leaves is the same whichever thread stores it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from operator import itemgetter
from typing import NamedTuple

from torch import Tensor

from .workspace import Slot

try:
    from triton import knobs
    from triton.backends.compiler import BaseBackend
    from triton.compiler import CompiledKernel
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # a Triton without these (before 3.4): its own path only
    JITFunction = None

# How JITFunction.run launches a compiled kernel in the releases this module binds (3.6 and
# 3.8 checked): the compiled kernel's launcher with the grid, the stream, the function handle,
# the packed metadata, the launch metadata and hooks, then every parameter's value in order.
# A release whose run() does not say this keeps Triton's own path.
TRITON_LAUNCH = (
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
    "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
    "*bound_args.values())"
)
_binds: bool | None = None  # whether this Triton launches as TRITON_LAUNCH says (read once)


def _triton_launches_as_bound() -> bool:
    global _binds
    if _binds is None:
        try:
            source = " ".join(inspect.getsource(JITFunction.run).split())
            _binds = TRITON_LAUNCH in source and hasattr(knobs, "HookChain")
        except (OSError, TypeError, NameError):
            _binds = False
    return _binds


# Integer width classes, as Triton's specialiser types a Python int.
_I32_MIN, _I32_MAX, _I64_MIN, _I64_MAX, _U64_MAX = (
    -(2**31),
    2**31 - 1,
    -(2**63),
    2**63 - 1,
    2**64 - 1,
)
_FLOAT, _BOOL = "fp", "u1"


def _spec(value):
    """The key of a runtime argument: what Triton specialises on, and its type."""
    kind = type(value)
    if kind is int:
        if _I32_MIN <= value <= _I32_MAX:
            # 1 becomes a constant; a multiple of 16 gets the divisibility hint.
            return 1 if value == 1 else 16 if value & 15 == 0 else 0
        if not _I64_MIN <= value <= _U64_MAX:
            raise TypeError("an integer Triton cannot pass")  # Triton's path reports it
        return 64 + (value & 15 == 0) + 2 * (value > _I64_MAX)  # i64, u64
    if isinstance(value, Tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    if kind is Slot:
        return value.dtype, value.ptr & 15 == 0
    if value is None:
        return None
    if kind is tuple:
        return tuple(map(_spec, value))
    if kind is float:
        return _FLOAT
    if kind is bool:
        return _BOOL
    raise TypeError(f"no bound launch for an argument of type {kind.__name__}")


_IMMUTABLE = (int, float, bool, type(None))  # elements whose tuple's key is its identity's


class _Source:
    """Generated key expressions: for each runtime argument, the key :func:`_spec` gives,
    computed inline for the type the argument had in the first call (guarded by a class
    test: any other type goes to the function), so that a call makes no Python call per
    argument."""

    def __init__(self):
        self.namespace = {"_zf_spec": _spec, "_zf_FLOAT": _FLOAT,
                          "_zf_BOOL": _BOOL}  # fmt: skip

    def name(self, value) -> str:
        """A name in the generated code's namespace bound to ``value``."""
        name = f"_zf_{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def runtime(self, ref: str, sample, depth: int = 0) -> str:
        kind = type(sample)
        if kind is int:
            return (f"((1 if {ref} == 1 else 16 if {ref} & 15 == 0 else 0) "
                    f"if {ref}.__class__ is int and {_I32_MIN} <= {ref} <= {_I32_MAX} "
                    f"else _zf_spec({ref}))")  # fmt: skip
        if isinstance(sample, Tensor):
            return (f"(({ref}.dtype, {ref}.data_ptr() & 15 == 0) "
                    f"if {ref}.__class__ is {self.name(kind)} else _zf_spec({ref}))")  # fmt: skip
        if kind is Slot:
            return (f"(({ref}.dtype, {ref}.ptr & 15 == 0) "
                    f"if {ref}.__class__ is {self.name(kind)} else _zf_spec({ref}))")  # fmt: skip
        if sample is None:
            return f"(None if {ref} is None else _zf_spec({ref}))"
        if kind is float or kind is bool:
            marker = "_zf_FLOAT" if kind is float else "_zf_BOOL"
            return f"({marker} if {ref}.__class__ is {kind.__name__} else _zf_spec({ref}))"
        if kind is tuple and depth == 0:
            # Each element through a temporary (assigned in the guard, evaluated first).
            temp = "_zf_t"  # (one name serves every tuple: each is read within its expression)
            items = "".join(
                f"{self.runtime(f'{temp}[{i}]', item, depth + 1)}, "
                for i, item in enumerate(sample)
            )
            full = (f"(({items}) if ({temp} := {ref}).__class__ is tuple and len({temp}) == "
                    f"{len(sample)} else _zf_spec({temp}))")  # fmt: skip
            if not all(type(item) in _IMMUTABLE for item in sample):
                return full
            # A tuple of plain values (strides kept with a call's decisions, passed again
            # and again): the same object has the same key, found by identity first.
            return f"({self.name(_spec(sample))} if {ref} is {self.name(sample)} else {full})"
        return f"_zf_spec({ref})"


def _make_binder(kernel: JITFunction, args: tuple, kwargs: dict):
    """A function of the kernel's arguments (and launch options) returning (every parameter's
    value in order, defaults applied, as Triton's binder does; the signature key), its key
    expressions fastest for arguments of the types of ``args`` and ``kwargs``. None when the
    kernel's signature has parameters other than plain ones, or the call does not bind."""
    sig = kernel.signature
    params = list(sig.parameters.values())
    if len(params) != len(kernel.params) or any(
        p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or p.name.startswith("_zf_")
        for p in params
    ):
        return None
    names = [p.name for p in params]
    try:
        sample = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
    except TypeError:
        return None
    sample.apply_defaults()
    source = _Source()
    arg_list, key_items = [], []
    for p, kp in zip(params, kernel.params, strict=True):
        if p.default is inspect.Parameter.empty:
            arg_list.append(p.name)
        else:
            arg_list.append(f"{p.name}={source.name(p.default)}")
        value = sample.arguments.get(p.name)
        # A constexpr's value itself: Triton's cache compares constexprs with == too.
        key_items.append(p.name if kp.is_constexpr else source.runtime(p.name, value))
    # Launch options (num_warps, ...) with their types: Triton keys them by their text.
    options = "*_zf_options.items(), *map(type, _zf_options.values())"
    code = (
        f"def bind({', '.join(arg_list)}, **_zf_options):\n"
        f"    return ({', '.join(names)},), ({', '.join(key_items)}, {options})\n"
    )
    exec(code, source.namespace)  # noqa: S102 - generated from the kernel's parameter names
    return source.namespace["bind"]


def _make_fixed_binder(kernel: JITFunction, args: tuple, consts: dict):
    """What :func:`_make_binder` makes, for calls that pass every runtime parameter
    positionally (``args``) and always the same constexprs and launch options (``consts``):
    those are bound once, so that a call neither packs nor matches keywords. The same values
    as the general binder's for the same call; in the key, a token of this binder (a new
    object, equal to nothing else) stands for the constexprs and options. None when calls do
    not bind so."""
    params = list(kernel.signature.parameters.values())
    if len(params) != len(kernel.params) or any(
        p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or p.name.startswith("_zf_")
        for p in params
    ):
        return None
    runtime = [p.name for p, kp in zip(params, kernel.params, strict=True) if not kp.is_constexpr]
    if len(args) != len(runtime) or any(name in consts for name in runtime):
        return None
    source = _Source()
    value_items, key_items = [], []
    samples = iter(args)
    for p, kp in zip(params, kernel.params, strict=True):
        if kp.is_constexpr:
            if p.name not in consts and p.default is inspect.Parameter.empty:
                return None
            value_items.append(source.name(consts.get(p.name, p.default)))
        else:
            value_items.append(p.name)
            key_items.append(source.runtime(p.name, next(samples)))
    token = source.name(object())
    code = (
        f"def bind({', '.join(runtime)}):\n"
        f"    return ({', '.join(value_items)},), ({token}, {', '.join(key_items)})\n"
    )
    exec(code, source.namespace)  # noqa: S102 - generated from the kernel's parameter names
    return source.namespace["bind"]


class _Compiled(NamedTuple):
    run: object  # the compiled kernel's launcher
    function: object  # its function handle on the device
    packed_metadata: object


def _plain_backend(backend) -> bool:
    """The backend specialises arguments as Triton's base rules do (which :func:`_spec`
    follows): NVIDIA's does; AMD's adds its own tensor checks."""
    cls = type(backend)
    return (
        getattr(cls, "supports_native_tensor_specialization", False)
        and cls.get_int_specialization is BaseBackend.get_int_specialization
        and cls.get_tensor_specialization is BaseBackend.get_tensor_specialization
    )


def _globals_check(kernel: JITFunction) -> Callable[[], bool]:
    """A function telling whether the module globals the kernel's compiled variants read
    still hold the values they hold now. Triton checks it on every launch (and raises
    otherwise), so a bound launch checks it too: one getter per module, values compared by
    identity first."""
    used = kernel.used_global_vals
    count = len(used)
    by_namespace: dict[int, tuple[dict, list[str]]] = {}
    for (name, _), (_, namespace) in used.items():
        by_namespace.setdefault(id(namespace), (namespace, []))[1].append(name)
    reads = []
    for namespace, names in by_namespace.values():
        getter = itemgetter(*names)
        reads.append((namespace, getter, getter(namespace)))

    def unchanged() -> bool:
        if len(used) != count:
            return False  # a variant compiled elsewhere read more: Triton checks them
        try:
            for namespace, get, seen in reads:
                if get(namespace) != seen:
                    return False
        except KeyError:
            return False
        return True

    return unchanged


class _Binding:
    """One kernel's binder and the compiled kernels Triton chose, by (device, Triton's debug and
    instrumentation settings, signature key)."""

    def __init__(self, kernel: JITFunction):
        self.kernel = kernel
        self.bind = None  # made on the first call (its fast paths for that call's types)
        self.compiled: dict[tuple, _Compiled] = {}
        # launch_fixed's binders by consts, each with its compiled kernels (its keys' own)
        self.fixed: dict[int, tuple[dict, Callable, dict]] = {}
        self.globals_unchanged: Callable[[], bool] = lambda: False  # set by Triton's path

    def launch(self, grid, args: tuple, kwargs: dict, bind=None, compiled_by=None) -> None:
        """Launch through ``bind`` (default: the general binder, taking ``kwargs``; else a
        fixed binder, taking ``args`` alone, for calls whose keywords are ``kwargs``), the
        compiled kernels looked up in ``compiled_by`` (default: the general binder's)."""
        kernel, runtime = self.kernel, knobs.runtime
        active = driver.active
        device = active.get_current_device()
        table = self.compiled if compiled_by is None else compiled_by
        try:
            values, key = self.bind(*args, **kwargs) if bind is None else bind(*args)
            key = (device, runtime.debug, knobs.compilation.instrumentation_mode, key)
            compiled = table.get(key)
        except TypeError:  # an argument the key does not know (or unhashable): Triton decides
            compiled = key = None
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if (
            compiled is None
            or type(grid) is not tuple
            or kernel.pre_run_hooks
            or not (enter is None or (type(enter) is knobs.HookChain and not enter.calls))
            or not (leave is None or (type(leave) is knobs.HookChain and not leave.calls))
            or getattr(runtime, "add_stages_inspection_hook", None) is not None
            or (kernel.used_global_vals and not self.globals_unchanged())
        ):
            self._through_triton(grid, args, kwargs, device, key, table)
            return
        size = len(grid)
        compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1,
                     active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *values)  # fmt: skip

    def launch_fixed(self, grid, consts: dict, args: tuple) -> None:
        """Launch with the fixed binder of ``consts`` (made on its first call)."""
        entry = self.fixed.get(id(consts))
        if entry is None or entry[0] is not consts:
            if len(self.fixed) >= MAX_FIXED:
                self.fixed.clear()
            # (consts kept: its id stays its own; None: calls that do not bind so)
            entry = (consts, _make_fixed_binder(self.kernel, args, consts), {})
            self.fixed[id(consts)] = entry
        self.launch(grid, args, consts, entry[1], entry[2])

    def _through_triton(self, grid, args: tuple, kwargs: dict, device, key, table) -> None:
        """Triton's own launch; the compiled kernel it ran is kept in ``table`` for the key
        unless the call could not be keyed or its backend specialises otherwise."""
        kernel = self.kernel
        result = kernel[grid](*args, **kwargs)
        # Triton has just checked the globals its variants read: they are the values to keep.
        self.globals_unchanged = _globals_check(kernel)
        if (
            key is None
            or not isinstance(result, CompiledKernel)
            or result.function is None  # not loaded: nothing was launched
            or not _plain_backend(kernel.device_caches[device][3])
        ):
            return
        table[key] = _Compiled(result.run, result.function, result.packed_metadata)


_bindings: dict[int, _Binding] = {}


def _binding(kernel, args: tuple, kwargs: dict) -> _Binding | None:
    """The kernel's binding (made on its first call), or None: Triton's own path."""
    binding = _bindings.get(id(kernel))
    if binding is not None and binding.kernel is kernel:
        return binding
    if JITFunction is None or type(kernel) is not JITFunction or not _triton_launches_as_bound():
        return None
    bind = _make_binder(kernel, args, kwargs)
    if bind is None:
        return None
    binding = _Binding(kernel)
    binding.bind = bind
    _bindings[id(kernel)] = binding  # (the dict keeps the kernel alive: its id stays its own)
    return binding


# Fixed binders kept per kernel; a process passing ever-new constexpr dicts starts afresh.
MAX_FIXED = 1024


def launch_fixed(kernel, grid: tuple[int, ...], consts: dict, *args) -> None:
    """``kernel[grid](*args, **consts)`` for ``consts`` that the caller keeps and never changes
    (a call signature's constexprs and launch options) and every runtime argument passed
    positionally: as :func:`launch`, with the constexpr part of the key and values bound once
    per ``consts``."""
    binding = _binding(kernel, args, consts)
    if binding is None:
        kernel[grid](*args, **consts)
    else:
        binding.launch_fixed(grid, consts, args)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel bound to the call's
    signature when it can be (see the module docstring)."""
    binding = _binding(kernel, args, kwargs)
    if binding is None:
        kernel[grid](*args, **kwargs)
    else:
        binding.launch(grid, args, kwargs)
