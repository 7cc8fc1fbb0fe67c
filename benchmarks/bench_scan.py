"""Benchmark of the Mamba1 selective scan: forward and forward + backward time and tokens/s of
`qmamba.models.scan.mamba1.selective_scan` against the previous implementation (kept below, labelled
OLD) and, for l = 512, the sequential reference `selective_scan_ref` through autograd.

    python benchmarks/bench_scan.py                       # the two scan shapes
    python benchmarks/bench_scan.py --train               # plus a Mamba1 LM training step
    python benchmarks/bench_scan.py --threads 1 --reps 5 --json bench.json

Every measurement is the minimum over --reps runs after one warm-up run, the implementations
interleaved so that a busy machine slows them alike. Reported: wall ms and process-CPU ms per
thread (steadier than wall time when other jobs share the cores), and tokens/s = b * l / wall.
Give --threads no more than the idle cores: with more, every parallel op waits for a descheduled
thread, and the new scan (over a thousand slice-sized ops per call) suffers most from that.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from qmamba.models.scan.linear import ChunkedLinearScan, chunk_len, from_chunks, to_chunks
from qmamba.models.scan.mamba1 import selective_chunk_len, selective_scan
from qmamba.models.scan.reference import selective_scan_ref

SHAPES = [(8, 512, 512, 16), (1, 2048, 1536, 16)]       # (b, l, d, n)
REF_MAX_LEN = 512


# --------------------------------------------------------------------------------------------
# OLD implementation, for comparison only: `selective_scan` as of commit 9848f3b (the discretised
# (k, b, c, d, n) tensors built with autograd and run through `ChunkedLinearScan`).
# --------------------------------------------------------------------------------------------

def selective_scan_old(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    h0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """OLD Mamba1 parallel path (kept for the benchmark): shapes as `selective_scan`."""
    length = x.shape[1]
    k = chunk_len(length)
    xc, dtc = to_chunks(x.float(), k), to_chunks(dt.float(), k)             # (k, b, c, d); dt = 0 on padding
    Bc, Cc = to_chunks(B[:, :, 0].float(), k), to_chunks(C[:, :, 0].float(), k)  # (k, b, c, n)
    dA = torch.exp(torch.einsum("kbcd,dn->kbcdn", dtc, A))                   # (k, b, c, d, n); 1 on padding
    dBx = torch.einsum("kbcd,kbcn->kbcdn", dtc * xc, Bc)                     # (k, b, c, d, n); 0 on padding
    hs = ChunkedLinearScan.apply(dA, dBx, h0.float() if h0 is not None else None)
    y = from_chunks(torch.einsum("kbcdn,kbcn->kbcd", hs, Cc), length)        # (b, l, d)
    if D is not None:
        y = y + D * x.float()
    return y, hs[-1, :, -1]


IMPLS = {"old": selective_scan_old, "new": selective_scan, "ref": selective_scan_ref}


# --------------------------------------------------------------------------------------------

def make_inputs(b: int, length: int, d: int, n: int, seed: int = 0) -> dict:
    """Inputs as a freshly initialised Mamba1 layer sees them: dt in [1e-3, 1e-1], S4D-real A."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt = torch.exp(lo + (hi - lo) * torch.rand(b, length, d, generator=g))          # log-uniform
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    leaves = dict(x=torch.randn(b, length, d, generator=g), dt=dt, A=A,
                  B=torch.randn(b, length, 1, n, generator=g), C=torch.randn(b, length, 1, n, generator=g),
                  D=torch.ones(d))
    for t in leaves.values():
        t.requires_grad_(True)
    leaves["gy"] = torch.randn(b, length, d, generator=g)
    return leaves


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_forward(fn, inp):
    with torch.no_grad():
        fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"])


def run_backward(fn, inp):
    for name in ("x", "dt", "A", "B", "C", "D"):
        inp[name].grad = None
    y, _ = fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"])
    y.backward(inp["gy"])


def measure(jobs: dict, reps: int, threads: int) -> dict:
    """jobs: name -> callable; each is warmed up once, then run `reps` times, interleaved."""
    best = {name: [float("inf"), float("inf")] for name in jobs}
    for rep in range(reps + 1):
        for name, job in jobs.items():
            w0, c0 = clock()
            job()
            w1, c1 = clock()
            if rep:
                best[name][0] = min(best[name][0], w1 - w0)
                best[name][1] = min(best[name][1], (c1 - c0) / threads)
    return {name: (1e3 * w, 1e3 * c) for name, (w, c) in best.items()}


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_scans(impls: list[str], reps: int, threads: int) -> list[dict]:
    rows = []
    for b, length, d, n in SHAPES:
        inp = make_inputs(b, length, d, n)
        names = [i for i in impls if i != "ref" or length <= REF_MAX_LEN]
        jobs = {}
        for name in names:
            fn = IMPLS[name]
            jobs[f"{name}/fwd"] = lambda fn=fn: run_forward(fn, inp)
            jobs[f"{name}/fwd+bwd"] = lambda fn=fn: run_backward(fn, inp)
        res = measure(jobs, reps, threads)
        # agreement of the implementations with the first one, forward and gradients
        outs = {}
        for name in names:
            run_backward(IMPLS[name], inp)
            with torch.no_grad():
                y, h = IMPLS[name](inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"])
            outs[name] = [y, h] + [inp[v].grad.clone() for v in ("x", "dt", "A", "B", "C", "D")]
        first = outs[names[0]]
        tokens = b * length
        for name in names:
            row = dict(impl=name, b=b, l=length, d=d, n=n, tokens=tokens,
                       fwd_ms=round(res[f"{name}/fwd"][0], 2), fwd_cpu_ms=round(res[f"{name}/fwd"][1], 2),
                       fwdbwd_ms=round(res[f"{name}/fwd+bwd"][0], 2),
                       fwdbwd_cpu_ms=round(res[f"{name}/fwd+bwd"][1], 2),
                       fwd_tok_s=round(tokens / res[f"{name}/fwd"][0] * 1e3, 1),
                       fwdbwd_tok_s=round(tokens / res[f"{name}/fwd+bwd"][0] * 1e3, 1),
                       max_rel_diff_vs_first=max(max_rel_diff(o, f) for o, f in zip(outs[name], first)))
            if name == "new":
                row["chunk_len"] = selective_chunk_len(b, length, d, n)
            rows.append(row)
            fwd = f"fwd {row['fwd_ms']:9.1f} ms ({row['fwd_cpu_ms']:9.1f} cpu) {row['fwd_tok_s']:9.0f} tok/s"
            both = (f"fwd+bwd {row['fwdbwd_ms']:9.1f} ms ({row['fwdbwd_cpu_ms']:9.1f} cpu) "
                    f"{row['fwdbwd_tok_s']:9.0f} tok/s")
            diff = f"max rel diff vs {names[0]} {row['max_rel_diff_vs_first']:.1e}"
            print(f"  {name:4s} b={b} l={length} d={d} n={n}:  {fwd}   {both}   {diff}", flush=True)
    return rows


def bench_train(impls: list[str], reps: int, threads: int, batch: int = 8, seqlen: int = 512) -> list[dict]:
    """One AdamW training step of MambaLM(mamba1, d_model 256, 6 layers, d_state 16), the Mamba1
    layer's scan swapped between the implementations."""
    import qmamba.models.mamba1 as mamba1
    from qmamba.models import MambaLM, ModelConfig, init_weights

    cfg = ModelConfig(arch="mamba1", vocab_size=8192, d_model=256, n_layer=6, d_state=16)
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen + 1), generator=torch.Generator().manual_seed(0))
    models = {}
    for name in impls:
        model = init_weights(MambaLM(cfg), seed=0).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    original = mamba1.selective_scan

    def step(name):
        model, opt = models[name]
        mamba1.selective_scan = IMPLS[name]
        try:
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            mamba1.selective_scan = original

    res = measure({name: (lambda name=name: step(name)) for name in impls}, reps, threads)
    rows = []
    for name in impls:
        wall, cpu = res[name]
        row = dict(impl=name, batch=batch, seqlen=seqlen, step_ms=round(wall, 1), step_cpu_ms=round(cpu, 1),
                   tok_s=round(batch * seqlen / wall * 1e3, 1))
        rows.append(row)
        print(f"  train step {name:4s}: {row['step_ms']:9.1f} ms ({row['step_cpu_ms']:9.1f} cpu)  "
              f"{row['tok_s']:8.1f} tok/s", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impls", default="old,new,ref", help="comma-separated subset of old,new,ref")
    ap.add_argument("--train", action="store_true", help="also time a Mamba1 LM training step (old, new)")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    impls = [i for i in args.impls.split(",") if i]
    print(f"torch {torch.__version__}, {threads} threads, {platform.machine()}", flush=True)
    out = dict(torch=torch.__version__, threads=threads, reps=args.reps)
    out["scans"] = bench_scans(impls, args.reps, threads)
    if args.train:
        out["train"] = bench_train([i for i in impls if i != "ref"], args.reps, threads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
