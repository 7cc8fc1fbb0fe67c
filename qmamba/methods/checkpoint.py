"""Quantized models rebuilt by method name: `qmamba.quant.checkpoint` builds the modules and
assigns the tensors; the method registry supplies each method's `restore` hook (the modules a
method adds beyond the quantizers, e.g. Quamba's rotations) and refuses unknown names."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..models.lm import MambaLM
from ..models.load import read_weights
from ..quant import checkpoint as ckpt
from ..quant.config import QuantConfig
from . import get_method


def restore_hook(method: str) -> Optional[ckpt.Restore]:
    """The `restore` of the named method (None when it adds no modules of its own)."""
    return get_method(method).restore


def quantize_structure(model: MambaLM, qcfg: QuantConfig, method: str, qmeta: Optional[dict] = None) -> MambaLM:
    """`qmamba.quant.checkpoint.quantize_structure` with the named method's hook."""
    return ckpt.quantize_structure(model, qcfg, method, qmeta, restore=restore_hook(method))


def build_structure(cfg, qcfg: Optional[QuantConfig] = None, method: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> MambaLM:
    """`qmamba.quant.checkpoint.build_structure` with the named method's hook: a model of `cfg` on
    the meta device, quantized by `method` for `qcfg` when given (what the memory report, the
    benchmarks and `compare`'s memory estimate measure)."""
    return ckpt.build_structure(cfg, qcfg, method, None, dtype,
                                restore=restore_hook(method) if qcfg is not None else None)


def build_quantized(raw: dict, state_dict: dict, dtype: torch.dtype = torch.float32, device="cpu",
                    folder: Optional[Path] = None, extension: Optional[dict] = None) -> MambaLM:
    """`qmamba.quant.checkpoint.build_quantized` with the registry's hooks."""
    return ckpt.build_quantized(raw, state_dict, dtype, device, folder, extension, restore_hook=restore_hook)


def load_quantized(folder: Path, raw: dict, dtype: torch.dtype, device) -> MambaLM:
    """A qmamba quantized folder (its config.json, `raw`, has a `quantization_config`)."""
    return build_quantized(raw, read_weights(folder), dtype, device, folder=folder)
