"""Batched decode beside llama.cpp: B sequences decoded together, llama.cpp's Q8_0 model
(`llama-batched-bench`, its GGUF made by its own converter and quantizer, as
`qmamba bench --against llama.cpp` makes it) against qmamba's W8A8H4 model in integer execution
(`python -m qmamba.eval.bench`, a process of its own), on the same model folder, prompt and
generation lengths, in alternating rounds (odd rounds llama.cpp first); medians over rounds.

    python benchmarks/bench_batch_against_llamacpp.py --model mamba2-130m --batch 16 --threads 1,2 --rounds 3 \
        --json benchmarks/results/bench_batch_against_llamacpp.json

Tokens/s are all sequences' decoded tokens per second of decode: llama-batched-bench's `speed_tg`
(B x gen / t_tg: B prompts of `--prompt-len` tokens each, then `--gen-len` steps of B tokens)
and qmamba's B / (median seconds per step). Needs `llama-batched-bench` beside `llama-bench`
(`qmamba bench --against llama.cpp --llama-cpp-build` builds it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from qmamba.cli.bench_child import child_command, run_child
from qmamba.cli.bench_llamacpp import converter_view, machine, model_folder
from qmamba.eval.llamacpp import find_tools, folder_key, gguf_dir, make_ggufs
from qmamba.utils.io import atomic_write_json


def llama_round(tool, gguf, batch: int, prompt_len: int, gen_len: int, threads: int) -> tuple[dict, list]:
    cmd = [str(tool), "-m", str(gguf), "-c", str(batch * (prompt_len + gen_len) + 256), "-b", "2048", "-ub", "512",
           "-npp", str(prompt_len), "-ntg", str(gen_len), "-npl", str(batch), "-np", str(batch), "-t", str(threads),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    row = next(r for r in rows if r.get("pl") == batch)
    return {"decode_tokens_per_second": row["speed_tg"], "prefill_tokens_per_second": row["speed_pp"], "raw": row}, cmd


def qmamba_round(folder, batch: int, prompt_len: int, gen_len: int, threads: int, reps: int) -> tuple[dict, list]:
    kwargs = dict(model_name=str(folder), variant="quant", quant="w8a8h4", method="qmamba", batch=batch,
                  prompt_len=prompt_len, gen_len=gen_len, reps=reps, device_name="cpu", threads=threads,
                  folder=str(folder))
    r = run_child(kwargs)
    return {"decode_tokens_per_second": r["tokens_per_second"],
            "prefill_tokens_per_second": batch * prompt_len / r["prefill_seconds"], "raw": r}, child_command(kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mamba2-130m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="qmamba's repetitions per round (after a warm-up)")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    tools = find_tools()
    batched = tools.bench.parent / "llama-batched-bench"
    if not batched.is_file():
        raise SystemExit(f"no {batched}: build it with `qmamba bench --against llama.cpp --llama-cpp-build`")
    folder, source = model_folder(a.model)
    key = folder_key(folder, tools.converter)
    ggufs, _ = make_ggufs(converter_view(folder, gguf_dir(key)), ["q8_0"], tools, key=key)
    rounds = []
    for r in range(a.rounds):
        for t in threads:
            sides = ("llama.cpp", "qmamba") if r % 2 == 0 else ("qmamba", "llama.cpp")
            for side in sides:
                print(f"round {r + 1}/{a.rounds}, {t} thread(s): {side}", flush=True)
                if side == "llama.cpp":
                    res, cmd = llama_round(batched, ggufs["q8_0"], a.batch, a.prompt_len, a.gen_len, t)
                else:
                    res, cmd = qmamba_round(folder, a.batch, a.prompt_len, a.gen_len, t, a.reps)
                rounds.append({"round": r, "threads": t, "side": side, "command": cmd, **res, "time": time.time()})
    summary = []
    for t in threads:
        for side, variant in (("llama.cpp", "Q8_0"), ("qmamba", "W8A8H4")):
            v = [x["decode_tokens_per_second"] for x in rounds if x["threads"] == t and x["side"] == side]
            summary.append({"threads": t, "side": side, "variant": variant, "batch": a.batch,
                            "decode_tokens_per_second": statistics.median(v), "rounds": v})
    lines = ["| threads | batch | runtime | variant | decode (tok/s, all sequences) | per round |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['threads']} | {s['batch']} | {s['side']} | {s['variant']} | {s['decode_tokens_per_second']:.1f} | "
              + ", ".join(f"{v:.1f}" for v in s["rounds"]) + " |" for s in summary]
    print("\n".join(lines))
    atomic_write_json(a.json, {"schema": "qmamba-batch-against-llama.cpp/1", "model": a.model, "source": source,
                               "folder": str(folder), "batch": a.batch, "prompt_len": a.prompt_len,
                               "gen_len": a.gen_len, "threads": threads, "machine": machine(), "summary": summary,
                               "rounds": rounds, "markdown": "\n".join(lines)})


if __name__ == "__main__":
    main()
