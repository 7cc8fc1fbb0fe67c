"""Which builds of the C kernels this CPU can run, read at run time (never the compiler host's
view): the instruction-set flags of /proc/cpuinfo (the kernel lists only what the OS has
enabled), capped by PyTorch's own CPU capability (`ATEN_CPU_CAPABILITY=default` makes the CPU
look like one without AVX2, `=avx2` like one without AVX-512), and by `QMAMBA_CPU_ISA`, which
forces a lower path and refuses, with one line, a path the CPU lacks.

The builds, lowest first (`ISAS`):
    portable     plain C, no intrinsics: any CPU, any architecture
    avx2         AVX2 + FMA + F16C: vpmaddubsw int8 dot products
    avxvnni      AVX-VNNI (256-bit vpdpbusd, VEX), with AVX2 + FMA + F16C
    avx512vnni   AVX-512 F/BW/VL + VNNI (512-bit vpdpbusd), with AVX2 + FMA + F16C
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch

from ..errors import QMambaError

ISAS = ("portable", "avx2", "avxvnni", "avx512vnni")
ENV = "QMAMBA_CPU_ISA"
_AVX2 = ("avx2", "fma", "f16c")
FEATURES = {                                   # /proc/cpuinfo flags each build needs
    "portable": (),
    "avx2": _AVX2,
    "avxvnni": (*_AVX2, "avx_vnni"),
    "avx512vnni": (*_AVX2, "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
}
_TORCH_CAP = {"DEFAULT": "portable", "AVX2": "avxvnni", "AVX512": "avx512vnni"}   # highest build allowed


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's instruction-set flags as Linux reports them (empty elsewhere: portable only)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable() -> tuple[str, ...]:
    """The builds this CPU runs, lowest first, as capped by PyTorch's CPU capability."""
    if not is_x86():
        return ("portable",)
    cap = _TORCH_CAP.get(torch.backends.cpu.get_cpu_capability().upper(), "portable")
    flags = cpu_flags()
    return tuple(isa for isa in ISAS[:ISAS.index(cap) + 1] if all(f in flags for f in FEATURES[isa]))


def why_not(isa: str) -> Optional[str]:
    """Why this CPU (as PyTorch lets us see it) cannot run `isa`; None if it can."""
    if isa != "portable" and not is_x86():
        return f"not an x86-64 CPU ({platform.machine()})"
    lacking = [f for f in FEATURES[isa] if f not in cpu_flags()]
    if lacking:
        return f"the CPU lacks {', '.join(lacking)}"
    if isa not in runnable():
        return f"PyTorch's CPU capability is {torch.backends.cpu.get_cpu_capability()}"
    return None


def check(isa: str, source: str = ENV) -> str:
    """`isa` if it names a build this CPU runs; otherwise a one-line QMambaError."""
    if isa not in ISAS:
        raise QMambaError(f"{source}={isa}: expected one of {', '.join(ISAS)}")
    why = why_not(isa)
    if why:
        raise QMambaError(f"{source}={isa}: not available here ({why}); this machine runs: "
                          f"{', '.join(runnable())}")
    return isa


def ceiling(forced: Optional[str] = None) -> str:
    """The highest build to use: `forced` (a test's choice), else $QMAMBA_CPU_ISA, else the best
    this CPU runs."""
    wanted = forced or os.environ.get(ENV, "").strip().lower()
    if wanted:
        return check(wanted, ENV if forced is None else "forced ISA")
    return runnable()[-1]


def candidates(forced: Optional[str] = None) -> tuple[str, ...]:
    """The builds to try, best first, up to the ceiling."""
    top = ISAS.index(ceiling(forced))
    return tuple(isa for isa in reversed(runnable()) if ISAS.index(isa) <= top)
