"""Native and PyTorch kernels behind one registry, each with a pure-PyTorch reference twin.

    registry.py       lookup(op, device), forced(...), register(...): which implementation runs
    reference.py      the twins: the kernels' arithmetic in PyTorch, bit for bit
    cpu_features.py   which C builds this CPU runs (portable, avx2, avxvnni, avx512vnni)
    cpu_native.py     builds, caches, self-tests and calls the C kernels (cpu/int8_cpu.c)

This package sits at the bottom of the import graph beside qmamba.models: it imports neither
qmamba.quant nor anything above it.
"""

from .registry import OPS, Kernel, entries, forced, lookup, reference_of, register, reset

__all__ = ["OPS", "Kernel", "entries", "forced", "lookup", "reference_of", "register", "reset"]
