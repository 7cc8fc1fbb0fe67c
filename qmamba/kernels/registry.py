"""One registry for the fast kernels: each registered by operation name, device type and the CPU
features it needs, with its pure-PyTorch reference twin (`qmamba.kernels.reference`).

    k = lookup("i8_linear_quantizing", "cpu")     # the best implementation available here
    y = k(x, static, codes, w_scale, group_size, bias) if k else <the caller's torch path>

`lookup` returns None where no fast implementation runs (no compiler, another device, switched
off): the caller then takes its own PyTorch path. Which one is used:

  - `QMAMBA_NO_CPU_KERNELS=1` (environment): none, the PyTorch paths everywhere;
  - `QMAMBA_CPU_ISA=portable|avx2|avxvnni|avx512vnni` (environment): at most that build of the
    C kernels (one the CPU lacks is refused with one line);
  - `forced("torch")` / `forced("avx2")` (a context manager, for tests and benchmarks): the same
    two choices within a `with` block, optionally for some operations only
    (`forced("torch", ops=("dsq_scan",))`).

To add a kernel: write it (C entry point in cpu/int8_cpu.c and a `NativeKernels` method, or a
Python function), write its twin in reference.py, and `register(...)` both below; the pairing
test picks up every entry by itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from . import cpu_features, cpu_native, reference

OPS = ("i8_linear", "i8_linear_quantizing", "f32i8_linear", "exp_f32", "dsq_scan", "mamba2_conv_step",
       "mamba2_ssm_step", "mamba2_model_step")


@dataclass(frozen=True)
class Entry:
    """One registered implementation. `load()` returns the callable, or None where it cannot run
    (it may build, load and self-test a library on its first call)."""
    op: str
    device: str
    impl: str                           # "avx512vnni", "avx2", ... for the C builds
    features: tuple[str, ...]           # CPU flags it needs (/proc/cpuinfo names)
    priority: int                       # the highest available wins
    load: Callable[[], Optional[Callable]]
    reference: Callable                 # the pure-PyTorch twin, same arguments, same bits


@dataclass(frozen=True)
class Kernel:
    """What `lookup` returns: call it like the operation."""
    op: str
    device: str
    impl: str
    fn: Callable
    reference: Callable

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_entries: list[Entry] = []
_forced: list[tuple[str, Optional[frozenset]]] = []     # (what, ops or None = all), innermost last
_cache: dict[tuple[str, str], Optional[Kernel]] = {}


def register(op: str, device: str, impl: str, *, features: tuple[str, ...] = (), priority: int = 0,
             load: Callable[[], Optional[Callable]], reference: Callable) -> Entry:
    if any(e.op == op and e.device == device and e.impl == impl for e in _entries):
        raise ValueError(f"kernel {op}/{device}/{impl} is registered already")
    entry = Entry(op, device, impl, tuple(features), priority, load, reference)
    _entries.append(entry)
    _cache.clear()
    return entry


def entries(op: Optional[str] = None, device: Optional[str] = None) -> list[Entry]:
    """The registered implementations, best first."""
    return sorted((e for e in _entries if (op is None or e.op == op) and (device is None or e.device == device)),
                  key=lambda e: -e.priority)


def reference_of(op: str) -> Callable:
    """The pure-PyTorch twin of an operation."""
    for e in _entries:
        if e.op == op:
            return e.reference
    raise KeyError(f"no kernel registered for {op!r} (known: {', '.join(OPS)})")


def _forced_for(op: str) -> Optional[str]:
    for what, ops in reversed(_forced):
        if ops is None or op in ops:
            return what
    return None


def lookup(op: str, device: str) -> Optional[Kernel]:
    """The best implementation of `op` available on `device` now, or None (use the PyTorch path)."""
    key = (op, device)
    if key in _cache:
        return _cache[key]
    forced = _forced_for(op)
    found = None
    if forced != "torch":
        if device == "cpu":                 # the C builds: the best that loads, up to the ceiling
            best = cpu_native.select(forced)
            if best is not None:
                found = next((e for e in entries(op, device) if e.impl == best.isa), None)
        else:
            found = next((e for e in entries(op, device)), None)
    kernel = None
    if found is not None:
        fn = found.load()
        kernel = None if fn is None else Kernel(op, device, found.impl, fn, found.reference)
    _cache[key] = kernel
    return kernel


def available_impls(op: str, device: str = "cpu") -> list[str]:
    """Every implementation of `op` that runs here (each C build this CPU has that loads)."""
    return [e.impl for e in entries(op, device) if e.load() is not None]


@contextlib.contextmanager
def forced(what: str, ops: Optional[tuple[str, ...]] = None) -> Iterator[None]:
    """Within the block, `lookup` returns None for `what` = "torch" (the callers' PyTorch paths),
    or at most the C build `what` ("portable", "avx2", ...; refused if the CPU lacks it; it takes
    precedence over $QMAMBA_CPU_ISA); `ops` limits it to some operations; the innermost wins."""
    if what != "torch":
        cpu_features.check(what, "forced ISA")
    unknown = set(ops or ()) - set(OPS)
    if unknown:
        raise ValueError(f"unknown kernel operations {sorted(unknown)} (known: {', '.join(OPS)})")
    _forced.append((what, None if ops is None else frozenset(ops)))
    _cache.clear()
    try:
        yield
    finally:
        _forced.pop()
        _cache.clear()


def reset() -> None:
    """Forget what was looked up and loaded, as in a new process (tests that change the
    environment)."""
    _cache.clear()
    cpu_native.reset()


def _native_loader(isa: str, method: str) -> Callable[[], Optional[Callable]]:
    def load():
        k = cpu_native.native(isa)
        return None if k is None else getattr(k, method)
    return load


for _rank, _isa in enumerate(cpu_features.ISAS):
    for _op, _method in (("i8_linear", "i8_linear"), ("i8_linear_quantizing", "i8_linear_quantizing"),
                         ("f32i8_linear", "f32i8_linear"), ("exp_f32", "exp_f32"), ("dsq_scan", "dsq_scan"),
                         ("mamba2_conv_step", "mamba2_conv_step"), ("mamba2_ssm_step", "mamba2_ssm_step"),
                         ("mamba2_model_step", "mamba2_model_step")):
        register(_op, "cpu", _isa, features=cpu_features.FEATURES[_isa], priority=10 + _rank,
                 load=_native_loader(_isa, _method), reference=getattr(reference, _op))
