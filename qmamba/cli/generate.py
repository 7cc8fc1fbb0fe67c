"""`qmamba generate [MODEL] --prompt TEXT`: print the prompt and its continuation.

Greedy by default; --temperature T (> 0) samples, optionally from the --top-k logits, with
--seed for a reproducible draw. A quantized model runs as integers (`--exec int`, the default:
int8 products and the packed state, as `qmamba bench` times it) or through dequantized weights
(`--exec sim`, the path evaluations use; the two differ by float rounding only).
"""

from __future__ import annotations

import argparse
import math

import torch

from .common import add_model_args, add_quant_args, load_model
from ..errors import QMambaError
from ..generate import generate


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="continue a prompt with a model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="default 50")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="sample from softmax(logits / T); 0 is greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, help="seed of the sampling")
    p.add_argument("--exec", choices=("int", "sim"), default="int", dest="exec_mode",
                   help="a quantized model's linears: integer products (default) or dequantized weights")
    add_quant_args(p)
    p.set_defaults(func=run)
    return p


MAX_NEW_TOKENS = 1 << 20      # a million tokens: beyond this a run is a typo, not a request


def run(args) -> int:
    if not args.prompt:
        raise QMambaError("--prompt is empty")
    if not math.isfinite(args.temperature):
        raise QMambaError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise QMambaError(f"--max-new-tokens {args.max_new_tokens:,} is more than {MAX_NEW_TOKENS:,}, "
                          "the most one run generates")
    loaded = load_model(args)
    tok = loaded.tokenizer
    if tok is None:
        raise QMambaError(f"model {args.model} has no tokenizer; pass --tokenizer PATH")
    ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise QMambaError("the prompt encodes to no tokens")
    from ..quant.execution import set_execution

    set_execution(loaded.model, args.exec_mode)
    out = generate(loaded.model, torch.tensor([ids]), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   eos_token_id=tok.eos_token_id)
    print(args.prompt + tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
    return 0
