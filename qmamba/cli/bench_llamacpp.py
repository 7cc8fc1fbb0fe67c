"""`qmamba bench MODEL --against llama.cpp`: llama.cpp's `llama-bench` and qmamba's own bench on
the same model folder, prompt length, generation length and thread counts, batch 1, in
alternating rounds (each round runs both sides for every thread count; odd rounds put llama.cpp
first, even rounds qmamba), medians over rounds; one table and one JSON with both sides.

MODEL is a float model folder (or a name that resolves to one) or a plain Mamba/Mamba2 shape
(mamba2-130m, ...): a shape is written once as a random-weight transformers folder without a
tokenizer, which llama.cpp's converter gives its built-in GPT-NeoX vocabulary (as it does for the
state-spaces checkpoints, which ship no tokenizer). A folder's tokenizer files are left out of the
copy the converter reads, for the same reason (its pre-tokenizer check knows only published
tokenizers; llama-bench feeds token ids, so the vocabulary's text does not change a timing).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import time
from pathlib import Path

from ..errors import QMambaError
from ..utils.io import atomic_write_json, check_output
from .bench_child import child_command, fill_defaults, run_child
from .common import positive_ints

VARIANTS = ("fp32", "quant")                # qmamba's side: the float model and the quantized one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
SCHEMA = "qmamba-bench-against-llama.cpp/1"


def check(args):
    """Every argument and the llama.cpp tools, before any long work: (tools, types)."""
    from ..eval import llamacpp
    from ..quant.config import QuantConfig

    if args.against is None:
        raise QMambaError("--llama-cpp-build goes with --against llama.cpp")
    fill_defaults(args)
    if positive_ints(args.batch, "--batch") != [1]:
        raise QMambaError("--against llama.cpp measures batch 1 (llama-bench runs one sequence)")
    for name in ("prompt_len", "gen_len", "reps", "rounds"):
        if getattr(args, name) <= 0:
            raise QMambaError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.device != "cpu":
        raise QMambaError("--against llama.cpp runs on the CPU (--device cpu)")
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if bad:
        raise QMambaError(f"--variants with --against: choose from {', '.join(VARIANTS)}, got {', '.join(bad)}")
    QuantConfig.parse(args.quant)
    types = llamacpp.parse_types(args.llama_types)
    if args.json is not None:
        check_output(args.json, "--json")
    tools = llamacpp.find_tools(args.llama_bench)
    return tools, types


def model_folder(model: str) -> tuple[Path, str]:
    """The float folder both sides run, and how it was made."""
    from ..eval import llamacpp_setup
    from ..eval.bench import shape_folder
    from ..models.shapes import HYBRID_SHAPES, SHAPES

    if model in SHAPES:
        if model in HYBRID_SHAPES:
            raise QMambaError(f"--against llama.cpp: {model} is a hybrid shape; give a plain Mamba/Mamba2 shape")
        return shape_folder(model, llamacpp_setup.cache_root() / "bench-models"), f"{model} shape, random weights"
    from ..api import resolve_model_path
    from ..models.load import read_config

    folder = Path(resolve_model_path(model)).resolve()
    if "quantization_config" in read_config(folder):
        raise QMambaError(f"{model} is a quantized qmamba folder; --against llama.cpp needs the float folder")
    return folder, str(folder)


def converter_view(folder: Path, root: Path) -> Path:
    """`folder` without its tokenizer files (links to the rest), under `root`, for the converter."""
    if not any((folder / n).exists() for n in TOKENIZER_FILES):
        return folder
    view = root / "view"
    view.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.name not in TOKENIZER_FILES and not p.name.startswith(".") and not (view / p.name).exists():
            (view / p.name).symlink_to(p.resolve())
    return view


def command_line(args) -> str:
    """The command that reruns this comparison, every option spelled out."""
    cmd = ["qmamba", "bench", args.model, "--quant", args.quant, "--method", args.method, "--against", "llama.cpp",
           "--llama-types", ",".join(llamacpp_types(args)), "--threads", ",".join(map(str, args.thread_list)),
           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--reps", str(args.reps),
           "--rounds", str(args.rounds)]
    if args.variants:
        cmd += ["--variants", args.variants]
    if args.llama_bench:
        cmd += ["--llama-bench", args.llama_bench]
    if args.json:
        cmd += ["--json", str(args.json)]
    return shlex.join(cmd)


def llamacpp_types(args) -> list[str]:
    from ..eval import llamacpp

    return llamacpp.parse_types(args.llama_types)


def machine() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "cpu_model": None, "cpu_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    f = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    info["cpu_model"] = m.group(1).strip() if m else None
    simd = re.compile(r"^(sse|ssse|avx|fma|f16c|amx|vnni|avx512)")
    info["cpu_flags"] = sorted(x for x in (f.group(1).split() if f else []) if simd.match(x))
    return info


def summarize(rounds: list[dict]) -> list[dict]:
    """Medians over rounds for each (threads, side, variant), with every round's figures."""
    keys = list(dict.fromkeys((r["threads"], r["side"], r["variant"]) for r in rounds))
    out = []
    for t, side, variant in keys:
        mine = [r for r in rounds if (r["threads"], r["side"], r["variant"]) == (t, side, variant)]
        out.append({"threads": t, "side": side, "variant": variant, "rounds": len(mine),
                    "prefill_tokens_per_second": statistics.median(r["prefill_tokens_per_second"] for r in mine),
                    "decode_tokens_per_second": statistics.median(r["decode_tokens_per_second"] for r in mine),
                    "decode_tokens_per_second_rounds": [r["decode_tokens_per_second"] for r in mine],
                    "weight_bytes": mine[0]["weight_bytes"]})
    for s in out:
        base = next((b for b in out if b["threads"] == s["threads"] and b["side"] == "qmamba"
                     and b["variant"] == "fp32"), None)
        s["decode_vs_qmamba_fp32"] = (s["decode_tokens_per_second"] / base["decode_tokens_per_second"]
                                      if base else None)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| threads | runtime | variant | weights (MiB) | prefill (tok/s) | decode (tok/s) | decode x qmamba fp32 "
             "| decode per round (tok/s) |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        vs = s["decode_vs_qmamba_fp32"]
        lines.append(f"| {s['threads']} | {s['side']} | {s['variant']} | {s['weight_bytes'] / 2 ** 20:,.1f} | "
                     f"{s['prefill_tokens_per_second']:.1f} | {s['decode_tokens_per_second']:.1f} | "
                     f"{'' if vs is None else f'{vs:.2f}'} | "
                     f"{', '.join(f'{x:.1f}' for x in s['decode_tokens_per_second_rounds'])} |")
    return "\n".join(lines)


def _qmamba_round(args, folder: Path, variant: str, threads: int) -> tuple[dict, list]:
    kwargs = dict(model_name=str(folder), variant=variant, quant=args.quant, method=args.method, batch=1,
                  prompt_len=args.prompt_len, gen_len=args.gen_len, reps=args.reps, device_name="cpu",
                  threads=threads, folder=str(folder))
    return run_child(kwargs), child_command(kwargs)


def run(args) -> int:
    from ..eval import llamacpp, llamacpp_setup

    if args.llama_cpp_build:
        if args.against is None:
            raise QMambaError("--llama-cpp-build goes with --against llama.cpp")
        info = llamacpp_setup.setup()
        print(f"llama.cpp {info['llama_cpp_python_sdist']} (ggml {info['ggml_version']}) built in {info['bin']}")
        return 0
    tools, types = check(args)
    variants = [v for v in args.variants.split(",") if v] or list(VARIANTS)
    load_before = list(os.getloadavg())
    folder, source = model_folder(args.model)
    key = llamacpp.folder_key(folder, tools.converter)
    print(f"{args.model}: {source}\n  folder {folder} (content key {key})")
    view = converter_view(folder, llamacpp.gguf_dir(key))
    ggufs, made = llamacpp.make_ggufs(view, types, tools, key)
    print(f"prompt {args.prompt_len}, generate {args.gen_len}, batch 1, threads {args.thread_list}, "
          f"{args.rounds} alternating rounds of {args.reps} repetitions; load average {load_before}")
    rounds, commands, qm_rows = [], {"llama_bench": [], "qmamba": []}, []
    for rnd in range(args.rounds):
        for t in args.thread_list:
            sides = ["llama.cpp", "qmamba"] if rnd % 2 == 0 else ["qmamba", "llama.cpp"]
            for side in sides:
                print(f"  round {rnd + 1}/{args.rounds}, {t} thread(s): {side}", flush=True)
                if side == "llama.cpp":
                    cmd, res = llamacpp.run_bench(tools, ggufs, args.prompt_len, args.gen_len, t, args.reps)
                    commands["llama_bench"].append(shlex.join(cmd))
                    for ty in types:
                        rounds.append({"round": rnd, "threads": t, "side": "llama.cpp", "variant": ty.upper(),
                                       "prefill_tokens_per_second": res[ty]["prefill"],
                                       "decode_tokens_per_second": res[ty]["decode"],
                                       "weight_bytes": res[ty]["model_size"], "raw": res[ty]["rows"],
                                       "time": time.time()})
                else:
                    for v in variants:
                        r, cmd = _qmamba_round(args, folder, v, t)
                        commands["qmamba"].append(shlex.join(cmd))
                        qm_rows.append(r)
                        rounds.append({"round": rnd, "threads": t, "side": "qmamba",
                                       "variant": args.quant if v == "quant" else v,
                                       "prefill_tokens_per_second": args.prompt_len / r["prefill_seconds"],
                                       "decode_tokens_per_second": r["tokens_per_second"],
                                       "weight_bytes": r["weight_bytes"], "raw": r, "time": time.time()})
    load_after = list(os.getloadavg())
    summary = summarize(rounds)
    md = table(summary)
    print(md)
    print(f"load average before {load_before}, after {load_after}")
    if args.json:
        import torch

        from .._version import __version__

        state = {v: next((r["state_bytes"] for r in qm_rows if r["variant"] == v), None) for v in variants}
        atomic_write_json(args.json, {
            "schema": SCHEMA, "model": args.model, "source": source, "folder": str(folder), "folder_key": key,
            "batch": 1, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "threads": args.thread_list,
            "rounds": args.rounds, "reps": args.reps, "command": command_line(args),
            "machine": dict(machine(), load_average_before=load_before, load_average_after=load_after),
            "qmamba": {"version": __version__, "torch_version": torch.__version__, "quant": args.quant,
                       "method": args.method, "variants": variants, "state_bytes": state,
                       "int_backend": next((r["int_backend"] for r in qm_rows if r["int_backend"]), None),
                       "commands": commands["qmamba"]},
            "llama_cpp": {**llamacpp.version_info(tools), "types": types,
                          "gguf": {t: {"path": str(p), "bytes": p.stat().st_size} for t, p in ggufs.items()},
                          "gguf_commands": [{"command": shlex.join(c), "ran": ran} for c, ran in made],
                          "commands": commands["llama_bench"],
                          "ssm_state": "f32 (llama.cpp keeps the recurrent state in f32)"},
            "summary": summary, "results": rounds, "markdown": md})
        print(f"wrote {args.json}")
    return 0
