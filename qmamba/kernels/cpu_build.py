"""Building the C kernels of `cpu/int8_cpu.c`: one shared object per instruction set
(`ISA_FLAGS`), compiled with the system C compiler (`$CC`, else gcc, else cc) into a cache folder
($QMAMBA_CACHE/kernels, default ~/.cache/qmamba/kernels) under a name that holds the build, the
hash of the source, the flags and the machine type. A cached library is used only if it passes
the caller's check (binding and self-test, `qmamba.kernels.cpu_native`); otherwise it is rebuilt
into a temporary file, checked, then renamed over the cached name, so concurrent processes never
see half a file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from . import cpu_features

log = logging.getLogger("qmamba")

SOURCE = Path(__file__).with_name("cpu") / "int8_cpu.c"
# -ffp-contract=off: no fused multiply-adds the source does not write (dsq_scan rounds like eager)
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]
_X86 = ["-mavx2", "-mfma", "-mf16c"]
ISA_FLAGS = {
    "portable": ["-DQM_ISA_PORTABLE"],
    "avx2": ["-DQM_ISA_AVX2", *_X86],
    "avxvnni": ["-DQM_ISA_AVXVNNI", *_X86, "-mavxvnni"],
    "avx512vnni": ["-DQM_ISA_AVX512VNNI", *_X86, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
}
STALE_BUILD_S = 3600                    # temporary build files older than this are left-overs of a killed build


def cache_dir() -> Path:
    return Path(os.environ.get("QMAMBA_CACHE") or Path.home() / ".cache" / "qmamba") / "kernels"


def flags(isa: str) -> list[str]:
    return [*ISA_FLAGS[isa], *FLAGS]


def cache_path(isa: Optional[str] = None) -> Path:
    """Where the compiled library of this source, this build's flags and this machine type is
    cached (`isa` None: the build the kernels would use first)."""
    isa = isa or cpu_features.candidates()[0]
    key = SOURCE.read_bytes() + " ".join(flags(isa)).encode() + platform.machine().encode()
    return cache_dir() / f"int8_cpu-{isa}-{hashlib.sha256(key).hexdigest()[:16]}.so"


def build_command(cc: str, isa: str, out, extra=()) -> list[str]:
    return [cc, *flags(isa), *extra, str(SOURCE), "-o", str(out)]


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    return cc


def build_dir(out: Path) -> Path:
    """The cache folder, or a private temporary one where the cache cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if os.access(out.parent, os.W_OK):
            for old in out.parent.glob(".int8_cpu-build-*"):   # a killed build's left-overs
                try:
                    if time.time() - old.stat().st_mtime > STALE_BUILD_S:
                        old.unlink()
                except OSError:
                    pass
            return out.parent
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="qmamba-kernels-"))


def compile_and_check(out: Path, isa: str, check: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL:
    """Compile into a temporary file next to `out`, load and self-test it (`check`), then rename it to
    `out` (atomic: a concurrent reader or builder sees the old file or the new one, whole). The
    library is loaded from its temporary name: dlopen of a name already loaded in this process
    (a bad cached file) would return the old library."""
    cc = compiler()
    folder = build_dir(out)
    fd, tmp = tempfile.mkstemp(prefix=".int8_cpu-build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        try:
            r = subprocess.run(build_command(cc, isa, tmp), capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the C compiler {cc!r} ran for more than 10 minutes") from None
        except OSError as e:
            raise RuntimeError(f"cannot run the C compiler {cc!r}: {e.strerror or e}") from None
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"compiling {SOURCE.name} ({isa}) with {cc} failed: {last[-200:]}")
        lib = check(Path(tmp))
        if folder == out.parent:
            os.replace(tmp, out)
        return lib
    finally:                            # (a loaded library stays mapped once its file is gone)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if folder != out.parent:
            shutil.rmtree(folder, ignore_errors=True)


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def verified(isa: str, check: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL:
    """The verified library of one build: the cached one if it loads and passes `check` (bind and
    self-test), else rebuilt."""
    out = cache_path(isa)
    if out.exists():
        try:
            return check(out)
        except Exception as e:          # garbage, a missing symbol, wrong numbers: rebuild it
            bad = one_line(e).replace(f"{out}: ", "")
        try:
            lib = compile_and_check(out, isa, check)
        except Exception as e:
            raise RuntimeError(f"the cached {out} is unusable ({bad}) and rebuilding it failed "
                               f"({one_line(e)})") from None
        log.warning("qmamba: the cached C kernel %s was unusable (%s); rebuilt it", out, bad)
        return lib
    return compile_and_check(out, isa, check)
