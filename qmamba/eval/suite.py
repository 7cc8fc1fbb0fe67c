"""One row of a comparison: quantize a copy of a float model with a method and config, then
measure test perplexity (exact per-token state semantics), proxy-task accuracy, memory and the
quantization time. Shared by `qmamba compare` and the benchmark scripts, so every table in the
README is produced by the same code."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..models.lm import MambaLM
from .memory import cast_float_weights, memory_report
from .perplexity import perplexity

FP = "fp"
FLOAT_NAMES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16", torch.float64: "FP64"}
# what the memory figures are: an estimate from shapes, of the deployed form, not a measurement
MEMORY_BASIS = ("weights + state at batch {batch} of the deployed form (integer codes and scales as stored, "
                "float parts counted in FP16), computed from the shapes on a meta-device copy, not measured")


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
    progress: bool = False


@dataclass
class Row:
    method: str
    config: str
    options: dict = field(default_factory=dict)
    label: str = ""
    results: dict = field(default_factory=dict)


def memory_of(model: MambaLM, batch: int) -> dict:
    """Weights + state bytes at `batch` of the deployed form of `model` (float parts in FP16),
    estimated from the shapes of a meta-device copy with the same modules (quantization does not
    change shapes by calibration), not measured on the model itself, vs the FP16 model."""
    from ..quant.checkpoint import quantize_structure

    with torch.device("meta"):
        meta = MambaLM(model.config)
        q = getattr(model, "quant_config", None)
        if q is not None:
            quantize_structure(meta, q, model.quant_method)
    cast_float_weights(meta, torch.float16)
    rep = memory_report(meta, (batch,))
    b = rep["batches"][str(batch)]
    return {"weights": rep["weights"]["total"], "state": b["state"]["total"], "ssm_state": b["state"]["ssm"],
            "total": b["total"], "total_fp16": b["total_fp16"], "ratio": b["total_ratio"],
            "ssm_ratio": b["ssm_ratio"], "batch": batch, "estimated": True,
            "basis": MEMORY_BASIS.format(batch=batch)}


def evaluate(model: MambaLM, tokenizer, setup: EvalSetup) -> dict:
    out = {}
    t = time.time()
    ppl = perplexity(model, setup.test_ids, seqlen=setup.seqlen, max_tokens=setup.max_tokens,
                     batch_size=setup.batch_size, progress=setup.progress)
    out.update(perplexity=ppl["perplexity"], tokens=ppl["tokens"], ppl_seconds=round(time.time() - t, 1))
    if setup.tasks:
        from .harness import run_tasks

        t = time.time()
        res = run_tasks(model, tokenizer, list(setup.tasks), limit=setup.limit, batch_size=setup.batch_size)
        out["tasks"] = res
        out["task_seconds"] = round(time.time() - t, 1)
    return out


def run_row(fp_model: MambaLM, tokenizer, row: Row, setup: EvalSetup) -> dict:
    """Quantize a deep copy of `fp_model` as `row` says (or not, for "fp") and evaluate it."""
    from ..quantize import quantize

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
        res["quant_seconds"] = round(model.quant_seconds, 1)
        q = model.quant_config
        res["state_quant"], res["state_scale"] = (q.state_quant, q.state_scale) if q.h_bits else (None, None)
        if q.h_bits and q.state_quant == "group":
            res["state_quant"] = f"group{q.state_group_size}"
        if hasattr(model, "esr_records"):
            res["esr"] = model.esr_records
    res.update(evaluate(model, tokenizer, setup))
    res["memory"] = memory_of(model, setup.memory_batch)
    return res


def headline(task_result: dict) -> Optional[float]:
    """The task's headline accuracy: acc_norm where lm-eval gives it (HellaSwag-style multiple
    choice, as the Mamba papers report it), else acc."""
    if not isinstance(task_result, dict):
        return None
    v = task_result.get("acc_norm")
    return v if v is not None else task_result.get("acc")


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
        accs = [f"{headline(r['tasks'][t]):.4f}" if t in (r.get("tasks") or {}) else "" for t in task_names]
        m = mean_acc(r)
        mem = r["memory"]
        cells = [r["label"], r["config"], state, f"{r['perplexity']:.3f}", delta, *accs,
                 f"{m:.4f}" if m is not None else "", f"{mem['total'] / 2 ** 20:.2f}",
                 f"{mem['ratio'] * 100:.1f}%", f"{r['quant_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if results:
        lines += ["", f"est. memory: {MEMORY_BASIS.format(batch=results[0]['memory'].get('batch', 1))}."]
    return "\n".join(lines)
