"""Benchmark of qmamba's `MambaLM` against transformers' pure-PyTorch Mamba / Mamba2 forward on
CPU, at the shapes of real checkpoints with random weights, float32, batch 1.

    python benchmarks/bench_models.py                     # mamba-130m and mamba2-130m, 512 and 2048 tokens
    python benchmarks/bench_models.py --tiny              # 2-layer shrunken shapes: a smoke test in seconds
    python benchmarks/bench_models.py --shapes mamba2-130m --lengths 512 --reps 5 --json bench.json

For each shape a transformers model (`MambaForCausalLM` / `Mamba2ForCausalLM`) is built with
transformers' random init and ITS state dict is loaded into ours, so both compute the same
function; their logits are checked to agree (max |diff| / max |logit| <= 1e-3) on a short
prefill and on a few cached decode steps before anything is timed. Measured:

  prefill 1xL   one full forward over L tokens without a cache (ours `model(ids)`, transformers
                `hf(input_ids=ids, use_cache=False)`), median over --reps runs;
  decode        one token through the cache after a --prompt-len token prompt (ours
                `model.step(ids, cache)`, transformers `hf(input_ids=..., cache_params=...,
                use_cache=True, cache_position=...)`): median over --decode-steps steps of each
                rep, then the median over --reps reps.

Every measurement has one untimed warm-up run per implementation first, and the two
implementations are interleaved rep by rep so that a busy machine slows both alike. The ratio is
transformers / ours: above 1 means ours is faster.

The baseline is transformers' CPU path (no mamba_ssm / causal_conv1d kernels on CPU): for Mamba1
`MambaMixer.slow_forward`, a Python loop over time in every layer; for Mamba2
`Mamba2Mixer.torch_forward`, the chunked SSD algorithm, which pads the sequence to a multiple of
chunk_size (256; the 512 and 2048 defaults need no padding, the short parity input does) and
materialises (chunk, 256, 256, heads, d_state) and (chunk, 256, 256, heads, headdim) products:
about 1.2 GB per 256-token chunk and layer at mamba2-130m, so roughly 10 GB of peak memory at
2048 tokens, and much of its time goes to page faults on those buffers. Its decode uses the
single-token recurrent branch of the same functions.

Peak RSS is the process's (VmHWM, `qmamba.eval.timing.peak_rss`) after each row, so it is
cumulative over the run and covers both models; use it as an upper bound, not a
per-implementation number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from qmamba.eval.timing import peak_rss, timed
from qmamba.models.config import ModelConfig, from_hf_dict
from qmamba.models.lm import MambaLM
from qmamba.models.shapes import SHAPES, shape_config

TOLERANCE = 1e-3
PARITY_LEN, PARITY_DECODE = 24, 4
DEFAULT_LENGTHS, TINY_LENGTHS = "512,2048", "64,200"     # 200: not a multiple of the tiny chunk_size
TINY = dict(d_model=64, n_layer=2, vocab_size=1000)      # d_state, headdim kept; chunk_size shrunk
TINY_CHUNK = 32


# ------------------------------------------------------------------------------------ models
def model_config(name: str, tiny: bool) -> ModelConfig:
    """The named checkpoint shape, or its 2-layer shrunken version."""
    if not tiny:
        return shape_config(name)
    shape = {**SHAPES[name], **TINY}
    if shape["arch"] == "mamba2":
        shape["chunk_size"] = TINY_CHUNK
    return ModelConfig(**shape)


def hf_model(cfg: ModelConfig, seed: int):
    """The transformers model of the same architecture, randomly initialised."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand,
                  tie_word_embeddings=cfg.tie_embeddings)
    torch.manual_seed(seed)
    if cfg.arch == "mamba1":
        config = transformers.MambaConfig(intermediate_size=cfg.d_inner, time_step_rank=cfg.dt_rank, **common)
        return transformers.MambaForCausalLM(config).eval()
    config = transformers.Mamba2Config(num_heads=cfg.nheads, head_dim=cfg.headdim, n_groups=cfg.ngroups,
                                       chunk_size=cfg.chunk_size, **common)
    return transformers.Mamba2ForCausalLM(config).eval()


ARCH_FIELDS = ("arch", "vocab_size", "d_model", "n_layer", "d_state", "d_conv", "d_inner", "dt_rank",
               "headdim", "ngroups", "chunk_size", "tie_embeddings")


def build_pair(cfg: ModelConfig, seed: int = 0):
    """(ours, transformers) computing the same function: ours built from transformers' config
    and loaded with its state dict."""
    hf = hf_model(cfg, seed)
    ours_cfg = from_hf_dict(hf.config.to_dict())
    wrong = [f for f in ARCH_FIELDS if getattr(ours_cfg, f) != getattr(cfg, f)]
    assert not wrong, f"transformers config does not match the shape in {wrong}"
    ours = MambaLM(ours_cfg)
    ours.load_state_dict(hf.state_dict())
    return ours.eval(), hf


# ------------------------------------------------------------------------- the two contenders
def ours_prefill(model, ids: Tensor) -> Tensor:
    return model(ids)


def hf_prefill(hf, ids: Tensor) -> Tensor:
    return hf(input_ids=ids, use_cache=False).logits


def ours_decoder(model, prompt: Tensor) -> Callable[[Tensor], Tensor]:
    """Prefill `prompt` into a fresh cache; returns step(token (b,)) -> logits (b, vocab)."""
    cache = model.allocate_cache(prompt.shape[0])
    model(prompt, cache=cache)
    return lambda tok: model.step(tok, cache)


def hf_decoder(hf, prompt: Tensor) -> Callable[[Tensor], Tensor]:
    """The same through transformers' cache. The prefill call gets no cache_position: the model
    makes its own cache and marks the prefill with arange(conv_kernel). Decode calls must pass
    cache_position, whose first entry > 0 selects the single-token branch (Mamba1 also clamps it
    to conv_kernel - 1 as the conv-state write index, so it must be >= conv_kernel - 1 there)."""
    out = hf(input_ids=prompt, use_cache=True)
    state = dict(cache=out.cache_params, pos=prompt.shape[1])

    def step(tok: Tensor) -> Tensor:
        out = hf(input_ids=tok.view(-1, 1), cache_params=state["cache"], use_cache=True,
                 cache_position=torch.tensor([state["pos"]]))
        state["cache"] = out.cache_params
        state["pos"] += 1
        return out.logits[:, -1]
    return step


# ------------------------------------------------------------------------------------ checks
def rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_parity(ours, hf, vocab: int, seed: int = 1) -> dict:
    """Largest relative logit difference on a short prefill and on cached decode steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, PARITY_LEN + PARITY_DECODE), generator=g)
    prompt, rest = ids[:, :PARITY_LEN], ids[0, PARITY_LEN:]
    prefill = rel_diff(ours_prefill(ours, prompt), hf_prefill(hf, prompt))
    ours_step, hf_step = ours_decoder(ours, prompt), hf_decoder(hf, prompt)
    decode = max(rel_diff(ours_step(t.view(1)), hf_step(t.view(1))) for t in rest)
    for what, diff in (("prefill", prefill), ("decode", decode)):
        if not diff <= TOLERANCE:
            raise SystemExit(f"{what} logits disagree with transformers: max rel diff {diff:.2e} > {TOLERANCE}")
    return dict(prefill=prefill, decode=decode)


# ------------------------------------------------------------------------------------ timing
def timed_ms(fn: Callable[[], object]) -> float:
    return 1e3 * timed(fn)[1]


def time_prefill(models: dict, ids: Tensor, reps: int) -> dict:
    """name -> list of `reps` wall ms of one full forward, after one warm-up, interleaved."""
    runs = {name: (lambda f=fwd, m=model: f(m, ids)) for name, (model, fwd, _) in models.items()}
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(timed_ms(run))
    return times


def time_decode(models: dict, prompt: Tensor, tokens: Tensor, reps: int, warmup: int = 4) -> dict:
    """name -> per rep, the median wall ms of one decode step over the `tokens` (each rep goes
    on from the previous one's state: an SSM step costs the same at every position)."""
    steps = {name: decoder(model, prompt) for name, (model, _, decoder) in models.items()}
    for step in steps.values():
        for tok in tokens[:warmup]:
            step(tok.view(1))
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(statistics.median(timed_ms(lambda t=tok: step(t.view(1))) for tok in tokens))
    return times


def peak_rss_mb() -> float:
    return peak_rss() / 2 ** 20


def row(shape: str, what: str, times: dict) -> dict:
    ours, hf = statistics.median(times["ours"]), statistics.median(times["transformers"])
    return dict(shape=shape, what=what, ours_ms=ours, transformers_ms=hf, ratio=hf / ours,
                ours_reps_ms=times["ours"], transformers_reps_ms=times["transformers"],
                peak_rss_mb=round(peak_rss_mb(), 1))


def bench_shape(name: str, args) -> tuple[list[dict], dict]:
    cfg = model_config(name, args.tiny)
    ours, hf = build_pair(cfg)
    parity = check_parity(ours, hf, cfg.vocab_size)
    print(f"{name}{' (tiny)' if args.tiny else ''}: {ours.num_parameters() / 1e6:.1f}M parameters, "
          f"logits agree (max rel diff prefill {parity['prefill']:.1e}, decode {parity['decode']:.1e})",
          flush=True)
    print(HEADER, flush=True)
    models = {"ours": (ours, ours_prefill, ours_decoder), "transformers": (hf, hf_prefill, hf_decoder)}
    g = torch.Generator().manual_seed(2)
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), generator=g)
        rows.append(row(name, f"prefill 1x{length}", time_prefill(models, ids, args.reps)))
        print_row(rows[-1])
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (args.decode_steps,), generator=g)
    rows.append(row(name, "decode 1 token", time_decode(models, prompt, tokens, args.reps)))
    print_row(rows[-1])
    return rows, dict(config=cfg.to_dict(), parity_max_rel_diff=parity)


# ------------------------------------------------------------------------------------ output
HEADER = f"{'shape':14s} {'what':16s} {'ours ms':>10s} {'transformers ms':>16s} {'ratio':>7s}"


def print_row(r: dict) -> None:
    print(f"{r['shape']:14s} {r['what']:16s} {r['ours_ms']:10.2f} {r['transformers_ms']:16.2f} "
          f"{r['ratio']:7.2f}", flush=True)


def environment(args) -> dict:
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), processor=platform.processor() or platform.machine(),
                platform=platform.platform(), cpu_count=os.cpu_count(), load_avg_at_start=os.getloadavg(),
                tiny=args.tiny, reps=args.reps, decode_steps=args.decode_steps, prompt_len=args.prompt_len,
                lengths=args.lengths)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mamba-130m,mamba2-130m", help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--lengths", default=None,
                    help=f"prefill lengths, comma-separated (default {DEFAULT_LENGTHS}; --tiny: {TINY_LENGTHS})")
    ap.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per rep")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt before decoding (>= 3)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--tiny", action="store_true", help="2-layer shrunken shapes (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers and the environment here")
    args = ap.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    args.lengths = [int(v) for v in (args.lengths or (TINY_LENGTHS if args.tiny else DEFAULT_LENGTHS)).split(",")]
    if args.prompt_len < 3:
        ap.error("--prompt-len must be >= 3 (transformers' Mamba1 decode clamps cache_position to conv_kernel - 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()        # "the fast path is not available" notices
    env = environment(args)
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, "
          f"{env['cpu_count']} cores ({env['processor']}), load {env['load_avg_at_start'][0]:.2f}; "
          f"ratio = transformers / ours (> 1: ours faster)", flush=True)
    rows, shapes = [], {}
    with torch.inference_mode():
        for name in args.shapes:
            shape_rows, shapes[name] = bench_shape(name, args)
            rows += shape_rows
    print(f"\nall rows (median ms; ratio = transformers / ours)\n{HEADER}")
    for r in rows:
        print_row(r)
    print(f"peak RSS {peak_rss_mb():.0f} MB (whole process)")
    if args.json:
        args.json.write_text(json.dumps(dict(environment=env, shapes=shapes, rows=rows), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
