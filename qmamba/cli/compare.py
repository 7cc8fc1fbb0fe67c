"""`qmamba compare`: the whole story side by side. With no arguments: ref-mamba2 at W8A8H4 with
FP, rtn, smoothquant, quamba, the strong baseline (rtn with dynamic per-channel state scales),
dsq and qmamba; for each, test perplexity with the state re-quantized after every token, the
two proxy-task accuracies, estimated memory (weights + state at batch 1 of the deployed form,
from the shapes, vs an FP16 model) and quantization time. The float row is labelled with the dtype
it is computed in (FP32 by default). Each row is also compared with the float model on the test
text and on out-of-domain texts: KL divergence, top-1 agreement and perplexity ratio, with 95%
intervals, and whether a row's KL divergence differs from the baseline row's (dsq) at the same
config. On a hybrid (attention layers, e.g. `qmamba compare ref-hybrid`) every method runs at
W8A8H4, W8A8H4KV8 and W8A8H4KV4, and the memory counts the KV cache after one window (--seqlen).
Prints Markdown tables; --json and --plot write the results and a plot.

Every method sees the same calibration windows and the same evaluation data.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ..errors import QMambaError
from ..utils.io import atomic_write_json, check_output
from ..utils.paths import HELDOUT_TEXTS, TEST_TEXT
from .common import add_method_option_args, add_model_args, check_calibration_size, given_method_options

log = logging.getLogger("qmamba")

# name -> (method, QuantConfig options): the rows of the comparison
ROWS = {
    "fp": ("fp", {}),
    "rtn": ("rtn", {}),
    "smoothquant": ("smoothquant", {}),
    "quamba": ("quamba", {}),
    "rtn-channel": ("rtn", {"state_quant": "channel", "state_scale": "dynamic"}),
    "dsq": ("dsq", {}),
    "qmamba": ("qmamba", {}),
    # ablation rows: {per-tensor, DSQ} state x {no ESR, ESR}, and static DSQ (no per-write scale)
    "esr-tensor": ("qmamba", {"state_quant": "tensor", "state_scale": "static"}),
    "dsq-static": ("dsq", {"state_scale": "static"}),
    "qmamba-static": ("qmamba", {"state_scale": "static"}),
    # static DSQ with stochastic rounding of the state writes (seeded), without and with ESR
    "dsq-static-sr": ("dsq", {"state_scale": "static", "state_rounding": "stochastic"}),
    "qmamba-static-sr": ("qmamba", {"state_scale": "static", "state_rounding": "stochastic"}),
    # finer dynamic state scales: one per channel and group of --state-group-size state indices
    "dsq-group": ("dsq", {"state_quant": "group"}),
    "qmamba-group": ("qmamba", {"state_quant": "group"}),
}
DEFAULT_METHODS = "fp,rtn,smoothquant,quamba,rtn-channel,dsq,qmamba"
HYBRID_CONFIGS = ("w8a8h4", "w8a8h4kv8", "w8a8h4kv4")     # the default configs of a model with attention
# out-of-domain test texts (scripts/build_heldout.py): never seen in training, never used for a choice
HELDOUT = HELDOUT_TEXTS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="FP vs every method: perplexity, accuracy, memory, time",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--config", action="append", metavar="CONFIG",
                   help="WxAyHz[KVk] config; repeat for several (default w8a8h4; on a hybrid, with attention "
                        "layers: w8a8h4, w8a8h4kv8 and w8a8h4kv4)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated rows among {', '.join(ROWS)} (default: {DEFAULT_METHODS})")
    p.add_argument("--ppl", type=Path, metavar="FILE", help="test text (default: the shipped test text)")
    p.add_argument("--seqlen", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--max-tokens", type=int, default=32768, metavar="N",
                   help="perplexity on the first N tokens of the test text (default %(default)s; 0 = all)")
    p.add_argument("--tasks", default="cloze_proxy,nextsent_proxy", help="zero-shot tasks ('' for none)")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="first N items of each task (default %(default)s; 0 = all)")
    p.add_argument("--calib", type=Path, metavar="FILE", help="calibration text (default: the validation text)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--state-group-size", type=int, default=8, metavar="G",
                   help="state indices per scale in the *-group rows (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", default="ood-drama,ood-tech", metavar="NAMES",
                   help="more held-out texts, compared with the float model like the test text: shipped "
                        f"out-of-domain ones ({', '.join(HELDOUT)}) or file paths, comma-separated "
                        "(default %(default)s; '' for none)")
    p.add_argument("--text-max-tokens", type=int, default=16384, metavar="N",
                   help="tokens used of each of --texts (default %(default)s)")
    p.add_argument("--baseline", default="dsq", metavar="ROW",
                   help="row whose KL divergence the others are tested against, text by text (default %(default)s)")
    p.add_argument("--no-kld", action="store_true", help="perplexity only, no comparison with the float model")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch (default 16)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write all results as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="write a PNG: perplexity vs memory, and KL divergence per text, per method")
    add_method_option_args(p, rows=True)
    p.set_defaults(func=run)
    return p


def _rows(args) -> list[str]:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in ROWS]
    if bad or not names:
        raise QMambaError(f"unknown row(s) {', '.join(bad) or '(none)'} in --methods; choose among {', '.join(ROWS)}")
    return names


def _texts(spec: str) -> dict[str, Path]:
    """--texts 'ood-drama,ood-tech,my.txt' -> {name: path}, every file checked before loading."""
    out = {}
    for item in (t.strip() for t in spec.split(",")):
        if not item:
            continue
        path = HELDOUT.get(item, Path(item))
        if not path.is_file():
            raise QMambaError(f"--texts: {item!r} is neither a shipped text ({', '.join(HELDOUT)}) nor a file")
        out[item if item in HELDOUT else path.stem] = path
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [n for n in (results[0].get("texts") or {})] if results else []
    many = len(results) > 8               # a legend instead of labels beside points that overlap
    width = (13 if texts else 7) + (0.35 * (len(results) - 8) if many else 0)
    fig, axes = plt.subplots(1, 2 if texts else 1, figsize=(width, 5.5 if many else 4.5), squeeze=False)
    ax = axes[0, 0]
    markers = "osD^v<>pXh*"
    for i, r in enumerate(results):
        x, y = r["memory"]["total"] / 2 ** 20, r["perplexity"]
        ax.scatter(x, y, s=40, marker=markers[i % len(markers)] if many else "o", label=f"{r['label']} {r['config']}")
        if not many:
            ax.annotate(f"{r['label']} {r['config']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if many:
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("estimated memory at batch 1: weights + state (MiB; from shapes, float parts as FP16)")
    ax.set_ylabel("test perplexity (state re-quantized every token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if texts:                            # KL divergence to the float model, per text, with intervals
        ax = axes[0, 1]
        quantized = [r for r in results if r["method"] != "fp"]
        width = 0.8 / len(texts)
        for j, name in enumerate(texts):
            xs = [i + (j - (len(texts) - 1) / 2) * width for i in range(len(quantized))]
            k = [r["texts"][name]["kld"] for r in quantized]
            ax.bar(xs, [v["mean"] for v in k], width, label=name,
                   yerr=[[v["mean"] - v["ci95"][0] for v in k], [v["ci95"][1] - v["mean"] for v in k]], capsize=2)
        ax.set_xticks(range(len(quantized)), [f"{r['label']}\n{r['config']}" for r in quantized], fontsize=7,
                      rotation=60 if many else 0, ha="right" if many else "center")
        ax.set_yscale("log")
        ax.set_ylabel("KL divergence to the float model (nats/token, 95% CI)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=130)
        tmp.replace(path)
    except BaseException:                # no half-written hidden file left behind
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _row_options(args, names: list[str]) -> dict[type, dict]:
    """{options dataclass: options} from the method option flags (--esr-*, ...), for every row
    whose method takes that options dataclass; an error if no row in --methods does."""
    from ..methods import get_method

    given = given_method_options(args)
    takes = {cls: [n for n in ROWS if ROWS[n][0] != "fp" and get_method(ROWS[n][0]).options is cls]
             for cls in given}
    for cls, rows in takes.items():
        if not any(n in rows for n in names):
            raise QMambaError(f"--{cls.cli_prefix}-* flags need a row with {cls.cli_title} in --methods "
                              f"({', '.join(rows)})")
        cls(**given[cls])                     # a bad value fails now, not after the first rows
    return given


def run(args) -> int:
    from .._version import __version__
    from ..api import load
    from ..eval.perplexity import tokenize_text_file
    from ..eval.suite import EvalSetup, Row, distance_markdown, float_config, markdown, run_row
    from ..methods import get_method
    from ..quant.calibrate import calibration_ids
    from ..quant.config import QuantConfig
    from ..quantize import quantize

    names = _rows(args)
    given = _row_options(args, names)
    configs = [QuantConfig.parse(c).name for c in args.config or ["w8a8h4"]]    # canonical: W8A8H4
    if args.seqlen < 2 or args.nsamples < 1 or args.limit < 0 or args.max_tokens < 0 or args.state_group_size < 1:
        raise QMambaError("--seqlen must be >= 2, --nsamples and --state-group-size >= 1, --limit and --max-tokens >= 0")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output(path, flag)
    check_calibration_size(args.nsamples, args.calib_seqlen)
    texts = {} if args.no_kld else _texts(args.texts)
    if args.text_max_tokens < 2:
        raise QMambaError(f"--text-max-tokens must be at least 2, got {args.text_max_tokens}")
    t0 = time.time()
    loaded = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if loaded.model.quant_state is not None:
        raise QMambaError("compare needs a float model; this one is already quantized")
    if loaded.tokenizer is None:
        raise QMambaError(f"model {args.model} has no tokenizer; pass --tokenizer PATH")
    kv_layers = any(spec.per_token for mixer in loaded.model.mixers() for spec in mixer.states())
    if kv_layers and not args.config:     # a hybrid: the KV cache too, at 8 and 4 bits
        configs = [QuantConfig.parse(c).name for c in HYBRID_CONFIGS]
    tasks = tuple(t for t in args.tasks.split(",") if t.strip())
    setup = EvalSetup(
        test_ids=tokenize_text_file(args.ppl or TEST_TEXT, loaded.tokenizer),
        calib_ids=calibration_ids(loaded.tokenizer, args.calib, args.nsamples, args.calib_seqlen, args.seed),
        seqlen=args.seqlen, max_tokens=args.max_tokens or None, tasks=tasks, limit=args.limit or None,
        batch_size=args.batch_size, kld=not args.no_kld, memory_context=args.seqlen if kv_layers else 0,
        texts={name: tokenize_text_file(path, loaded.tokenizer)[:args.text_max_tokens] for name, path in texts.items()})
    rows = []
    for name in names:
        method, opts = ROWS[name]
        if method == "fp":
            rows.append(Row(method, float_config(loaded.model), {}, label=name))
        else:
            if opts.get("state_quant") == "group":
                opts = {**opts, "state_group_size": args.state_group_size}
            extra = given.get(get_method(method).options)
            if extra:
                opts = {**opts, "method_options": {**opts.get("method_options", {}), **extra}}
            rows.extend(Row(method, c, {**opts, "seed": args.seed}, label=name) for c in configs)
    results = []
    for row in rows:
        t = time.time()
        print(f"[{len(results) + 1}/{len(rows)}] {row.label} {row.config}...", flush=True)
        res = run_row(loaded.model, loaded.tokenizer, row, setup, quantize)
        res["seconds"] = round(time.time() - t, 1)
        results.append(res)
        print(f"    ppl {res['perplexity']:.3f}, est. memory {res['memory']['total'] / 2 ** 20:.2f} MiB "
              f"({res['memory']['ratio'] * 100:.1f}% of an FP16 model), {res['seconds']:.0f} s", flush=True)
    fp = next((r["perplexity"] for r in results if r["method"] == "fp"), None)
    table = markdown(results, fp)
    distances = distance_markdown(results, args.baseline)
    scope = (f"{loaded.name}; perplexity: {results[0]['tokens']:,} tokens of "
             f"{Path(args.ppl or TEST_TEXT).name} in windows of {args.seqlen}; tasks: "
             f"{', '.join(tasks) or 'none'}" + (f" (first {args.limit} items each)" if args.limit else "") +
             f"; calibration {args.nsamples} x {args.calib_seqlen} tokens; memory estimated at batch 1" +
             (f" with {args.seqlen:,} tokens in the KV cache" if kv_layers else ""))
    print()
    print(table)
    if distances:
        print("\nAgainst the float model, text by text:\n")
        print(distances)
    print(f"\n{scope}; total {time.time() - t0:.0f} s")
    if args.json:
        atomic_write_json(args.json, {"model": loaded.name, "scope": scope, "qmamba_version": __version__,
                                      "torch_version": torch.__version__, "results": results,
                                      "markdown": table, "distance_markdown": distances, "seconds": round(time.time() - t0, 1)})
    if args.plot:
        try:
            plot(results, args.plot, scope if len(scope) < 90 else loaded.name)
        except OSError as e:
            raise QMambaError(f"cannot write --plot {args.plot}: {e.strerror or e}") from None
    return 0
