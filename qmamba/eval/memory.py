"""Memory as real bytes of real tensors: the model's weights (by dtype) and the recurrent cache
(conv state and SSM state) that the model allocates for a batch, next to the same model and
cache in FP16.

Nothing here is computed from bit counts: weights are the tensors of the model's state dict
(shared tensors counted once), states are the tensors `allocate_cache` returns (int8 / packed
uint8 codes plus float16 scales for a quantized state). For shapes too big to allocate, build the
model on the meta device: meta tensors carry shapes and dtypes, so the same code gives the bytes
the model would allocate (reported with `"meta": true`).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..models.lm import MambaLM
from ..quant.checkpoint import SCALE_SUFFIXES


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


@torch.no_grad()
def cast_float_weights(model: torch.nn.Module, dtype=torch.float16) -> torch.nn.Module:
    """Cast the model's floating-point weights to `dtype` in place (as deployed), keeping
    quantization scales in float32 and integer tensors as they are."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not name.endswith(SCALE_SUFFIXES):
            t.data = t.data.to(dtype)
    return model


def memory_report(model: MambaLM, batches=(1,), device=None) -> dict:
    """Weights and per-batch state, quantized (as allocated) and FP16 reference, with ratios."""
    w = weight_bytes(model)
    w16 = fp16_weight_bytes(model)
    meta = next(model.parameters()).device.type == "meta"
    out = {"meta": meta, "weights": {**w, "fp16": w16, "ratio": w["total"] / w16}, "batches": {}}
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
    return out
