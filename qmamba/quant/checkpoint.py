"""Quantized checkpoints: safetensors with the integer weights and every quantizer's scales,
and a config.json whose `quantization_config` says how to rebuild the modules.

Loading never unpickles classes: the float model is built on the meta device from config.json,
the quantizers are re-installed from `quantization_config` (the same `install_quantizers` and
`quantize_weights` that made them, run on meta tensors, so shapes and dtypes match by
construction), then the tensors are assigned (`load_state_dict(assign=True)`, the gpt-fast
pattern). Reloading gives the same logits bit for bit.

On disk (format_version 2, `qmamba.formats.compressed_tensors`): compressed-tensors, which
transformers and vLLM load (with a float state and without the mixer-internal quantizers), plus
qmamba's extension (quantization_config["qmamba"] and qmamba-extension.safetensors); see
docs/checkpoint-format.md. Folders of format_version 1 (quant_method "qmamba", qweight tensors
in model.safetensors) still load.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .._version import __version__
from ..errors import QMambaError
from ..formats import compressed_tensors as ct
from ..models.config import from_hf_dict
from ..models.layer_spec import state_spec
from ..models.lm import MambaLM, QuantState
from ..models.save import save_model, state_dict_for_save
from .apply import install_quantizers, quantize_weights
from .config import FORMAT_VERSION, QuantConfig

QUANT_METHOD = "qmamba"
SCALE_SUFFIXES = ("w_scale", ".scale", "s_n", "static_scale")   # kept in float32 whatever the dtype

# a method's `restore` hook: rebuilds its own modules (e.g. Quamba's rotations) on a model whose
# quantizers are installed, from (model, qcfg, the checkpoint's quantization_config)
Restore = Callable[[MambaLM, QuantConfig, dict], None]


def quantization_config(model: MambaLM) -> dict:
    """The qmamba part of a checkpoint's quantization_config (format_version 1 wrote it as the
    whole quantization_config; format_version 2 nests it under the key "qmamba")."""
    qs = model.quant_state
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "qmamba_version": __version__,
            "method": qs.method, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **qs.config.to_dict(), **qs.meta}


def export_tensors(model: MambaLM) -> tuple[dict, dict, dict]:
    """(model.safetensors tensors, extension tensors, config.json's quantization_config)."""
    main, ext, info = ct.export(model, state_dict_for_save(model))
    qm = quantization_config(model)
    qm.update(format_version=ct.FORMAT_VERSION, extension_file=ct.EXTENSION_FILE,
              rotated_float_in_main=info["rotated"],
              not_in_compressed_tensors=_not_expressed(model),
              vllm=("not servable: vLLM's MambaMixer (Mamba1) takes no quantization config; load this "
                    "folder with transformers or qmamba") if model.config.arch == "mamba1" else
                   "the compressed-tensors part (float SSM state, float KV cache); greedy tokens checked "
                   "against qmamba's for W8A8 Mamba2 and Nemotron-H without routed experts (docs/serving.md)")
    return main, ext, {**info["fields"], ct.EXTENSION_KEY: qm}


def _not_expressed(model: MambaLM) -> list[str]:
    """What other loaders do not apply (they run the rest)."""
    qcfg = model.quant_config
    out = []
    if qcfg.a_bits is not None:
        out.append("mixer-internal activation quantizers (quant_conv, quant_x, quant_B, quant_C, quant_dt, "
                   "quant_z) and the int8 conv state")
    if qcfg.h_bits is not None:
        out.append(f"the H{qcfg.h_bits} SSM state ({qcfg.state_quant}, {qcfg.state_scale} scales)")
    if qcfg.kv_bits is not None and any(state_spec(m, "kv") for m in model.mixers()):
        out.append(f"the KV{qcfg.kv_bits} cache of the attention layers (keys per channel over groups of "
                   f"{qcfg.kv_group_size} tokens, the filling group in float; values per token)")
    if qcfg.a_bits is not None and (model.config.hybrid or {}).get("n_experts"):
        out.append("the input quantization of the routed experts (Nemotron-H: stored weight-only; "
                   "Granite-4.0-H: stored dequantized in float)")
    if model.quant_method == "quamba" and qcfg.w_bits is not None:
        out.append("the Hadamard rotation of out_proj's input (out_proj is stored dequantized and "
                   "un-rotated in float for other loaders, without input quantization)")
    return out


def save_quantized(model: MambaLM, out, tokenizer_dir: Optional[Path] = None, force: bool = False) -> Path:
    """Write a quantized model atomically to `out`: compressed-tensors + qmamba's extension."""
    if model.quant_state is None:
        raise QMambaError("this model is not quantized; run qmamba.quantize first")
    main, ext, qc = export_tensors(model)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in main.values())},
             "weight_map": {k: ct.MAIN_FILE for k in sorted(main)}}
    return save_model(model, out, tokenizer_dir=tokenizer_dir, force=force,
                      extra_config={"quantization_config": qc},
                      files={ct.MAIN_FILE: main, ct.EXTENSION_FILE: ext}, json_files={ct.INDEX_FILE: index})


def quantize_structure(model: MambaLM, qcfg: QuantConfig, method: str, qmeta: Optional[dict] = None, *,
                       restore: Optional[Restore]) -> MambaLM:
    """The modules of a quantized model (quantizers, integer weights rounded from whatever
    weights `model` holds), without calibration: what loading rebuilds before assigning the
    saved tensors, and what the memory report measures (bytes do not depend on calibration).
    `restore` is the method's hook, None for a method without one (`qmamba.methods.checkpoint`
    looks it up by name)."""
    install_quantizers(model, qcfg)
    if restore is not None:
        restore(model, qcfg, qmeta or {})
    quantize_weights(model, qcfg)
    model.quant_state = QuantState(qcfg, method)
    return model


def build_structure(cfg, qcfg: Optional[QuantConfig] = None, method: Optional[str] = None,
                    qmeta: Optional[dict] = None, dtype: Optional[torch.dtype] = None, *,
                    restore: Optional[Restore]) -> MambaLM:
    """A model of `cfg` on the meta device (shapes and dtypes, no data), in `dtype` if given, with
    the modules of `qcfg` quantized by `method` when `qcfg` is given (`quantize_structure`)."""
    with torch.device("meta"):
        model = MambaLM(cfg)
        if dtype is not None:
            model = model.to(dtype)
        if qcfg is not None:
            quantize_structure(model, qcfg, method, qmeta, restore=restore)
    return model


def build_quantized(raw: dict, state_dict: dict, dtype: torch.dtype = torch.float32, device="cpu",
                    folder: Optional[Path] = None, extension: Optional[dict] = None, *,
                    restore_hook: Callable[[str], Optional[Restore]]) -> MambaLM:
    """Rebuild a quantized model from its config.json dict and its tensors. A format_version 2
    folder also needs its extension tensors: `extension`, or read from `folder`. `restore_hook`
    gives the named method's `restore` (None if it has none) and refuses an unknown method
    (`qmamba.methods.checkpoint.build_quantized` passes the registry's)."""
    outer = raw.get("quantization_config") or {}
    if outer.get("quant_method") == ct.CT_METHOD:
        qc = outer.get(ct.EXTENSION_KEY)
        if not isinstance(qc, dict):
            raise QMambaError("a compressed-tensors folder without qmamba's extension (quantization_config"
                              "[\"qmamba\"]): qmamba loads the folders it wrote; load this one with transformers")
        newest = ct.FORMAT_VERSION
    elif outer.get("quant_method") == QUANT_METHOD:
        qc, newest = outer, FORMAT_VERSION                      # format_version 1: qmamba's names
    else:
        raise QMambaError(f"unsupported quantization_config (quant_method {outer.get('quant_method')!r}); "
                          "only checkpoints written by qmamba can be loaded")
    if int(qc.get("format_version", 0)) > newest:
        raise QMambaError(f"checkpoint format {qc.get('format_version')} is newer than this qmamba "
                          f"supports ({newest}); upgrade qmamba")
    qcfg = QuantConfig.from_dict(qc)
    method = qc.get("method", "rtn")
    restore = restore_hook(method)
    cfg = from_hf_dict(raw)
    if qc is outer and cfg.arch == "mamba2" and cfg.ngroups > 1 and "qmamba_norm_group_size" not in raw:
        # format_version 1 was written when qmamba normalised all of d_inner for transformers
        # configs (transformers < 5.23 did, mamba_ssm never did) and wrote the group size only
        # when it differed from d_inner: such a folder was calibrated with the whole-width norm
        cfg = dataclasses.replace(cfg, norm_group_size=cfg.d_inner)
    model = build_structure(cfg, qcfg, method, qc, dtype, restore=restore)
    if qc is not outer:
        if extension is None:
            extension = _read_extension(folder, qc)
        state_dict = ct.import_(model, state_dict, extension)
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
    return model.eval()


def _read_extension(folder: Optional[Path], qc: dict) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = qc.get("extension_file", ct.EXTENSION_FILE)
    path = None if folder is None else Path(folder) / name
    if path is None or not path.is_file():
        raise QMambaError(f"the quantized folder {folder or ''} lacks {name} (qmamba's extension: state "
                          "and mixer-internal quantizers); copy the whole folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise QMambaError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None
