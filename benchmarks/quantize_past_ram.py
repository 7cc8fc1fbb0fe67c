"""Quantizing models bigger than RAM: `qmamba quantize --low-memory` (block by block from the
memory-mapped safetensors) on random-weight Mamba2 checkpoints of real shapes, each run in a
child process that reports its peak RSS (getrusage ru_maxrss) and the time of every block.

    nice -n 10 python benchmarks/quantize_past_ram.py --shapes mamba2-1.3b,mamba2-2.7b,mamba2-8b \
        --methods dsq,qmamba --in-memory mamba2-1.3b

Checkpoints: bf16 safetensors, sharded as transformers shards (<= 5 GB), in --dir (default
~/.cache/qmamba/bench-ckpts), written once; weights as `qmamba.models.lm.init_weights` draws them
(normal(0.02) matrices, out_proj / sqrt(n_layer), S4D-real A, log-uniform dt, unit norms), so
activations stay finite. Quantization in float32 (the default --dtype), W8A8H4, calibration
--nsamples x --calib-seqlen windows of the shipped validation text; qmamba with reduced ESR
(--esr-nsamples, --esr-seqlen, --esr-epochs, batch 4). `--in-memory SHAPE` also runs the
in-memory path (`qmamba.load` + `qmamba.quantize` + `save_quantized`) on that shape for the
peak-RSS comparison. Outputs are deleted after each run (their size is recorded). Results:
benchmarks/results/quantize_past_ram.json (the machine's load average before and after each run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "quantize_past_ram.json"


def write_checkpoint(shape: str, folder: Path, seed: int = 0) -> Path:
    """A random bf16 Mamba2 checkpoint of `shape` in transformers' layout, written tensor by tensor.

    Drawing 8e9 normal numbers takes longer than the quantization on two busy cores, so the
    matrices (normal(0.02), out_proj / sqrt(n_layer) as `init_weights` scales it) are slices of one
    pool of 2^24 normal draws at random offsets; each layer's vectors (A_log, dt_bias, D, conv,
    norms) are `init_weights`' for a one-layer model, seeded by the layer."""
    import dataclasses

    from qmamba.formats.shards import ShardWriter, index
    from qmamba.models.lm import MambaLM, init_weights
    from qmamba.models.shapes import shape_config
    from qmamba.utils.paths import TOKENIZER_DIR

    if (folder / "config.json").is_file():
        return folder
    cfg = shape_config(shape)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=g)                      # (2^24,) normal(0, 1)

    def draws(n: int, std: float):                                # n values, pool slices, in chunks
        done = 0
        while done < n:
            k = min(n - done, pool.numel() // 2)
            a = int(torch.randint(0, pool.numel() - k + 1, (1,), generator=g))
            yield (pool[a:a + k] * std).bfloat16()
            done += k

    def matrix(name, rows, cols, std=0.02):
        writer.add_chunks(name, (rows, cols), torch.bfloat16,
                          (c.reshape(-1, cols) for c in _rows(draws(rows * cols, std), cols)))

    matrix("backbone.embeddings.weight", cfg.vocab_size, cfg.d_model)
    one = dataclasses.replace(cfg, n_layer=1, layer_types=cfg.layer_types[:1], vocab_size=16, tie_embeddings=True)
    for i in range(cfg.n_layer):
        with torch.device("meta"):
            m = MambaLM(one)
        m = m.to_empty(device="cpu")
        mixer = m.backbone.layers[0].mixer
        big = {n for n, t in m.backbone.layers[0].state_dict().items() if t.dim() == 2 and t.numel() > 1 << 16}
        for n in big:                                             # no randn for the big matrices
            get = m.backbone.layers[0].get_parameter(n)
            get.data = torch.zeros(0)
        init_weights(m, seed=seed * 1000 + i + 1)
        for k, v in m.backbone.layers[0].state_dict().items():
            if k in big:
                continue
            writer.add(f"backbone.layers.{i}.{k}", v.bfloat16().contiguous())
        for k in sorted(big):
            rows, cols = getattr(mixer, k.split(".")[1]).out_features, getattr(mixer, k.split(".")[1]).in_features
            std = 0.02 / (math.sqrt(cfg.n_layer) if k.startswith("mixer.out_proj") else 1)
            matrix(f"backbone.layers.{i}.{k}", rows, cols, std)
        del m
    writer.add("backbone.norm_f.weight", torch.ones(cfg.d_model, dtype=torch.bfloat16))
    if not cfg.tie_embeddings:
        matrix("lm_head.weight", cfg.vocab_size, cfg.d_model)
    wm = writer.close()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index(wm, writer.total_size), indent=2))
    hf = cfg.to_hf()
    hf["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (TOKENIZER_DIR / f).exists():
            shutil.copyfile(TOKENIZER_DIR / f, tmp / f)
    os.replace(tmp, folder)
    return folder


def _rows(chunks, cols: int):
    """Re-cut a stream of 1-D chunks into pieces whose lengths are multiples of `cols`."""
    rest = None
    for c in chunks:
        c = c if rest is None else torch.cat([rest, c])
        n = (c.numel() // cols) * cols
        if n:
            yield c[:n]
        rest = c[n:]
    assert rest is None or rest.numel() == 0


def child(args) -> None:
    """One quantization in this process; prints one JSON line with its figures."""
    torch.set_num_threads(args.threads)
    mo = {"nsamples": args.esr_nsamples, "seqlen": args.esr_seqlen, "epochs": args.esr_epochs} \
        if args.method == "qmamba" else None
    t0 = time.time()
    blocks = []
    if args.child == "low-memory":
        from qmamba.quantize import quantize_low_memory

        stats = quantize_low_memory(args.ckpt, args.out, "w8a8h4", method=args.method, nsamples=args.nsamples,
                                    seqlen=args.calib_seqlen, method_options=mo, progress=False,
                                    on_block=lambda r: (blocks.append(r), print(json.dumps({"block": r}), flush=True)))
        extra = {"max_live_blocks": stats["max_live_blocks"]}
    else:
        import qmamba
        from qmamba.quant.checkpoint import save_quantized

        loaded = qmamba.load(args.ckpt)
        qmamba.quantize(loaded, "w8a8h4", method=args.method, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                        method_options=mo, progress=False)
        save_quantized(loaded.model, args.out, tokenizer_dir=loaded.path)
        extra = {}
    total = time.time() - t0
    out_bytes = sum(p.stat().st_size for p in Path(args.out).iterdir())
    print(json.dumps({"result": {"seconds": round(total, 1), "peak_rss_bytes": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "output_bytes": out_bytes, "blocks": blocks, **extra}}), flush=True)


def run_one(args, shape: str, method: str, path: str, ckpt: Path) -> dict:
    out = Path(args.dir) / f"{shape}-{method}-{path}-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", path, "--ckpt", str(ckpt), "--out", str(out), "--method", method,
           "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--threads", str(args.threads),
           "--esr-nsamples", str(args.esr_nsamples), "--esr-seqlen", str(args.esr_seqlen),
           "--esr-epochs", str(args.esr_epochs)]
    load0 = os.getloadavg()
    print(f"== {shape} {method} {path}", flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:   # stderr: the terminal
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            lines.append(line)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return {"shape": shape, "method": method, "path": path, "error": f"exit status {proc.returncode}"}
    res = json.loads([ln for ln in lines if ln.startswith('{"result"')][-1])["result"]
    secs = [b["seconds"] for b in res["blocks"]]
    row = {"shape": shape, "method": method, "path": path,
           "command": " ".join(["python", "benchmarks/quantize_past_ram.py", *sys.argv[1:]]), **{k: v for k, v in res.items() if k != "blocks"},
           "peak_rss_gib": round(res["peak_rss_bytes"] / 2 ** 30, 2), "output_gib": round(res["output_bytes"] / 2 ** 30, 2),
           "blocks": len(secs), "block_seconds_median": round(sorted(secs)[len(secs) // 2], 2) if secs else None,
           "block_seconds_mean": round(sum(secs) / len(secs), 2) if secs else None,
           "block_seconds": secs, "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    print(json.dumps({k: v for k, v in row.items() if k != "block_seconds"}), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="mamba2-1.3b,mamba2-2.7b,mamba2-8b")
    p.add_argument("--methods", default="dsq,qmamba")
    p.add_argument("--in-memory", default="mamba2-1.3b", help="shapes also run in memory ('' for none)")
    p.add_argument("--dir", default=str(Path.home() / ".cache" / "qmamba" / "bench-ckpts"))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--esr-nsamples", type=int, default=4)
    p.add_argument("--esr-seqlen", type=int, default=128)
    p.add_argument("--esr-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-low-memory", action="store_true", help="run only the in-memory rows")
    p.add_argument("--delete-checkpoints", action="store_true", help="remove each checkpoint after its runs")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--child", choices=("low-memory", "in-memory"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from qmamba.utils.io import atomic_write_json

    doc = json.loads(args.json.read_text()) if args.json.is_file() else {}
    doc.update(command=" ".join(["python", "benchmarks/quantize_past_ram.py", *sys.argv[1:]]),
               settings={k: getattr(args, k) for k in ("nsamples", "calib_seqlen", "esr_nsamples", "esr_seqlen",
                                                       "esr_epochs", "threads")},
               config="w8a8h4", dtype="float32", cpus=os.cpu_count(),
               mem_total_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1))
    rows = doc.setdefault("rows", [])
    for shape in args.shapes.split(","):
        t0 = time.time()
        ckpt = write_checkpoint(shape, Path(args.dir) / shape)
        doc.setdefault("checkpoints", {})[shape] = {
            "bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
            "files": len(list(ckpt.glob("*.safetensors"))), "write_seconds": round(time.time() - t0, 1)}
        paths = [("low-memory", m) for m in args.methods.split(",") if not args.skip_low_memory] + \
                [("in-memory", m) for m in args.methods.split(",") if shape in args.in_memory.split(",")]
        for path, method in paths:
            row = run_one(args, shape, method, path, ckpt)
            rows[:] = [r for r in rows if (r["shape"], r["method"], r["path"]) != (shape, method, path)] + [row]
            atomic_write_json(args.json, doc)
        if args.delete_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
