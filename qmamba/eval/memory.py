"""Memory as real bytes of real tensors: the model's weights (by dtype) and the recurrent cache
(conv state and SSM state) that the model allocates for a batch, next to the same model and
cache in FP16.

Nothing here is computed from bit counts: weights are the tensors of the model's state dict
(shared tensors counted once), states are the tensors `allocate_cache` returns (int8 / packed
uint8 codes plus float16 scales for a quantized state). For shapes too big to allocate, build the
model on the meta device: meta tensors carry shapes and dtypes, so the same code gives the bytes
the model would allocate (reported with `"meta": true`).

The hybrids' attention layers keep a state that grows with the context (the KV cache, a
`per_token` StateSpec). `context_state_bytes` measures it on the meta device: each such layer
allocates its own cache (float `KVState`, or the integer cache of its KV quantizer) and takes in
`tokens` tokens of meta keys and values, so the bytes are those of the tensors that cache holds
after that many tokens (codes, scales, a float window), whatever its layout.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..errors import QMambaError
from ..models.cache import KVState
from ..models.layer_spec import quantizable_linears
from ..models.lm import MambaLM
from ..quant.checkpoint import SCALE_SUFFIXES

# what the weights are spent on (weight_parts)
WEIGHT_PARTS = ("linears", "embedding", "router", "norms", "other")


def _unique_tensors(model: torch.nn.Module):
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.device.type, t.data_ptr()) if t.device.type != "meta" else id(t)
        if t.device.type != "meta" and t.data_ptr() == 0:
            key = id(t)
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def weight_bytes(model: torch.nn.Module) -> dict:
    """{"total": bytes, "by_dtype": {dtype: bytes}} over the model's state dict."""
    by_dtype: dict[str, int] = defaultdict(int)
    for _, t in _unique_tensors(model):
        by_dtype[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
    return {"total": sum(by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items()))}


def _part_prefixes(model: MambaLM) -> list[tuple[str, str]]:
    """(module path prefix, part), longest prefixes first: each layer's quantizable linears
    (`linear_groups`, with their scales and input quantizers), MoE routers, norms, the embedding
    and the head. A tensor under none of them (the conv, A, D, dt bias, quantization points'
    scales, the state quantizer's) is "other"."""
    out = [("backbone.embeddings.", "embedding"), ("lm_head.", "embedding")]
    for i, mixer in enumerate(model.mixers()):
        prefix = f"backbone.layers.{i}.mixer."
        out += [(f"{prefix}{path}.", "linears") for path in quantizable_linears(mixer)]
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "Router":
            out.append((f"{name}.", "router"))
        elif "Norm" in kind:
            out.append((f"{name}.", "norms"))
    return sorted(out, key=lambda p: -len(p[0]))


def weight_parts(model: MambaLM, fp16: bool = False) -> dict:
    """Bytes of the weights by part (WEIGHT_PARTS): quantizable linears, embedding and head, MoE
    routers, norms, other. `fp16`: every tensor at 2 bytes (for the float reference model)."""
    prefixes = _part_prefixes(model)
    out = dict.fromkeys(WEIGHT_PARTS, 0)
    for name, t in _unique_tensors(model):
        part = next((p for pre, p in prefixes if name.startswith(pre)), "other")
        out[part] += t.numel() * (2 if fp16 else t.element_size())
    return out


def fp16_weight_bytes(model: MambaLM) -> int:
    """Bytes of the float model of the same config with every weight in float16 (the FP16
    reference), counted on a copy built on the meta device."""
    with torch.device("meta"):
        ref = MambaLM(model.config)
    return sum(t.numel() * 2 for _, t in _unique_tensors(ref))


def state_bytes(model: MambaLM, batch: int, device=None) -> dict:
    """Bytes of the cache `model` allocates for `batch` sequences: conv and SSM state."""
    cache = model.allocate_cache(batch, device=device)
    return cache.nbytes()


def fp16_state_bytes(model: MambaLM, batch: int) -> dict:
    """The FP16 reference cache: the shapes every layer declares for its states, in float16."""
    out = {"conv": 0, "ssm": 0}
    for mixer in model.mixers():
        for spec in mixer.states():
            out[spec.kind] = out.get(spec.kind, 0) + batch * spec.numel * 2
    return out


def _fp16_reference(model: MambaLM) -> MambaLM:
    with torch.device("meta"):
        return MambaLM(model.config)


def context_state_bytes(model: MambaLM, batch: int, tokens: int) -> dict:
    """Bytes of the states that grow with the context (the KV cache of attention layers, a
    `per_token` StateSpec) after `batch` sequences of `tokens` tokens, by tensor kind ({"kv": ...})
    and by tensor ({"kv.k": ...}): on the meta device, each layer allocates its cache as the
    model does (`allocate_state`: float, or its KV quantizer's integer cache) and appends
    `tokens` tokens of the shape its StateSpec declares."""
    if tokens < 0 or batch <= 0:
        raise QMambaError(f"context {tokens} and batch {batch}: the context must be >= 0 and the batch > 0")
    dtype = model.backbone.norm_f.weight.dtype
    kv_bits = getattr(model.quant_config, "kv_bits", None)
    by_kind: dict[str, int] = defaultdict(int)
    by_tensor: dict[str, int] = defaultdict(int)
    for mixer in model.mixers():
        specs = [s for s in mixer.states() if s.per_token]
        if not specs:
            continue
        state = mixer.allocate_state(batch, dtype, "meta")
        if kv_bits is not None and type(state) is KVState:
            raise QMambaError(f"{model.quant_config.name}: the attention layers keep a float KV cache "
                              "(no KV quantizer installed), so KV bytes would be FP16's")
        for spec in specs:
            if tokens:
                x = torch.empty(batch, *spec.shape[1:-1], tokens, spec.shape[-1], dtype=dtype, device="meta")
                state.append(x, x)
        for name, t in state.tensors().items():
            n = t.numel() * t.element_size()
            by_kind[name.split(".")[0]] += n
            by_tensor[name] += n
    return {"by_kind": dict(by_kind), "by_tensor": dict(by_tensor)}


def fp16_context_state_bytes(model: MambaLM, batch: int, tokens: int) -> dict:
    """The FP16 reference of `context_state_bytes`: every per-token state the layers declare, in
    float16 ({"kv": 2 bytes x batch x tokens x prod(shape)})."""
    out: dict[str, int] = defaultdict(int)
    for mixer in model.mixers():
        for spec in mixer.states():
            if spec.per_token:
                out[spec.kind] += batch * tokens * math.prod(spec.shape) * 2
    return dict(out)


def context_report(model: MambaLM, batches=(1,), contexts=(4096,)) -> dict:
    """Per context length and batch size: bytes of the weights, the KV cache, the conv state and
    the SSM state, quantized (as allocated) and in FP16, and the share each takes of the total.
    {context: {batch: {"bytes": {...}, "fp16": {...}, "share": {...}, "share_fp16": {...},
    "ratio": total / FP16 total, "kv_tensors": {...}}}}"""
    w = weight_bytes(model)["total"]
    w16 = fp16_weight_bytes(model)
    out = {}
    for ctx in contexts:
        rows = {}
        for b in batches:
            s, s16 = state_bytes(model, b), fp16_state_bytes(model, b)
            kv = context_state_bytes(model, b, ctx)
            kv16 = fp16_context_state_bytes(model, b, ctx)
            q = {"weights": w, "kv": kv["by_kind"].get("kv", 0), "conv": s.get("conv", 0), "ssm": s.get("ssm", 0)}
            f = {"weights": w16, "kv": kv16.get("kv", 0), "conv": s16.get("conv", 0), "ssm": s16.get("ssm", 0)}
            q["total"], f["total"] = sum(q.values()), sum(f.values())
            rows[str(b)] = {
                "bytes": q, "fp16": f,
                "share": {k: v / q["total"] for k, v in q.items() if k != "total"},
                "share_fp16": {k: v / f["total"] for k, v in f.items() if k != "total"},
                "ratio": q["total"] / f["total"], "kv_tensors": kv["by_tensor"],
            }
        out[str(ctx)] = rows
    return out


@torch.no_grad()
def cast_float_weights(model: torch.nn.Module, dtype=torch.float16) -> torch.nn.Module:
    """Cast the model's floating-point weights to `dtype` in place (as deployed), keeping
    quantization scales in float32 and integer tensors as they are."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not name.endswith(SCALE_SUFFIXES):
            t.data = t.data.to(dtype)
    return model


def memory_report(model: MambaLM, batches=(1,), device=None, contexts=()) -> dict:
    """Weights (by dtype and by part) and per-batch state, quantized (as allocated) and FP16
    reference, with ratios; with `contexts` (tokens), also the KV cache of attention layers and
    each part's share per context and batch (`context_report`)."""
    w = weight_bytes(model)
    w16 = fp16_weight_bytes(model)
    meta = next(model.parameters()).device.type == "meta"
    out = {"meta": meta, "weights": {**w, "fp16": w16, "ratio": w["total"] / w16,
                                     "parts": weight_parts(model),
                                     "parts_fp16": weight_parts(_fp16_reference(model), fp16=True)},
           "batches": {}}
    for b in batches:
        s = state_bytes(model, b, device)
        s16 = fp16_state_bytes(model, b)
        st, st16 = sum(s.values()), sum(s16.values())          # every kind of state the layers keep
        tot, tot16 = w["total"] + st, w16 + st16
        out["batches"][str(b)] = {
            "state": {**s, "total": st},
            "state_fp16": {**s16, "total": st16},
            "ssm_ratio": s["ssm"] / s16["ssm"],
            "total": tot, "total_fp16": tot16, "total_ratio": tot / tot16,
        }
    if contexts:
        out["contexts"] = context_report(model, batches, contexts)
    return out
