"""llama.cpp beside qmamba: find its tools, make GGUF files of a model folder with llama.cpp's own
converter and quantizer (cached by the folder's content), run `llama-bench` and read its JSON.

Where the tools are, first found wins: `--llama-bench PATH`, $QMAMBA_LLAMA_BENCH, the build that
`qmamba bench --against llama.cpp --llama-cpp-build` makes in the cache (`llamacpp_setup`).
`llama-quantize` is looked for beside `llama-bench`; `convert_hf_to_gguf.py` in the tree the
binary was built from (bin/../.., bin/../../src), $QMAMBA_LLAMA_CPP_SRC, or the cached tree; the
converter's Python is $QMAMBA_LLAMA_CPP_PYTHON or the cached venv.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Optional

from ..errors import QMambaError
from ..utils.io import atomic_write_text
from . import llamacpp_setup as setup

QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q6_k")
CONVERTER_TYPES = ("f32", "f16", "bf16")      # written by convert_hf_to_gguf.py; the rest by llama-quantize
GGUF_KEY_VERSION = 1          # bump when what goes into a cached GGUF changes


@dataclasses.dataclass(frozen=True)
class Tools:
    bench: Path
    quantize: Path
    converter: Path           # convert_hf_to_gguf.py
    python: Path              # the interpreter that runs it

    def describe(self) -> dict:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find_tools(llama_bench: Optional[str] = None, env: Optional[dict] = None) -> Tools:
    """The four things a comparison runs, or a one-line error naming the setup command."""
    env = os.environ if env is None else env
    hint = f"; build it with `{setup.SETUP_COMMAND}` or pass --llama-bench PATH"
    given = llama_bench or env.get("QMAMBA_LLAMA_BENCH")
    if given:
        bench = Path(given).expanduser()
        if bench.is_dir():
            bench = bench / "llama-bench"
        if not _executable(bench):
            raise QMambaError(f"llama-bench not found at {bench} (--llama-bench / $QMAMBA_LLAMA_BENCH)")
    else:
        bench = setup.bin_dir() / "llama-bench"
        if not _executable(bench):
            raise QMambaError(f"llama.cpp is not built here (no {bench})" + hint)
    quantize = bench.parent / "llama-quantize"
    if not _executable(quantize):
        raise QMambaError(f"llama-quantize not found beside {bench}" + hint)
    trees = [bench.parent.parent.parent, bench.parent.parent.parent / "src"]
    if env.get("QMAMBA_LLAMA_CPP_SRC"):
        trees.insert(0, Path(env["QMAMBA_LLAMA_CPP_SRC"]).expanduser())
    trees.append(setup.source_dir())
    converter = next((t / "convert_hf_to_gguf.py" for t in trees if (t / "convert_hf_to_gguf.py").is_file()), None)
    if converter is None:
        raise QMambaError("llama.cpp's convert_hf_to_gguf.py not found (set $QMAMBA_LLAMA_CPP_SRC to its tree)" + hint)
    python = Path(env.get("QMAMBA_LLAMA_CPP_PYTHON") or setup.venv_python())
    if not _executable(python):
        raise QMambaError(f"the converter's Python {python} is missing (set $QMAMBA_LLAMA_CPP_PYTHON)" + hint)
    return Tools(bench, quantize, converter, python)


def parse_types(spec: str) -> list[str]:
    types = [t.strip().lower() for t in spec.split(",") if t.strip()]
    bad = [t for t in types if t not in QUANT_TYPES]
    if not types or bad:
        raise QMambaError(f"--llama-types: unknown type(s) {', '.join(bad) or repr(spec)}; "
                          f"choose from {', '.join(QUANT_TYPES)}")
    return list(dict.fromkeys(types))


# ------------------------------------------------------------------------------- the GGUF cache
def folder_key(folder: Path, converter: Optional[Path] = None) -> str:
    """What a GGUF of `folder` depends on: every file's name and bytes (config, weights, tokenizer),
    and the converter script's bytes. Equal content in another place gives the same key."""
    h = hashlib.sha256(f"qmamba-gguf-{GGUF_KEY_VERSION}\0".encode())
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise QMambaError(f"{folder} has no files to convert")
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    if converter is not None:
        h.update(b"\0converter\0" + Path(converter).read_bytes())
    return h.hexdigest()[:20]


def gguf_dir(key: str) -> Path:
    return setup.cache_root() / "gguf" / key


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _run(cmd: list, what: str, cwd: Optional[Path] = None) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise QMambaError(f"{what} failed (exit status {r.returncode}): {last}")
    return r.stdout


def make_ggufs(folder: Path, types: list[str], tools: Tools, key: Optional[str] = None, log=print) -> tuple[dict, list]:
    """{type: GGUF path} for `folder`, made once per folder content: the converter writes f32
    (or the type itself when it can), llama-quantize makes the rest from the f32 file. Returns the
    paths and the commands that make them, each with whether this call ran it (False: cached).
    `key` names the cache entry (default: `folder_key` of `folder`)."""
    key = key or folder_key(folder, tools.converter)
    out = gguf_dir(key)
    out.mkdir(parents=True, exist_ok=True)
    paths, commands, seen = {}, [], set()

    def produce(path: Path, cmd: list, what: str) -> None:
        if path in seen:
            return
        seen.add(path)
        commands.append(([str(c) for c in cmd], not path.is_file()))
        if path.is_file():
            return
        tmp = _tmp(path)
        log(f"  {what} -> {path}")
        try:
            _run([tmp if c is path else c for c in cmd], what, cwd=tools.converter.parent)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    f32 = out / "model-f32.gguf"
    for t in types:
        path = out / f"model-{t}.gguf"
        if t in CONVERTER_TYPES:
            produce(path, [tools.python, tools.converter, folder, "--outtype", t, "--outfile", path],
                    f"convert_hf_to_gguf.py --outtype {t}")
        else:
            produce(f32, [tools.python, tools.converter, folder, "--outtype", "f32", "--outfile", f32],
                    "convert_hf_to_gguf.py --outtype f32")
            produce(path, [tools.quantize, f32, path, t.upper()], f"llama-quantize {t.upper()}")
        paths[t] = path
    atomic_write_text(out / "source.json", json.dumps({"folder": str(folder), "key": key}) + "\n")
    return paths, commands


# ------------------------------------------------------------------------------- llama-bench
def bench_command(tools: Tools, ggufs: list[Path], prompt_len: int, gen_len: int, threads: int,
                  reps: int) -> list[str]:
    cmd = [str(tools.bench)]
    for g in ggufs:
        cmd += ["-m", str(g)]
    return cmd + ["-p", str(prompt_len), "-n", str(gen_len), "-t", str(threads), "-r", str(reps), "-o", "json"]


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench's `-o json` output: one row per (model, test), with tokens/s as the median of
    its repetitions. A prompt test (n_prompt > 0, n_gen 0) is "pp<N>", a generation test "tg<N>"."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise QMambaError(f"llama-bench printed no JSON: {e}") from None
    if not isinstance(raw, list):
        raise QMambaError("llama-bench's JSON is not a list of tests")
    rows = []
    for t in raw:
        try:
            samples = [float(x) for x in t["samples_ts"]]
            n_prompt, n_gen = int(t["n_prompt"]), int(t["n_gen"])
            row = {"model_filename": t["model_filename"], "model_type": t["model_type"],
                   "model_size": int(t["model_size"]), "model_n_params": int(t["model_n_params"]),
                   "n_threads": int(t["n_threads"]), "n_prompt": n_prompt, "n_gen": n_gen,
                   "test": f"pp{n_prompt}" if n_gen == 0 else (f"tg{n_gen}" if n_prompt == 0
                                                               else f"pp{n_prompt}+tg{n_gen}"),
                   "samples_ts": samples, "avg_ts": float(t["avg_ts"]),
                   "build_commit": t.get("build_commit"), "build_number": t.get("build_number"),
                   "cpu_info": t.get("cpu_info"), "backends": t.get("backends")}
        except (KeyError, TypeError, ValueError) as e:
            raise QMambaError(f"llama-bench's JSON lacks a field it should have: {e}") from None
        if not samples:
            raise QMambaError(f"llama-bench reported no samples for {row['test']}")
        row["tokens_per_second"] = statistics.median(samples)
        rows.append(row)
    return rows


def run_bench(tools: Tools, ggufs: dict, prompt_len: int, gen_len: int, threads: int, reps: int) -> tuple:
    """One llama-bench run over every GGUF: (command, {type: {"prefill": tok/s, "decode": tok/s,
    "rows": [...]}})."""
    types = list(ggufs)
    cmd = bench_command(tools, [ggufs[t] for t in types], prompt_len, gen_len, threads, reps)
    rows = parse_llama_bench(_run(cmd, "llama-bench"))
    by_file = {Path(g).name: t for t, g in ggufs.items()}
    out = {t: {"rows": []} for t in types}
    for r in rows:
        t = by_file.get(Path(r["model_filename"]).name)
        if t is None:
            raise QMambaError(f"llama-bench reported a model it was not given: {r['model_filename']}")
        out[t]["rows"].append(r)
        if r["n_gen"] == 0:
            out[t]["prefill"] = r["tokens_per_second"]
        elif r["n_prompt"] == 0:
            out[t]["decode"] = r["tokens_per_second"]
            out[t]["model_size"] = r["model_size"]
    missing = [t for t in types if "prefill" not in out[t] or "decode" not in out[t]]
    if missing:
        raise QMambaError(f"llama-bench gave no pp/tg result for {', '.join(missing)}")
    return cmd, out


def version_info(tools: Tools) -> dict:
    info = dict(setup.installed_info()) if tools.bench.parent == setup.bin_dir() else {}
    try:
        r = subprocess.run([str(tools.bench), "--version"], capture_output=True, text=True, timeout=30)
        info["llama_bench_version"] = (r.stdout + r.stderr).strip().splitlines()[-1:] or None
    except (OSError, subprocess.TimeoutExpired):
        info["llama_bench_version"] = None
    info["ggml_version_of_tree"] = setup.ggml_version(tools.converter.parent)
    info["tools"] = tools.describe()
    return info
