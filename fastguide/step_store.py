"""Compiled steps kept between processes: a warm start that skips dynamo's trace as well as inductor's work.

Inductor's own caches (:mod:`fastguide.compile_cache`) spare a second process the code generation, but not
dynamo's trace of the step (5–9 s of a 12–16 s warm start of the embedded models on 2 cores). On the CPU
the step is therefore compiled ahead of time (``torch.compile(...).aot_compile``, experimental in torch
2.13), and the compiled function is saved under the compile cache folder, in ``fastguide-steps/``, named
by a key of everything that decides its graph (:func:`step_key`); the next process with the same key
loads it instead of tracing.

What the key holds: the versions of torch and Python, the machine and its CPU capability, the thread
count, inductor's and dynamo's configurations, fastguide's own source, the ``FASTGUIDE_*`` variables (but
``FASTGUIDE_STEP_STORE``), and
everything the step closes over (networks, policy, solver, ops, tables), walked object by object: types
with the hash of the source file that defines them, attribute values, the shapes, dtypes and strides of
tensors, and the values of every tensor that is not a parameter or an argument (the tables). Parameters
count by their metadata only: the networks' weights are inputs of the compiled graph, not constants, so the same
architecture with other weights loads the same step and computes with the live weights. Anything the walk
cannot name reproducibly (an object whose repr holds an address, a module with no source file) gives a
key of its own for this process, which is never found again: nothing is loaded rather than something
stale. A loaded step is used only if every module whose code dynamo traced into it (recorded with the step)
still has the same source, which covers code the key cannot name (a helper in another module than the
network's class), and it checks torch's own guards on the closure and the arguments at every call; where
either fails, the step is compiled as usual.

A stored step is a pickle of compiled code, loaded from the user's own cache folder (as inductor loads the
shared libraries it wrote there). ``FASTGUIDE_STEP_STORE=0`` turns the store off.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import logging
import os
import platform
import sys
import types
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from .compile_cache import use_user_cache
from .files import atomic_write

log = logging.getLogger(__name__)
ENV = "FASTGUIDE_STEP_STORE"
FOLDER = "fastguide-steps"
_PACKAGE = Path(__file__).resolve().parent
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
            torch.memory_format, enum.Enum)  # fmt: skip
_MAX_VALUE_ELEMENTS = 1 << 20  # a tensor that is not a parameter counts by its values up to this size


def enabled() -> bool:
    """Whether compiled steps are stored and loaded (``FASTGUIDE_STEP_STORE`` other than 0/false/no/off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def folder() -> Path:
    """``fastguide-steps/`` in the compile cache folder in use (:func:`fastguide.compile_cache.use_user_cache`)."""
    return Path(use_user_cache()) / FOLDER


@functools.cache
def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@functools.cache
def _package_hash() -> str:
    """fastguide's own source (this package and the kernels it loads): a global it reads is not guarded."""
    import fastguide.kernels as kernels

    h = hashlib.sha256()
    for root in (_PACKAGE, Path(kernels.__file__).resolve().parent):
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(_file_hash(str(path)).encode())
    return h.hexdigest()


_PROCESS_ONLY = uuid.uuid4().hex  # in a key: found by no other process


@functools.cache
def _module_hash(name: str) -> str:
    """What identifies the code of module ``name``: torch's and the standard library's by version, others by
    the hash of their file (a module with no file: this process only)."""
    top = name.partition(".")[0]
    if top == "torch":
        return f"torch {torch.__version__}"
    if top in sys.stdlib_module_names or top == "builtins":
        return f"python {sys.version}"
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if not path or not os.path.isfile(path):
        return _PROCESS_ONLY
    return _file_hash(path)


def _type_token(cls: type) -> str:
    return "|".join(f"{k.__module__}.{k.__qualname__}@{_module_hash(k.__module__)}" for k in cls.__mro__)


class _Walk:
    """Feeds a stable description of an object graph into a hash (see the module's docstring)."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.keep: list[object] = []  # ids stay unique while the walk runs

    def put(self, *tokens) -> None:
        self.h.update(repr(tokens).encode())
        self.h.update(b"\0")

    def tensor(self, t: torch.Tensor, parameter: bool) -> None:
        self.put("tensor", type(t).__name__, tuple(t.shape), t.dtype, t.device, t.requires_grad,
                 tuple(t.stride()) if t.layout == torch.strided else None, parameter)  # fmt: skip
        if not parameter:
            if t.numel() > _MAX_VALUE_ELEMENTS or t.layout != torch.strided:
                self.put(_PROCESS_ONLY)
            else:
                self.h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype's bytes

    def __call__(self, obj, parameter: bool = False) -> None:
        if isinstance(obj, _SCALARS):
            self.put(type(obj).__qualname__, obj)
            return
        if id(obj) in self.seen:
            self.put("seen", self.seen[id(obj)])
            return
        self.seen[id(obj)] = len(self.seen)
        self.keep.append(obj)
        if isinstance(obj, torch.Tensor):
            self.tensor(obj, parameter or isinstance(obj, torch.nn.Parameter))
        elif isinstance(obj, torch.nn.Module):
            self.put("module", _type_token(type(obj)))
            for name, value in vars(obj).items():
                self.put(name)
                self(value, parameter=name == "_parameters")
        elif isinstance(obj, (list, tuple)):
            self.put(type(obj).__name__ if type(obj) in (list, tuple) else _type_token(type(obj)), len(obj))
            for value in obj:
                self(value, parameter)
        elif isinstance(obj, dict):
            self.put(type(obj).__name__ if type(obj) is dict else _type_token(type(obj)), len(obj))
            for key, value in obj.items():
                self(key)
                self(value, parameter)
        elif isinstance(obj, (set, frozenset)):
            self.put(type(obj).__name__, sorted(repr(v) for v in obj))
        elif isinstance(obj, type):
            self.put("type", _type_token(obj))
        elif isinstance(obj, types.FunctionType):
            self.put("function", obj.__module__, obj.__qualname__, _module_hash(obj.__module__ or ""),
                     obj.__code__.co_code, repr(obj.__code__.co_consts))  # fmt: skip
            self(obj.__defaults__)
            self(obj.__kwdefaults__)
            self(tuple(c.cell_contents if _filled(c) else "<empty cell>" for c in obj.__closure__ or ()))
        elif isinstance(obj, types.MethodType):
            self.put("method")
            self(obj.__func__)
            self(obj.__self__)
        elif isinstance(obj, functools.partial):
            self.put("partial")
            self((obj.func, obj.args, obj.keywords))
        elif isinstance(obj, types.ModuleType):
            self.put("module-object", obj.__name__, _module_hash(obj.__name__))
        elif isinstance(obj, (types.BuiltinFunctionType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            self.put("builtin", getattr(obj, "__module__", None), getattr(obj, "__qualname__", None), repr(obj))
        elif hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
            self.put("object", _type_token(type(obj)))
            state = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
            for klass in type(obj).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        state[slot] = getattr(obj, slot)
            self(state)
        else:
            text = repr(obj)
            self.put("other", _type_token(type(obj)), _PROCESS_ONLY if " at 0x" in text else text)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _settings(config) -> list:
    """A config module's plain settings, sorted (dynamo's own hash differs between processes)."""
    plain = (bool, int, float, str, type(None))
    return sorted((name, value if isinstance(value, plain) else sorted(map(repr, value)))
                  for name, value in config.get_config_copy().items()
                  if isinstance(value, plain) or isinstance(value, (list, tuple, set, frozenset)))  # fmt: skip


def step_key(step: Callable, args: tuple) -> str:
    """The name of ``step``'s compiled function called with ``args`` (see the module's docstring)."""
    walk = _Walk()
    walk.put(torch.__version__, sys.version, platform.machine(), torch.backends.cpu.get_cpu_capability(),
             torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled(),
             torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.enabled,
             torch._inductor.config.get_hash(), _settings(torch._dynamo.config), _package_hash(),
             sorted((k, v) for k, v in os.environ.items() if k.startswith("FASTGUIDE_") and k != ENV))  # fmt: skip
    walk(step)
    walk(args, parameter=True)  # the arguments' values change at every call: their metadata only
    return walk.h.hexdigest()[:40]


def sources_unchanged(compiled) -> bool:
    """Whether every module whose code dynamo traced into ``compiled`` still has the source it had then (the
    whole module's, so its constants count too). This covers code the key does not name: a helper in another
    module than the network's class, say. A module that is not imported, or has no source, fails."""
    for source in compiled.source_info().inlined_sources:
        module = sys.modules.get(source.module)
        try:
            if module is None or inspect.getsource(module) != source.content:
                return False
        except (OSError, TypeError):
            return False
    return True


class StoredStep:
    """A step compiled ahead of time and loaded or saved under :func:`folder`; ``fallback`` (the step's
    ordinary ``torch.compile``) runs instead, from then on, if the stored function's guards refuse a call."""

    def __init__(self, compiled, fallback: Callable, source: str):
        self.compiled, self.fallback, self.source = compiled, fallback, source  # source: "loaded" or "saved"
        compiled.disable_guard_check()  # checked here, so that a refusal falls back instead of raising

    def __call__(self, *args):
        if self.compiled is not None and not self.compiled.guard_check(*args):
            self.compiled = None
        if self.compiled is None:
            return self.fallback(*args)
        return self.compiled(*args)


def stored_or_compiled(step: Callable, lazy, args: tuple, external: dict[str, object]) -> Callable:
    """``step`` (compiled as ``lazy``, a ``torch.compile`` of it) for ``args``: loaded from the store, else
    compiled ahead of time and saved there; ``lazy`` itself where the store is off or cannot serve (the
    lazy compilation then raises what compiling raises). ``external``: every object the step closes over
    (kept by reference, never pickled: the live networks are the ones used)."""
    if not enabled() or torch._inductor.config.force_disable_caches:
        return lazy
    try:
        key = step_key(step, args)
        path = folder() / f"{key}.bin"
    except Exception:  # noqa: BLE001 - an object the walk cannot read: no store for this step
        return lazy
    if path.is_file():
        try:
            with open(path, "rb") as f:
                loaded = torch.compiler.load_compiled_function(f, f_globals=step.__globals__, external_data=external)
            if sources_unchanged(loaded) and loaded.guard_check(*args):
                return StoredStep(loaded, lazy, "loaded")
        except Exception as err:  # noqa: BLE001 - a file of another torch, cut short, ...: compiled again, replaced
            log.info("the stored step %s was not loaded: %s", path, err)
    try:
        compiled = lazy.aot_compile((args, {}))
    except Exception as err:  # noqa: BLE001 - what cannot be compiled ahead of time compiles as usual (or says why)
        log.info("the step was not compiled ahead of time: %s", err)
        return lazy
    try:
        data = type(compiled).serialize(compiled, external).serialized_data
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    except Exception as err:  # noqa: BLE001 - not saved (an object not serializable, a full disk): used all the same
        log.info("the compiled step was not stored: %s", err, exc_info=True)
    return StoredStep(compiled, lazy, "saved")
