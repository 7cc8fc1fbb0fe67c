"""Quantized checkpoints: safetensors with the integer weights and every quantizer's scales,
and a config.json whose `quantization_config` says how to rebuild the modules.

Loading never unpickles classes: the float model is built on the meta device from config.json,
the quantizers are re-installed from `quantization_config` (the same `install_quantizers` and
`quantize_weights` that made them, run on meta tensors, so shapes and dtypes match by
construction), then the tensors are assigned (`load_state_dict(assign=True)`, the gpt-fast
pattern). Reloading gives the same logits bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..errors import QMambaError
from ..models.config import from_hf_dict
from ..models.lm import MambaLM
from ..models.save import save_model, state_dict_for_save
from .apply import install_quantizers, quantize_weights
from .config import FORMAT_VERSION, QuantConfig

QUANT_METHOD = "qmamba"
SCALE_SUFFIXES = ("w_scale", ".scale", "s_n", "static_scale")   # kept in float32 whatever the dtype


def quantization_config(model: MambaLM) -> dict:
    qcfg: QuantConfig = model.quant_config
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "qmamba_version": __version__,
            "method": model.quant_method, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **qcfg.to_dict(), **getattr(model, "quant_meta", {})}


def save_quantized(model: MambaLM, out, tokenizer_dir: Optional[Path] = None, force: bool = False) -> Path:
    """Write a quantized model (integer tensors + scales + float rest) atomically to `out`."""
    if not hasattr(model, "quant_config"):
        raise QMambaError("this model is not quantized; run qmamba.quantize first")
    return save_model(model, out, tokenizer_dir=tokenizer_dir, force=force,
                      extra_config={"quantization_config": quantization_config(model)},
                      tensors=state_dict_for_save(model))


def quantize_structure(model: MambaLM, qcfg: QuantConfig, method: str, qmeta: Optional[dict] = None) -> MambaLM:
    """The modules of a quantized model (quantizers, integer weights rounded from whatever
    weights `model` holds), without calibration: what loading rebuilds before assigning the
    saved tensors, and what the memory report measures (bytes do not depend on calibration)."""
    from ..methods import get_method

    m = get_method(method)
    install_quantizers(model, qcfg)
    if m.restore is not None:
        m.restore(model, qcfg, qmeta or {})
    quantize_weights(model, qcfg)
    model.quant_config, model.quant_method = qcfg, method
    return model


def build_quantized(raw: dict, state_dict: dict, dtype: torch.dtype = torch.float32, device="cpu") -> MambaLM:
    """Rebuild a quantized model from its config.json dict and its tensors."""
    from ..methods import get_method

    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise QMambaError(f"unsupported quantization_config (quant_method {qc.get('quant_method')!r}); "
                          "only checkpoints written by qmamba can be loaded")
    if int(qc.get("format_version", 0)) > FORMAT_VERSION:
        raise QMambaError(f"checkpoint format {qc.get('format_version')} is newer than this qmamba "
                          f"supports ({FORMAT_VERSION}); upgrade qmamba")
    qcfg = QuantConfig.from_dict(qc)
    method = get_method(qc.get("method", "rtn"))
    cfg = from_hf_dict(raw)
    with torch.device("meta"):
        model = quantize_structure(MambaLM(cfg).to(dtype), qcfg, method.name, qc)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise QMambaError(f"quantized checkpoint does not match its config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    for k, t in state_dict.items():
        e = expected[k]
        same_kind = t.dtype == e.dtype if not e.dtype.is_floating_point else t.dtype.is_floating_point
        if k.endswith(SCALE_SUFFIXES):
            same_kind = t.dtype == torch.float32
        if tuple(t.shape) != tuple(e.shape) or not same_kind:
            raise QMambaError(f"tensor {k} has shape {tuple(t.shape)} {t.dtype}, the config expects "
                              f"{tuple(expected[k].shape)} {expected[k].dtype}")
    sd = {k: (t.to(dtype) if t.is_floating_point() and expected[k].dtype != t.dtype
              and not k.endswith(SCALE_SUFFIXES) else t).to(device)
          for k, t in state_dict.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.backbone.embeddings.weight
    for m in model.modules():           # buffers that are not saved (calibration maxima)
        for name, b in list(m.named_buffers(recurse=False)):
            if b.device.type == "meta":
                setattr(m, name, torch.zeros(b.shape, dtype=b.dtype, device=device))
    model.quant_config, model.quant_method = qcfg, method.name
    return model.eval()
