"""`qmamba bench [MODEL] [--quant CONFIG] [--batch 1,16] [--prompt-len 512] [--gen-len 128]
[--device cpu|cuda] [--json OUT]`: the float model (fp32 and bf16 on CPU, fp16 on CUDA) and the
quantized one side by side: prefill latency (time to first token), decode time per token,
tokens/s, peak memory (process RSS on CPU, with the part above the bare runtime of Python and
torch; allocator peak on CUDA), weight and state bytes,
bytes read per decoded token and the bandwidth that implies vs the measured copy bandwidth.

Each variant runs in a fresh process (peak memory is per process), with a warm-up, then
--reps repetitions; medians are reported. MODEL is a reference model or folder, or the shape
of a real checkpoint (mamba-130m, mamba2-130m, mamba2-370m, ...) with random weights. The
quantized model keeps an int8 embedding/lm_head; "quant" runs as integers (int8 x int8 -> int32
products, int8 weight reads in the head), "quant-sim" through dequantized float weights.

`--against llama.cpp` runs llama.cpp's own `llama-bench` beside qmamba on the same model folder
(GGUF made by llama.cpp's converter and quantizer), in alternating rounds, batch 1: see
`qmamba.cli.bench_llamacpp` and docs/against-llamacpp.md. `--llama-cpp-build` builds llama.cpp's
tools into the cache first (downloads the pinned llama-cpp-python sdist; takes a while).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import QMambaError
from ..utils.io import atomic_write_json, check_output
from .bench_child import fill_defaults as _defaults
from .bench_child import run_child as _child
from .common import positive_ints

MAX_TOKENS = 1 << 16      # prompt or generation lengths beyond this are a mistake here


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="latency, throughput and memory: float vs quantized",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="ref-mamba2",
                   help="reference model, folder, or checkpoint shape such as mamba2-130m (default ref-mamba2)")
    p.add_argument("--quant", default="w8a8h4", metavar="CONFIG", help="quantized variant's config (default w8a8h4)")
    p.add_argument("--method", default="qmamba", help="method whose modules the quantized variant has (default qmamba)")
    p.add_argument("--variants", default="", help="comma-separated subset of fp32,bf16,fp16,quant,quant-sim")
    p.add_argument("--batch", help="comma-separated batch sizes (default 1,16; 1 with --against)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 512; 128 with --against)")
    p.add_argument("--gen-len", type=int, help="generated tokens (default 128; 64 with --against)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", help="CPU threads (default: all cores; with --against a comma-separated "
                                     "list, default 1 and all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, metavar="OUT")
    g = p.add_argument_group("llama.cpp beside qmamba")
    g.add_argument("--against", choices=["llama.cpp"], help="also run llama.cpp's llama-bench on the same model")
    g.add_argument("--llama-bench", metavar="PATH",
                   help="llama-bench binary (default $QMAMBA_LLAMA_BENCH, else the --llama-cpp-build one)")
    g.add_argument("--llama-types", default="f32,q8_0,q4_0", metavar="TYPES",
                   help="GGUF types to run (default f32,q8_0,q4_0)")
    g.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides (default 3)")
    g.add_argument("--llama-cpp-build", action="store_true",
                   help="download the pinned llama.cpp source and build its tools into the cache, then exit")
    p.set_defaults(func=run)
    return p


def _check(args) -> tuple[list[int], list[str]]:
    import torch

    from ..quant.config import QuantConfig

    batches = positive_ints(args.batch, "--batch")
    for name in ("prompt_len", "gen_len", "reps", "threads"):
        v = getattr(args, name)
        if v <= 0:
            raise QMambaError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.prompt_len > MAX_TOKENS or args.gen_len > MAX_TOKENS:
        raise QMambaError(f"--prompt-len and --gen-len are limited to {MAX_TOKENS} tokens")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise QMambaError("--device cuda: CUDA is not available on this machine")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        raise QMambaError(f"--device must be cpu or cuda, got {args.device!r}")
    QuantConfig.parse(args.quant)
    if args.json is not None:
        check_output(args.json, "--json")
    cuda = args.device.startswith("cuda")
    variants = [v for v in args.variants.split(",") if v] or (
        ["fp16", "quant"] if cuda else ["fp32", "bf16", "quant"])
    bad = [v for v in variants if v not in ("fp32", "bf16", "fp16", "quant", "quant-sim")]
    if bad:
        raise QMambaError(f"unknown variant(s) {', '.join(bad)}")
    _check_size(args, max(batches))
    return batches, variants


def _check_size(args, batch: int) -> None:
    """The largest batch must fit before any child starts: a lower bound of what one step holds
    (prompt ids, prefill activations, last-token logits, the state at >= 4 bits per element)."""
    from ..models.budget import check_bytes, model_size
    from ..models.shapes import SHAPES, shape_config

    if args.model in SHAPES:
        cfg = shape_config(args.model)
    else:
        from ..api import resolve_model_path
        from ..models.load import detect_format, model_config, read_config

        raw = read_config(resolve_model_path(args.model))
        if "quantization_config" in raw:
            return
        cfg = model_config(raw, detect_format(raw))
    size = model_size(cfg)
    per_seq = (args.prompt_len + args.gen_len) * 8 + args.prompt_len * cfg.d_model * 4 + cfg.vocab_size * 4 \
        + size.state_per_sequence // 2
    check_bytes(batch * per_seq, f"--batch {batch:,} with --prompt-len {args.prompt_len:,} on {args.model} "
                                 f"(d_model {cfg.d_model:,}, vocabulary {cfg.vocab_size:,})", args.device)


def _mib(b) -> str:
    return f"{b / 2 ** 20:,.1f}"


def run(args) -> int:
    if args.llama_cpp_build or args.against:
        from . import bench_llamacpp

        return bench_llamacpp.run(args)
    _defaults(args)
    from ..eval.bench import copy_bandwidth

    batches, variants = _check(args)
    bw = copy_bandwidth(args.device)
    print(f"{args.model}: prompt {args.prompt_len}, generate {args.gen_len}, {args.threads} threads on "
          f"{args.device}; measured copy bandwidth {bw:.1f} GB/s")
    from ..models.shapes import SHAPES

    folder = None                  # the child reads the folder the name resolves to
    if args.model not in SHAPES:
        from ..api import resolve_model_path

        folder = str(resolve_model_path(args.model))
    rows, failed = [], []
    for b in batches:
        for v in variants:
            print(f"  batch {b} {v}...", flush=True)
            try:
                rows.append(_child(dict(model_name=args.model, variant=v, quant=args.quant, method=args.method,
                                        batch=b, prompt_len=args.prompt_len, gen_len=args.gen_len,
                                        reps=args.reps, device_name=args.device, threads=args.threads,
                                        folder=folder)))
            except QMambaError as e:         # keep the other variants' rows; exit 1 at the end
                print(f"qmamba bench: {e}", file=sys.stderr)
                failed.append(f"batch {b} {v}")
    head = ("| batch | variant | prefill (s) | decode (ms/token) | tokens/s | x fp32 | x bf16 | peak mem (MiB) "
            "| vs fp32 | above runtime (MiB) | vs fp32 | weights (MiB) | state (MiB) | state share | MB read/step "
            "| GB/s | % of copy bw |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    nan = float("nan")
    for b in batches:
        here = [r for r in rows if r["batch"] == b]
        base = next((r for r in here if r["variant"] in ("fp32", "fp16")), None)
        bf16 = next((r for r in here if r["variant"] == "bf16"), None)
        for r in here:
            above = r["peak_memory_bytes"] - r.get("runtime_rss_bytes", 0)
            r["speedup_vs_base"] = r["tokens_per_second"] / base["tokens_per_second"] if base else nan
            r["speedup_vs_bf16"] = r["tokens_per_second"] / bf16["tokens_per_second"] if bf16 else nan
            r["peak_memory_vs_base"] = r["peak_memory_bytes"] / base["peak_memory_bytes"] if base else nan
            r["peak_above_runtime_vs_base"] = (
                above / (base["peak_memory_bytes"] - base.get("runtime_rss_bytes", 0)) if base else nan)
            lines.append(
                f"| {b} | {r['variant']} | {r['prefill_seconds']:.3f} | {r['decode_seconds_per_token'] * 1e3:.2f} | "
                f"{r['tokens_per_second']:.1f} | {r['speedup_vs_base']:.2f} | {r['speedup_vs_bf16']:.2f} | "
                f"{_mib(r['peak_memory_bytes'])} | {r['peak_memory_vs_base'] * 100:.0f}% | {_mib(above)} | "
                f"{r['peak_above_runtime_vs_base'] * 100:.0f}% | "
                f"{_mib(r['weight_bytes'])} | {_mib(r['state_bytes'])} | {r['state_share'] * 100:.1f}% | "
                f"{r['bytes_read_per_step'] / 1e6:.1f} | {r['bandwidth_gb_s']:.2f} | "
                f"{r['bandwidth_gb_s'] / bw * 100:.0f}% |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        import platform

        import torch

        atomic_write_json(args.json, {"model": args.model, "quant": args.quant, "copy_bandwidth_gb_s": bw,
                                      "machine": platform.processor() or platform.machine(),
                                      "cpu_count": os.cpu_count(), "torch_version": torch.__version__,
                                      "results": rows, "failed": failed, "markdown": table})
    return 1 if failed else 0
