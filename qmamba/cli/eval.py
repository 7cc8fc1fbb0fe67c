"""`qmamba eval [MODEL] [--ppl FILE] [--tasks NAMES --limit N] [--json OUT]`.

Perplexity on a text file (default: the shipped test text) and, through
`qmamba.eval.tasks.run_tasks`, zero-shot tasks. With neither --ppl nor --tasks it measures
perplexity on the test text, so plain `qmamba eval` evaluates the default reference model.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import time
from pathlib import Path

import torch

from .common import add_model_args, add_quant_args, describe, load_model
from ..errors import QMambaError
from ..utils.io import atomic_write_json, check_output
from ..utils.paths import TEST_TEXT

HARNESS = "qmamba.eval.tasks"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="perplexity on a text file and zero-shot tasks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--ppl", type=Path, metavar="FILE",
                   help=f"UTF-8 text file for perplexity (default when no --tasks: {TEST_TEXT.name})")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="use only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward pass (default 8)")
    # zero-shot tasks: run by qmamba.eval.tasks.run_tasks (lm-eval)
    p.add_argument("--tasks", metavar="NAMES", help="comma-separated zero-shot task names")
    p.add_argument("--limit", type=int, metavar="N", help="at most N examples per task")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--reference", metavar="MODEL",
                   help="float model to measure KL divergence and top-1 agreement against (default: with "
                        "--quant, the float model before quantizing; otherwise none)")
    p.add_argument("--no-kld", action="store_true", help="perplexity only, no comparison with the float model")
    add_quant_args(p)
    p.set_defaults(func=run)
    return p


def run_tasks(model, tokenizer, tasks: list[str], limit) -> dict:
    """Zero-shot tasks through `qmamba.eval.tasks`, when lm-eval is installed."""
    try:
        harness = importlib.import_module(HARNESS)
    except ModuleNotFoundError as e:
        if e.name == HARNESS:
            raise QMambaError("zero-shot tasks are not available yet") from None
        raise QMambaError(f"zero-shot tasks need the package {e.name.split('.')[0]!r}, which is not "
                          "installed (pip install 'qmamba[eval]')") from None
    return harness.run_tasks(model, tokenizer, tasks, limit)


def _metrics(values) -> str:
    """{"acc": 0.51234, ...} -> "acc 0.5123, ..." for the printout."""
    if not isinstance(values, dict):
        return str(values)
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def _check_args(args) -> list[str]:
    """Fail fast, before loading anything, on option mistakes. Returns the task names."""
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise QMambaError("--tasks needs at least one task name")
    if args.limit is not None and not tasks:
        raise QMambaError("--limit applies to --tasks only")
    if args.limit is not None and args.limit < 1:
        raise QMambaError(f"--limit must be positive, got {args.limit}")
    if args.seqlen < 2:
        raise QMambaError(f"--seqlen must be at least 2 (one token predicted per window), got {args.seqlen}")
    if args.batch_size < 1:
        raise QMambaError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise QMambaError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.ppl is not None and not args.ppl.is_file():
        what = "is a folder, not a file" if args.ppl.is_dir() else "does not exist"
        raise QMambaError(f"text file {args.ppl} {what}")
    if args.json is not None:
        check_output(args.json, "--json")
    if args.reference is not None and args.no_kld:
        raise QMambaError("--reference and --no-kld contradict each other")
    return tasks


def _check_window_size(args, n_tokens: int, vocab: int) -> None:
    """One forward pass holds (batch, seqlen, vocab) float32 logits and their log-softmax."""
    from ..models.budget import check_bytes

    n = n_tokens if args.max_tokens is None else min(n_tokens, args.max_tokens)
    b = min(args.batch_size, max(1, n // args.seqlen))
    check_bytes(2 * b * args.seqlen * vocab * 4, f"one forward pass of {b:,} window(s) of --seqlen {args.seqlen:,} "
                                                 f"(--batch-size {args.batch_size:,}), logits over a vocabulary "
                                                 f"of {vocab:,},", args.device)


def _reference_of(args, loaded, ids):
    """The float reference model named by --reference, evaluated on the same windows."""
    from ..api import load
    from ..eval.kld import fp_reference

    other = load(args.reference, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if other.model.quant_state is not None:
        raise QMambaError(f"--reference {args.reference} is a quantized model; give the float one")
    if other.model.config.vocab_size != loaded.model.config.vocab_size:
        raise QMambaError(f"--reference {args.reference} has a vocabulary of {other.model.config.vocab_size:,}, "
                          f"the model {loaded.model.config.vocab_size:,}: not the same model family")
    return fp_reference(other.model, ids, args.seqlen, args.max_tokens, args.batch_size, progress=True)


def run(args) -> int:
    from .._version import __version__
    from ..eval.kld import evaluate_against, fp_reference
    from ..eval.perplexity import perplexity, tokenize_text_file

    tasks = _check_args(args)
    ppl_file = args.ppl
    if ppl_file is None and not tasks:
        ppl_file = TEST_TEXT                  # neither --ppl nor --tasks: the shipped test text
    t0 = time.perf_counter()
    ref, ids = None, None

    def text_ids(lm):
        out = tokenize_text_file(ppl_file, lm.tokenizer)
        _check_window_size(args, len(out), lm.model.config.vocab_size)
        return out

    def keep_reference(float_loaded):              # with --quant: the float model, before quantizing
        nonlocal ref, ids
        if ppl_file is not None and not args.no_kld and args.reference is None:
            ids = text_ids(float_loaded)
            ref = fp_reference(float_loaded.model, ids, args.seqlen, args.max_tokens, args.batch_size,
                               progress=True)

    loaded = load_model(args, before_quantize=keep_reference)
    if loaded.tokenizer is None:
        raise QMambaError(f"model {args.model} has no tokenizer; pass --tokenizer PATH")
    result = {
        "model": loaded.name, "model_path": str(loaded.path), "format": loaded.format,
        "dtype": args.dtype, "device": args.device,
        "qmamba_version": __version__, "torch_version": torch.__version__,
        "python_version": platform.python_version(), "load_seconds": round(time.perf_counter() - t0, 3),
    }
    q = loaded.model.quant_config
    if q is not None:
        result["quantization"] = {"method": loaded.model.quant_method, **q.to_dict()}
    print(f"{describe(loaded)}; {args.dtype} on {args.device}")
    t1 = time.perf_counter()
    if ppl_file is not None:
        if ids is None:
            ids = text_ids(loaded)
        if args.reference is not None:
            ref = _reference_of(args, loaded, ids)
            result["reference"] = args.reference
        if ref is None:
            ppl = perplexity(loaded.model, ids, seqlen=args.seqlen, max_tokens=args.max_tokens,
                             batch_size=args.batch_size)
        else:                                   # one pass gives perplexity and the distance to float
            dist = evaluate_against(loaded.model, ref, args.batch_size, progress=True)
            ppl = {"perplexity": dist["perplexity"]["value"], "perplexity_ci95": dist["perplexity"]["ci95"],
                   "nll": math.log(dist["perplexity"]["value"]), "tokens": dist["tokens"],
                   "windows": dist["windows"], "seqlen": args.seqlen, "text_tokens": len(ids)}
            result.update({k: dist[k] for k in ("kld", "top1_agreement", "rms_delta_p", "ppl_ratio")})
            result["kld_reference"] = dist["reference"]
            result["window_sums"] = dist["window_sums"]
        result.update(file=str(ppl_file), max_tokens=args.max_tokens, **ppl)
        print(f"perplexity {ppl['perplexity']:.4f} (nll {ppl['nll']:.4f}) on {Path(ppl_file).name}: "
              f"{ppl['tokens']:,} predicted tokens in {ppl['windows']} windows of {ppl['seqlen']}")
        if ref is not None:
            k, a = result["kld"], result["top1_agreement"]
            print(f"vs float: KL divergence {k['mean']:.5f} [{k['ci95'][0]:.5f}, {k['ci95'][1]:.5f}] "
                  f"(median {k['median']:.5f}, p99 {k['p99']:.4f}); top-1 agreement {a['value'] * 100:.2f}% "
                  f"[{a['ci95'][0] * 100:.2f}, {a['ci95'][1] * 100:.2f}]; perplexity ratio "
                  f"{result['ppl_ratio']['value']:.4f}; 95% intervals over windows")
    if tasks:
        result["tasks"] = run_tasks(loaded.model, loaded.tokenizer, tasks, args.limit)
        result["limit"] = args.limit
        for name, value in result["tasks"].items():
            print(f"{name}: {_metrics(value)}")
    result["seconds"] = round(time.perf_counter() - t1, 3)
    print(f"done in {result['seconds']:.1f} s")
    if args.json is not None:
        atomic_write_json(args.json, result)
        print(f"results written to {args.json}")
    return 0
