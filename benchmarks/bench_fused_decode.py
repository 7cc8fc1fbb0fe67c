"""Decode per token of the quantized (W8A8H4) model in integer execution with its three decode
steps: the native step (`qmamba.quant.native_decode`, one C call per token), the fused per-layer
step (`qmamba.quant.fused_decode`, with the native kernel switched off) and the eager step (the
fused kernels off too: `qmamba.kernels.forced("torch", ops=...)`), in one process, alternating
between rounds so that all see the same machine load; checks that all produce the same logits
bit for bit.

    python benchmarks/bench_fused_decode.py --shape mamba2-130m --batch 1,16 --threads 1 --rounds 6 --steps 16

Per row: the median over rounds of each round's median ms/token, tokens/s, and the bytes a step
reads (as `qmamba bench` counts them: every weight but the embedding table, the state read and
written) per second, against the measured copy bandwidth of a 512 MiB buffer; the load average
is recorded before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics

import torch

from qmamba.eval.bench import build, copy_bandwidth
from qmamba.eval.memory import weight_bytes
from qmamba.eval.timing import decode_step_seconds
from qmamba.kernels import forced
from qmamba.utils.io import atomic_write_json

FUSED_OPS = ("mamba2_conv_step", "mamba2_ssm_step")
NATIVE_OPS = ("mamba2_model_step",)
OFF = {"native": (), "fused": NATIVE_OPS, "eager": NATIVE_OPS + FUSED_OPS}     # kernels switched off


def bytes_read(model, cache) -> int:
    w = weight_bytes(model)["total"]
    emb = sum(t.numel() * t.element_size() for t in model.backbone.embeddings.state_dict().values())
    return w - (0 if model.config.tie_embeddings else emb) + 2 * sum(cache.nbytes().values())


@torch.no_grad()
def run(model, batch: int, rounds: int, steps: int, prompt_len: int) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    times = {v: [] for v in OFF}
    logits, read = {}, 0
    for r in range(rounds + 1):                     # round 0: warm-up
        for variant, off in OFF.items():
            ctx = forced("torch", ops=off) if off else contextlib.nullcontext()
            with ctx:
                per, out, cache = decode_step_seconds(model, prompt, steps)
            if r:
                times[variant].append(statistics.median(per))
            logits.setdefault(variant, out)
            read = bytes_read(model, cache)
    same = all(torch.equal(logits[v], logits["eager"]) for v in OFF)
    assert same, "the decode steps disagree"
    row = {"batch": batch, "bytes_read_per_step": read, "logits_equal": same}
    for v, ts in times.items():
        t = statistics.median(ts)
        row[v] = {"ms_per_token": t * 1e3, "tokens_per_second": batch / t, "gb_s": read / t / 1e9,
                  "rounds_ms": [x * 1e3 for x in ts]}
    row["speedup"] = {v: row["eager"]["ms_per_token"] / row[v]["ms_per_token"] for v in ("native", "fused")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="mamba2-130m")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bw = copy_bandwidth("cpu")
    model, source = build(args.shape, "quant", "w8a8h4", "qmamba", torch.device("cpu"))
    rows = [run(model, int(b), args.rounds, args.steps, args.prompt_len) for b in args.batch.split(",")]
    load_after = os.getloadavg()
    print(f"{source}, W8A8H4, threads {args.threads}, {args.rounds} rounds x {args.steps} steps; "
          f"copy bandwidth {bw:.1f} GB/s; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    for r in rows:
        for v in OFF:
            x = r[v]
            print(f"batch {r['batch']:>3} {v:<6} {x['ms_per_token']:8.2f} ms/token {x['tokens_per_second']:8.1f} tok/s "
                  f"{x['gb_s']:6.2f} GB/s ({x['gb_s'] / bw:5.1%} of copy)  rounds: "
                  + ", ".join(f"{t:.1f}" for t in x["rounds_ms"]))
        print(f"batch {r['batch']:>3} speed-up over eager: native {r['speedup']['native']:.2f}x, fused "
              f"{r['speedup']['fused']:.2f}x; logits equal: {r['logits_equal']}")
    if args.json:
        atomic_write_json(args.json, {"shape": args.shape, "source": source, "threads": args.threads,
                                      "rounds": args.rounds, "steps": args.steps, "prompt_len": args.prompt_len,
                                      "copy_bandwidth_gb_s": bw, "loadavg_before": load_before,
                                      "loadavg_after": load_after, "cpus": os.cpu_count(),
                                      "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
