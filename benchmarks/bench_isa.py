"""The int8 GEMV of a decode step on every build of qmamba's C kernels this CPU runs (portable,
avx2, avxvnni, avx512vnni), at the shapes of mamba2-130m: one activation row, quantized in the
kernel, times int8 weights (`i8_linear_quantizing`), the weight's row sums cached as in a model.

    python benchmarks/bench_isa.py --threads 1 --reps 200 --rounds 3 --json benchmarks/results/bench_isa_t1.json

Builds are timed in turn, round after round (a busy machine slows them alike); printed: the
median over rounds of each build's median microseconds per call, and the weight bytes read per
second that implies. Every build's output is checked to be bit-identical to the first one's.

    python benchmarks/bench_isa.py --decode mamba2-130m --threads 1 --rounds 8 --steps 16

times whole decode steps instead: the W8A8H4 model of that shape with random weights (as
`qmamba bench` builds it), batch 1, one process, the build switched with
`qmamba.kernels.forced` between rounds of `--steps` tokens; per build, the median over rounds of
the median ms per token, and the logits checked identical across builds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from qmamba.eval.timing import decode_step_seconds
from qmamba.kernels import cpu_features, cpu_native
from qmamba.utils.io import atomic_write_json

SHAPES = {"in_proj 3352x768": (3352, 768), "out_proj 768x1536": (768, 1536), "head 50280x768": (50280, 768)}


def median_seconds(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--decode", metavar="SHAPE", help="time decode steps of this model shape instead")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    builds = {isa: k for isa in cpu_features.ISAS if (k := cpu_native.native(isa)) is not None}
    if args.decode:
        return decode(args, list(builds))
    g = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, {args.reps} calls x {args.rounds} rounds; builds: {', '.join(builds)}")
    rows = []
    for label, (n, k) in SHAPES.items():
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scale = torch.rand(n, 1, generator=g) * 0.01
        x = torch.randn(1, k, generator=g)
        outs = {isa: kb.i8_linear_quantizing(x, None, codes, scale, 0, None) for isa, kb in builds.items()}
        first = next(iter(outs.values()))
        assert all(torch.equal(o, first) for o in outs.values()), "builds disagree"
        times = {isa: [] for isa in builds}
        for _ in range(args.rounds):
            for isa, kb in builds.items():
                times[isa].append(median_seconds(lambda: kb.i8_linear_quantizing(x, None, codes, scale, 0, None),
                                                 args.reps, warmup=3))
        for isa in builds:
            t = statistics.median(times[isa])
            rows.append({"shape": label, "build": isa, "us": t * 1e6, "rounds_us": [v * 1e6 for v in times[isa]],
                         "weight_GBps": n * k / t / 1e9})
            print(f"{label:<18} {isa:<11} {t * 1e6:9.1f} us  {n * k / t / 1e9:6.2f} GB/s of weights")
    if args.json:
        atomic_write_json(args.json, {"threads": args.threads, "reps": args.reps, "rounds": args.rounds,
                                      "cpu_flags": sorted(set(cpu_features.cpu_flags()) & {
                                          f for fs in cpu_features.FEATURES.values() for f in fs}),
                                      "machine": platform.machine(), "torch": torch.__version__, "rows": rows})


@torch.no_grad()
def decode(args, builds: list[str]) -> None:
    from qmamba.eval.bench import build
    from qmamba.kernels import forced

    model, source = build(args.decode, "quant", "w8a8h4", "qmamba", torch.device("cpu"))
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    times, logits = {isa: [] for isa in builds}, {}
    for r in range(args.rounds + 1):                 # round 0: warm-up
        for isa in builds:
            with forced(isa):
                steps, out, _ = decode_step_seconds(model, prompt, args.steps)
                if r:
                    times[isa].append(statistics.median(steps))
                logits.setdefault(isa, out)
    first = logits[builds[0]]
    assert all(torch.equal(v, first) for v in logits.values()), "builds disagree"
    print(f"{source}, W8A8H4, batch 1, threads {args.threads}, {args.rounds} rounds x {args.steps} steps")
    rows = []
    for isa in builds:
        t = statistics.median(times[isa])
        rows.append({"build": isa, "ms_per_token": t * 1e3, "rounds_ms": [v * 1e3 for v in times[isa]]})
        print(f"{isa:<11} {t * 1e3:8.2f} ms/token   rounds: {', '.join(f'{v * 1e3:.1f}' for v in times[isa])}")
    if args.json:
        atomic_write_json(args.json, {"model": args.decode, "threads": args.threads, "rounds": args.rounds,
                                      "steps": args.steps, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
