"""One row of a comparison: quantize a copy of a float model with a method and config, then
measure test perplexity (exact per-token state semantics), proxy-task accuracy, memory and the
quantization time. Shared by `qmamba compare` and the benchmark scripts, so every table in the
README is produced by the same code."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..models.lm import MambaLM
from .memory import cast_float_weights, context_state_bytes, fp16_context_state_bytes, memory_report
from .perplexity import perplexity

FP = "fp"
FLOAT_NAMES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16", torch.float64: "FP64"}
# what the memory figures are: an estimate from shapes, of the deployed form, not a measurement
MEMORY_BASIS = ("weights + state at batch {batch}{context} of the deployed form (integer codes and scales as "
                "stored, float parts counted in FP16), computed from the shapes on a meta-device copy, not measured")


def memory_basis(batch: int, context: int = 0) -> str:
    return MEMORY_BASIS.format(batch=batch, context=f" (KV cache after {context:,} tokens)" if context else "")


def float_config(model: MambaLM) -> str:
    """The float baseline's label: the dtype its weights are held and its matmuls computed in
    (FP32 for a model loaded with the default dtype), not the FP16 of the memory comparison."""
    dtype = next(model.parameters()).dtype
    return FLOAT_NAMES.get(dtype, str(dtype).removeprefix("torch.").upper())


@dataclass
class EvalSetup:
    test_ids: torch.Tensor                # the tokenized test text
    calib_ids: Optional[torch.Tensor]     # (N, L) calibration windows
    seqlen: int = 1024
    max_tokens: Optional[int] = None
    tasks: tuple = ("cloze_proxy", "nextsent_proxy")
    limit: Optional[int] = None
    batch_size: int = 16
    memory_batch: int = 1
    memory_context: int = 0               # tokens in the KV cache of attention layers (hybrids)
    progress: bool = False
    test_name: str = "test"               # the name of test_ids in tables
    texts: dict = field(default_factory=dict)     # more held-out texts: name -> token ids
    kld: bool = True                      # compare each row with the float model, text by text
    references: dict = field(default_factory=dict, repr=False)   # name -> the float model's outputs


@dataclass
class Row:
    method: str
    config: str
    options: dict = field(default_factory=dict)
    label: str = ""
    results: dict = field(default_factory=dict)


def memory_of(model: MambaLM, batch: int, context: int = 0) -> dict:
    """Weights + state bytes at `batch` of the deployed form of `model` (float parts in FP16),
    with the KV cache of attention layers (hybrids) after `context` tokens, estimated from the
    shapes of a meta-device copy with the same modules (quantization does not change shapes by
    calibration), not measured on the model itself, vs the FP16 model."""
    from ..methods.checkpoint import build_structure

    meta = build_structure(model.config, model.quant_config, model.quant_method)
    cast_float_weights(meta, torch.float16)
    rep = memory_report(meta, (batch,))
    b = rep["batches"][str(batch)]
    out = {"weights": rep["weights"]["total"], "state": b["state"]["total"], "ssm_state": b["state"]["ssm"],
           "total": b["total"], "total_fp16": b["total_fp16"], "ratio": b["total_ratio"],
           "ssm_ratio": b["ssm_ratio"], "batch": batch, "estimated": True, "basis": memory_basis(batch, context)}
    if context:
        kv = context_state_bytes(meta, batch, context)["by_kind"].get("kv", 0)
        kv16 = fp16_context_state_bytes(meta, batch, context).get("kv", 0)
        out.update(kv=kv, kv_fp16=kv16, context=context, state=out["state"] + kv, total=out["total"] + kv,
                   total_fp16=out["total_fp16"] + kv16)
        out["ratio"] = out["total"] / out["total_fp16"]
    return out


def _distances(model: MambaLM, fp_model: MambaLM, setup: EvalSetup) -> dict:
    """{text: perplexity, KL divergence, top-1 agreement, ... with intervals} against the float
    model, whose outputs are computed once per text and kept in `setup.references`."""
    from .kld import evaluate_against, fp_reference, self_summary

    out = {}
    for name, ids in {setup.test_name: setup.test_ids, **setup.texts}.items():
        ref = setup.references.get(name)
        if ref is None:
            ref = setup.references[name] = fp_reference(fp_model, ids, setup.seqlen, setup.max_tokens,
                                                         setup.batch_size, progress=setup.progress)
        out[name] = (self_summary(ref) if model is fp_model else
                     evaluate_against(model, ref, setup.batch_size, setup.progress))
    return out


def evaluate(model: MambaLM, tokenizer, setup: EvalSetup, fp_model: Optional[MambaLM] = None) -> dict:
    """Perplexity of every text (with the distance to `fp_model` when given and setup.kld) and the
    tasks."""
    out = {}
    t = time.time()
    if setup.kld and fp_model is not None:
        out["texts"] = _distances(model, fp_model, setup)
        main = out["texts"][setup.test_name]
        out.update(perplexity=main["perplexity"]["value"], tokens=main["tokens"])
    else:
        ppl = perplexity(model, setup.test_ids, seqlen=setup.seqlen, max_tokens=setup.max_tokens,
                         batch_size=setup.batch_size, progress=setup.progress)
        out.update(perplexity=ppl["perplexity"], tokens=ppl["tokens"])
    out["ppl_seconds"] = round(time.time() - t, 1)
    if setup.tasks:
        from .tasks import run_tasks

        t = time.time()
        res = run_tasks(model, tokenizer, list(setup.tasks), limit=setup.limit, batch_size=setup.batch_size)
        out["tasks"] = res
        out["task_seconds"] = round(time.time() - t, 1)
    return out


def run_row(fp_model: MambaLM, tokenizer, row: Row, setup: EvalSetup, quantize: Callable) -> dict:
    """Quantize a deep copy of `fp_model` as `row` says (or not, for "fp") and evaluate it.
    `quantize` is `qmamba.quantize` (the API the caller sits on; evaluation sits below it)."""
    res: dict = {"method": row.method, "config": row.config if row.method != FP else float_config(fp_model),
                 "label": row.label or row.method, "options": row.options}
    if row.method == FP:
        model = fp_model
        res["quant_seconds"] = 0.0
    else:
        model = copy.deepcopy(fp_model)
        opts = dict(row.options)
        method_options = opts.pop("method_options", None)
        quantize(model, row.config, calib=setup.calib_ids, method=row.method, progress=setup.progress,
                 method_options=method_options, **opts)
        res["quant_seconds"] = round(model.quant_state.seconds, 1)
        q = model.quant_config
        res["state_quant"], res["state_scale"] = (q.state_quant, q.state_scale) if q.h_bits else (None, None)
        if q.h_bits and q.state_quant == "group":
            res["state_quant"] = f"group{q.state_group_size}"
        if model.quant_state.records is not None:
            res["esr"] = model.quant_state.records
    res.update(evaluate(model, tokenizer, setup, fp_model))
    res["memory"] = memory_of(model, setup.memory_batch, setup.memory_context)
    return res


def headline(task_result: dict) -> Optional[float]:
    """The task's headline accuracy: acc_norm where lm-eval gives it (HellaSwag-style multiple
    choice, as the Mamba papers report it), else acc."""
    if not isinstance(task_result, dict):
        return None
    v = task_result.get("acc_norm")
    return v if v is not None else task_result.get("acc")


def _acc_cell(task_result: dict) -> str:
    """"0.2300 ± 0.042": the headline accuracy and lm-eval's standard error of it."""
    acc = headline(task_result)
    if acc is None:
        return ""
    key = "acc_norm_stderr" if task_result.get("acc_norm") is not None else "acc_stderr"
    se = task_result.get(key)
    return f"{acc:.4f} ± {se:.3f}" if isinstance(se, float) else f"{acc:.4f}"


def mean_acc(res: dict) -> Optional[float]:
    accs = [a for a in map(headline, (res.get("tasks") or {}).values()) if a is not None]
    return sum(accs) / len(accs) if accs else None


def markdown(results: list[dict], fp_ppl: Optional[float] = None) -> str:
    """The comparison as a Markdown table."""
    task_names = sorted({t for r in results for t in (r.get("tasks") or {})})
    head = ["method", "config", "state", "test ppl", "vs FP"] + \
        [f"{t} {'acc_norm' if any('acc_norm' in (r.get('tasks') or {}).get(t, {}) for r in results) else 'acc'}"
         for t in task_names] + ["mean acc", "est. memory (MiB)", "vs FP16 model", "quant time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        state = f"{r['state_quant']} {r['state_scale']}" if r.get("state_quant") else "float"
        delta = f"{(r['perplexity'] / fp_ppl - 1) * 100:+.2f}%" if fp_ppl else ""
        accs = [_acc_cell(r["tasks"][t]) if t in (r.get("tasks") or {}) else "" for t in task_names]
        m = mean_acc(r)
        mem = r["memory"]
        cells = [r["label"], r["config"], state, f"{r['perplexity']:.3f}", delta, *accs,
                 f"{m:.4f}" if m is not None else "", f"{mem['total'] / 2 ** 20:.2f}",
                 f"{mem['ratio'] * 100:.1f}%", f"{r['quant_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if results:
        mem0 = results[0]["memory"]
        lines += ["", f"est. memory: {memory_basis(mem0.get('batch', 1), mem0.get('context', 0))}."]
        if task_names:
            lines.append("Accuracies: value ± standard error over the task's items.")
    return "\n".join(lines)


def distance_markdown(results: list[dict], baseline: Optional[str] = None) -> str:
    """Per held-out text: perplexity vs the float model, mean KL divergence to it and top-1
    agreement with their 95% intervals over windows. With `baseline` (a row label), a KLD marked
    * differs from that row's at the same config beyond the 95% interval of the paired difference (same windows)."""
    from .kld import paired_interval, significant

    rows = [r for r in results if r.get("texts")]
    if not rows:
        return ""
    names = list(rows[0]["texts"])
    bases = {}                            # the baseline row of each config (the first one seen)
    for r in rows:
        if r["label"] == baseline:
            bases.setdefault(r["config"], r)
    head = ["method", "config"]
    for n in names:
        head += [f"{n}: ppl vs FP", f"{n}: KLD [95% CI]", f"{n}: top-1 agree"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["config"]]
        for n in names:
            t = r["texts"][n]
            ratio, k, a = t["ppl_ratio"], t["kld"], t["top1_agreement"]
            mark = ""
            base = bases.get(r["config"])
            if (base is not None and r is not base and r["method"] != FP
                    and significant(paired_interval(t, base["texts"][n]))):
                mark = "*"
            cells += [f"{(ratio['value'] - 1) * 100:+.2f}%",
                      f"{k['mean']:.4f}{mark} [{k['ci95'][0]:.4f}, {k['ci95'][1]:.4f}]",
                      f"{a['value'] * 100:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    t0 = rows[0]["texts"]
    lines += ["", "Texts: " + "; ".join(f"{n} ({t0[n]['tokens']:,} predicted tokens, {t0[n]['windows']} windows)"
                                       for n in names) + ". Intervals: bootstrap over windows." +
              (f" * = KLD differs from {baseline}'s at the same config on the same windows (95% paired "
               "interval excludes 0)." if bases else "")]
    return "\n".join(lines)
