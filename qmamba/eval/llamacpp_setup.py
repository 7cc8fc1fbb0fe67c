"""Build llama.cpp's own tools for `qmamba bench --against llama.cpp`, once, into the cache.

The pinned source is the llama-cpp-python sdist on PyPI (it vendors a llama.cpp tree): it is
fetched with `pip download --no-deps --no-binary :all:`, checked against the sha256 recorded here,
unpacked to $QMAMBA_CACHE/llama.cpp-<version>/src (default ~/.cache/qmamba), and
`llama-bench`, `llama-quantize` and `llama-batched-bench` are built there with cmake (`-DGGML_NATIVE=ON`, Release,
static, under `nice`). The converter (`convert_hf_to_gguf.py` of the same tree) runs in a venv of
its own, $QMAMBA_CACHE/venv-llamacpp, with this process's torch version pinned (a CPU wheel: pip
must not pull a CUDA build) and the `gguf` package of the same tree. Every step is skipped when
its output is already there; cmake comes from PATH or, failing that, from PyPI into that venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import QMambaError
from ..utils.io import atomic_write_json, sha256_file

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TOOLS = ("llama-bench", "llama-quantize", "llama-batched-bench")
# the converter's own requirements (requirements/requirements-convert_hf_to_gguf.txt) but torch,
# which is pinned to this process's version instead of the tree's
CONVERTER_REQUIREMENTS = ("numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6",
                          "protobuf>=4.21.0,<5.0.0", "safetensors")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_OPENSSL=OFF")
SETUP_COMMAND = "qmamba bench --against llama.cpp --llama-cpp-build"


def cache_root() -> Path:
    return Path(os.environ.get("QMAMBA_CACHE") or Path.home() / ".cache" / "qmamba")


def home() -> Path:
    """Where the pinned tree and its build live."""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def source_dir() -> Path:
    return home() / "src"


def bin_dir() -> Path:
    return home() / "build" / "bin"


def venv_dir() -> Path:
    return cache_root() / "venv-llamacpp"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def version_file() -> Path:
    return home() / "VERSION.json"


def ggml_version(src: Path) -> str:
    """ggml's version as its CMakeLists.txt sets it (GGML_VERSION_MAJOR/MINOR/PATCH)."""
    try:
        text = (src / "ggml" / "CMakeLists.txt").read_text()
    except OSError:
        return "unknown"
    parts = [re.search(rf"set\(GGML_VERSION_{k}\s+(\d+)\)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def _run(cmd: list, log: Path | None = None, **kw) -> None:
    print("  $ " + " ".join(map(str, cmd)), flush=True)
    if log is None:
        r = subprocess.run(list(map(str, cmd)), **kw)
    else:
        with open(log, "w") as f:
            r = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise QMambaError(f"{Path(str(cmd[0])).name} failed with exit status {r.returncode}{where}")


def _nice() -> list[str]:
    return ["nice", "-n", "10"] if shutil.which("nice") else []


def fetch_source() -> Path:
    """The pinned sdist, checked, unpacked to source_dir() (its vendor/llama.cpp)."""
    src = source_dir()
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp])
        got = sha256_file(tmp / SDIST)
        if got != SDIST_SHA256:
            raise QMambaError(f"{SDIST} has sha256 {got}, expected {SDIST_SHA256}: not the pinned source")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(tmp / SDIST) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp / "tree", members=[m for m in members if m.name], filter="data")
        os.replace(tmp / "tree", src)
    return src


def make_venv() -> Path:
    """The converter's venv: its requirements, torch pinned to ours, gguf from the same tree."""
    import torch

    py = venv_python()
    done = venv_dir() / ".qmamba-complete"
    if done.is_file():
        return py
    _run([sys.executable, "-m", "venv", venv_dir()])
    pip = [py, "-m", "pip", "install", "--quiet"]
    _run([*pip, f"torch=={torch.__version__}", *CONVERTER_REQUIREMENTS])
    _run([*pip, source_dir() / "gguf-py"])
    done.write_text(f"torch=={torch.__version__}\n")
    return py


def _cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    _run([venv_python(), "-m", "pip", "install", "--quiet", "cmake"])
    return str(venv_dir() / "bin" / "cmake")


def build_tools(jobs: int = 2) -> Path:
    """llama-bench, llama-quantize and llama-batched-bench in bin_dir(); skipped when all are there."""
    if all((bin_dir() / t).is_file() for t in TOOLS):
        return bin_dir()
    cmake, build = _cmake(), home() / "build"
    _run([*_nice(), cmake, "-S", source_dir(), "-B", build, *CMAKE_FLAGS], log=home() / "cmake-configure.log")
    _run([*_nice(), cmake, "--build", build, "--target", *TOOLS, f"-j{jobs}"], log=home() / "cmake-build.log")
    return bin_dir()


def setup(jobs: int = 2) -> dict:
    """Everything `--against llama.cpp` needs, each step skipped when done; returns what it made."""
    src = fetch_source()
    py = make_venv()
    bins = build_tools(jobs)
    info = {"llama_cpp_python_sdist": LLAMA_CPP_PYTHON, "sdist_sha256": SDIST_SHA256,
            "ggml_version": ggml_version(src), "source": str(src), "bin": str(bins),
            "converter_python": str(py), "cmake_flags": list(CMAKE_FLAGS)}
    atomic_write_json(version_file(), info)
    return info


def installed_info() -> dict:
    """VERSION.json of the cached build, if any."""
    try:
        return json.loads(version_file().read_text())
    except (OSError, ValueError):
        return {}
