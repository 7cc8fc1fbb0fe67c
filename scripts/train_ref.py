"""Train a reference model (ref-mamba1 / ref-mamba2 / ref-hybrid) on the training split with qmamba's own
model code: fixed seed, logged loss and validation perplexity, resumable, bounded wall time.

    python scripts/train_ref.py --preset ref-mamba2 --minutes 60 --out runs/ref-mamba2
    python scripts/train_ref.py --preset ref-mamba2 --resume runs/ref-mamba2    # continue

The budget is CPU time: --minutes on a machine of --cores cores (the process's CPU seconds
divided by --cores), so a run gets the same compute whatever else the machine is doing and
however many threads it uses; the wall time is logged beside it.

Inputs: data/train.txt (scripts/build_data.py), the shipped validation text and tokenizer.
Outputs in --out: ckpt.pt (resume state), log.jsonl (one line per log step), and model/ (the
Hugging Face-style folder that ships: config.json, model.safetensors, tokenizer files) written
from the weights with the best validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qmamba.models import MambaLM, ModelConfig, init_weights
from qmamba.models.config import from_hf_dict
from qmamba.models.save import save_model
from qmamba.utils.paths import TOKENIZER_DIR, VALIDATION_TEXT

ROOT = Path(__file__).resolve().parents[1]         # the repository: data/ holds the training split

PRESETS = {
    # Mamba2: d_state 64, 8 heads of 64 channels
    "ref-mamba2": dict(arch="mamba2", d_model=256, n_layer=6, d_state=64, headdim=64, ngroups=1,
                       chunk_size=32, expand=2),
    # Mamba1: d_state 16
    "ref-mamba1": dict(arch="mamba1", d_model=256, n_layer=6, d_state=16, expand=2),
    # a Nemotron-H hybrid, written as its transformers config.json: 8 blocks, Mamba2 (M), MLP (-,
    # squared ReLU) and grouped-query attention (*, no positional encoding), an untied head, as
    # Nemotron-H has (transformers never ties its head to the embedding)
    "ref-hybrid": dict(hf=dict(
        model_type="nemotron_h", architectures=["NemotronHForCausalLM"], hidden_size=256,
        num_hidden_layers=8, hybrid_override_pattern="M-M*-M*-",
        mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64, n_groups=2, expand=2, conv_kernel=4,
        chunk_size=32, use_conv_bias=True, use_bias=False, mamba_hidden_act="silu",
        time_step_limit=[0.0, float("inf")], num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        attention_bias=False, intermediate_size=768, mlp_hidden_act="relu2", mlp_bias=False,
        layer_norm_epsilon=1e-5, residual_in_fp32=False, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=1)),
}


def tokenize_file(path: Path, cache: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    tok_hash = str(os.path.getmtime(TOKENIZER_DIR / "tokenizer.json"))
    meta = cache.with_suffix(".json")
    if cache.exists() and meta.exists() and json.loads(meta.read_text()).get("tok") == tok_hash:
        return np.load(cache)
    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    ids = tok.encode(path.read_text(encoding="utf-8")).ids
    arr = np.asarray(ids, dtype=np.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, arr)
    meta.write_text(json.dumps({"tok": tok_hash}))
    return arr


def lr_at(progress: float, step: int, warmup: int, lr: float, min_ratio: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` * lr at progress 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model: MambaLM, val: torch.Tensor, seqlen: int, max_windows: int) -> float:
    model.eval()
    n = min(max_windows, (len(val) - 1) // seqlen)
    x = val[: n * seqlen + 1]
    total, count = 0.0, 0
    for i in range(0, n, 8):
        j = min(n, i + 8)
        inp = torch.stack([x[k * seqlen:(k + 1) * seqlen] for k in range(i, j)]).long()
        tgt = torch.stack([x[k * seqlen + 1:(k + 1) * seqlen + 1] for k in range(i, j)]).long()
        logits = model(inp)
        total += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum").item()
        count += tgt.numel()
    model.train()
    return total / count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-time budget of training")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--steps", type=int, default=0,
                    help="fixed schedule length in steps (reproducible); 0: follow the --minutes budget")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cores", type=int, default=2, help="cores of the machine the --minutes budget refers to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", type=str, default="{}",
                    help="JSON dict of ModelConfig overrides (config.json keys for ref-hybrid)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train = torch.from_numpy(tokenize_file(ROOT / "data" / "train.txt", ROOT / "data" / "train_ids.npy"))
    val = torch.from_numpy(tokenize_file(VALIDATION_TEXT, ROOT / "data" / "val_ids.npy"))
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")).get_vocab_size()

    preset, override = PRESETS[args.preset], json.loads(args.override)
    if "hf" in preset:                        # a hybrid: its config.json, read as any checkpoint's
        cfg = from_hf_dict({**preset["hf"], "vocab_size": vocab, **override})
    else:
        cfg = ModelConfig(vocab_size=vocab, **{**preset, **override})
    model = init_weights(MambaLM(cfg), seed=args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    state = {"step": 0, "elapsed": 0.0, "wall": 0.0, "tokens": 0, "best_val": float("inf")}
    ckpt_path = args.out / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)", flush=True)
        log_path = args.out / "log.jsonl"          # drop log lines written after the checkpoint
        if log_path.exists():
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= state["step"]]
            log_path.write_text("".join(ln + "\n" for ln in lines))
    print(f"{args.preset}: {model.num_parameters() / 1e6:.2f} M parameters, {len(train)} train tokens, "
          f"{len(val)} validation tokens", flush=True)

    budget = args.minutes * 60
    log = open(args.out / "log.jsonl", "a")
    last_ckpt = time.time()
    model.train()
    threads = torch.get_num_threads()
    cpu_start = time.process_time() - state["elapsed"] * args.cores
    wall_start = time.time() - state.get("wall", 0.0)

    def save_ckpt():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "config": cfg.to_dict(), "args": vars(args) | {"out": str(args.out)}}, tmp)
        os.replace(tmp, ckpt_path)

    while (state["step"] < args.steps) if args.steps else (state["elapsed"] < budget):
        step = state["step"]
        # the schedule follows the wall-time budget, so the run anneals fully whatever the load
        # of the machine; seed and data order are fixed, the step count is not
        progress = state["elapsed"] / budget if not args.steps else step / args.steps
        for gr in opt.param_groups:
            gr["lr"] = lr_at(progress, step, args.warmup, args.lr)
        starts = rng.integers(0, len(train) - args.seqlen - 1, size=args.batch)
        batch = torch.stack([train[s:s + args.seqlen + 1] for s in starts]).long()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        state["step"] += 1
        state["tokens"] += batch[:, :-1].numel()
        state["elapsed"] = (time.process_time() - cpu_start) / args.cores
        state["wall"] = time.time() - wall_start
        rec = {"step": state["step"], "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"],
               "gnorm": round(gnorm, 3), "min": round(state["elapsed"] / 60, 2),
               "wall_min": round(state["wall"] / 60, 2), "tokens": state["tokens"]}
        done = (state["step"] >= args.steps) if args.steps else (state["elapsed"] >= budget)
        if state["step"] % args.eval_every == 0 or done:
            vl = evaluate(model, val, 512, args.eval_windows)
            rec["val_loss"], rec["val_ppl"] = round(vl, 4), round(math.exp(vl), 2)
            if vl < state["best_val"]:
                state["best_val"] = vl
                torch.save(model.state_dict(), args.out / "best.pt")
            print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if time.time() - last_ckpt > 300:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()
    model.load_state_dict(torch.load(args.out / "best.pt", weights_only=True))
    save_model(model, args.out / "model", tokenizer_dir=TOKENIZER_DIR, force=True)
    summary = {"preset": args.preset, "params": model.num_parameters(), "steps": state["step"],
               "tokens": state["tokens"], "minutes": round(state["elapsed"] / 60, 1),
               "wall_minutes": round(state["wall"] / 60, 1), "threads": threads,
               "best_val_ppl_512": round(math.exp(state["best_val"]), 3), "config": cfg.to_dict(),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "args")}), flush=True)


if __name__ == "__main__":
    main()
