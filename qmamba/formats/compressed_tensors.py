"""qmamba's quantized tensors <-> compressed-tensors (the format of llm-compressor, loaded by
transformers' `CompressedTensorsHfQuantizer` and by vLLM), plus qmamba's extension.

A quantized folder (format_version 2) holds (hybrids: see qmamba.formats.hybrids)

  model.safetensors            what every loader reads, under transformers' names:
      <linear>.weight          int8 (out, in) codes, W5..W8            format int-quantized
      <linear>.weight_packed   int32 (out, ceil(in * bits / 32)), W2..W4, codes + 2^(bits-1)
                               packed densely, element i at bit i * bits of its row
      <linear>.weight_shape    int64 [out, in]                          format pack-quantized
      <linear>.weight_scale    float32 (out, 1) per channel, (out, in / group_size) per group
      <linear>.input_scale     float32 (1,), static per-tensor activations (none if dynamic)
      everything float         as in a float checkpoint (norms already carry SmoothQuant's
                               smoothing; ESR's clipping is in the codes)
  model.safetensors.index.json lists only model.safetensors, so that vLLM (which loads every
                               *.safetensors without an index) never sees the extension file
  qmamba-extension.safetensors what only qmamba reads, under qmamba's module names: the
                               mixer-internal activation scales (quant_conv, quant_x, quant_B,
                               quant_C, quant_dt, quant_z), the state quantizer's s_n and static
                               scales, the int8 embedding codes (quantize_head), and the integer
                               out_proj of a Hadamard-rotated (Quamba) model
  config.json                  quantization_config: compressed-tensors' fields, and the key
                               "qmamba" (the extension: ignored by compressed-tensors, whose
                               QuantizationConfig has extra="ignore")

Codes and scales move between the two layouts unchanged (integers and float32), so a folder
reloads in qmamba bit for bit. What transformers/vLLM run is the same model without the
mixer-internal quantizers and with a float state (docs/checkpoint-format.md says where it
differs). compressed-tensors is not needed to write or read a folder (the config is plain JSON,
the packing is re-implemented here); tests check both against the library.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import Tensor, nn

from .hybrids import EXPERT, EXPERT_TARGET, float_expert, from_transformers, hybrid_config, to_transformers

FORMAT_VERSION = 2
CT_METHOD = "compressed-tensors"
EXTENSION_KEY = "qmamba"
EXTENSION_FILE = "qmamba-extension.safetensors"
MAIN_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------- packing
def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """compressed-tensors' `pack_to_int32` (dense, along dim 1): signed codes (rows, cols) int8
    -> int32 (rows, ceil(cols * bits / 32)), code + 2^(bits-1) at bit position i * bits."""
    rows, cols = codes.shape
    v = codes.to(torch.int64) + (1 << (bits - 1))
    words = math.ceil(cols * bits / 32)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    out.scatter_add_(1, word.expand(rows, -1), (v << off) & 0xFFFFFFFF)
    over = off + bits - 32                                  # bits spilling into the next word
    m = over > 0
    if m.any():
        out.scatter_add_(1, (word[m] + 1).expand(rows, -1), v[:, m] >> (bits - over[m]))
    out = out[:, :words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of `pack_int32`: int32 (rows, words) -> signed codes (rows, cols) int8."""
    u = packed.to(torch.int64) & 0xFFFFFFFF
    u = torch.cat([u, torch.zeros_like(u[:, :1])], 1)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    both = u[:, word] | (u[:, word + 1] << 32)              # 64 bits starting at the code's word
    v = (both >> off) & ((1 << bits) - 1)
    return (v - (1 << (bits - 1))).to(torch.int8)


# ---------------------------------------------------------------------------- schemes
def _weight_args(bits: int, group_size: int) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "group" if group_size else "channel", "group_size": group_size or None}


def _act_args(bits: int, dynamic: bool) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": dynamic,
            "strategy": "token" if dynamic else "tensor"}


# transformers 5.x's Mamba/Mamba2 `_init_weights` reads `out_proj.weight` (Mamba1 also
# `dt_proj.weight`) of every mixer while loading, which a pack-quantized module no longer has
# (AttributeError): these keep one code per int8 byte ("int-quantized", num_bits < 8), which
# compressed-tensors loads the same way
UNPACKED = ("out_proj", "dt_proj")


def _weight_format(bits: Optional[int], name: str = "") -> str:
    if bits is None:
        return "dense"
    if EXPERT.fullmatch(name):         # transformers 5.x dequantizes experts only when packed
        return "pack-quantized"
    if bits <= 4 and not name.endswith(UNPACKED):
        return "pack-quantized"
    return "int-quantized"


def _act_quantizer(model, name: str, lin) -> Optional[nn.Module]:
    """The quantizer that quantizes `lin`'s input, seen from outside the mixer: its own, or (Mamba1
    x_proj, whose input is the scan input x) the mixer's quant_x."""
    from ..quant.activation import ActQuantizer

    iq = lin.input_quant
    if isinstance(iq, nn.Sequential) and hasattr(iq, "quant"):
        iq = iq.quant
    if not isinstance(iq, ActQuantizer) and name.endswith("mixer.x_proj"):
        iq = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "quant_x", None)
    return iq if isinstance(iq, ActQuantizer) else None


def _is_rotated(lin) -> bool:
    return isinstance(lin.input_quant, nn.Sequential) and hasattr(lin.input_quant, "rotate")


def _regex(name: str) -> str:
    """A target that matches this linear in every layer (re: prefixed, as compressed-tensors
    and vLLM match module names)."""
    if EXPERT.fullmatch(name):         # every routed expert of a scheme: one target
        return EXPERT_TARGET
    parts = name.split(".")
    if len(parts) > 3 and parts[0] in ("backbone", "model") and parts[1] == "layers":
        # transformers 5.x takes the first group with a regex target that says "experts" for
        # the routed experts' scheme: the shared expert's target must not say it
        rest = [r"shared_[^.]+" if p == "shared_experts" else re.escape(p) for p in parts[3:]]
        return r"re:.*layers\.\d+\." + r"\.".join(rest) + "$"
    return name


# ---------------------------------------------------------------------------- export
def export(model, sd: dict[str, Tensor]) -> tuple[dict, dict, dict]:
    """qmamba's state dict `sd` of a quantized `model` -> (main tensors under transformers'
    names, extension tensors under qmamba's names, compressed-tensors fields of
    quantization_config, without the extension)."""
    from ..quant.activation import ActQuantizer
    from ..quant.embedding import QEmbedding
    from ..quant.linear import QLinear
    from ..quant.state import StateQuantizer

    main, ext, used = {}, {}, set()
    groups: dict[tuple, list[str]] = {}
    ignore, rotated = [], []
    hybrid, experts = hybrid_config(model), False
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            keys = [k for k in sd if k.startswith(name + ".") and k[len(name) + 1:] != "bias"]
            expert = hybrid is not None and EXPERT.fullmatch(name) is not None
            if float_expert(hybrid, name, mod.w_bits):
                # other loaders get the weight dequantized in float and no input quantization
                # (qmamba.formats.hybrids); qmamba keeps codes and scales in the extension
                ext.update((k, sd[k].clone() if ".input_quant." in k else sd[k])     # shared by a group
                           for k in keys if k != name + ".weight")
                main[name + ".weight"] = mod.dequantized_weight(torch.float32).to(
                    model.backbone.norm_f.weight.dtype).contiguous()
                used.update(keys)
                experts = True
                continue
            if _is_rotated(mod):
                # compressed-tensors cannot rotate an input (transformers applies no transform
                # config): transformers gets the int weights dequantized and un-rotated in
                # float (W' = dequant(Q) H, H = H^T = H^-1) and no input quantization; qmamba
                # keeps the integer codes in the extension
                for k in keys:
                    ext[k] = sd[k]
                w = mod.dequantized_weight(torch.float32)
                dtype = model.backbone.norm_f.weight.dtype                  # the model's float dtype
                main[name + ".weight"] = mod.input_quant.rotate(w).to(dtype).contiguous()
                ignore.append(name)
                rotated.append(name)
                used.update(keys)
                continue
            iq = _act_quantizer(model, name, mod)
            if expert:                  # Nemotron-H's: pack-quantized weights only (qmamba.formats.hybrids)
                ext.update((k, sd[k].clone()) for k in keys if ".input_quant." in k)
                iq = None
            if mod.w_bits is None:
                main[name + ".weight"] = sd[name + ".weight"]
            elif _weight_format(mod.w_bits, name) == "pack-quantized":
                codes = mod.codes()
                main[name + ".weight_packed"] = pack_int32(codes, mod.w_bits)
                main[name + ".weight_shape"] = torch.tensor([mod.out_features, mod.in_features], dtype=torch.int64)
            else:
                main[name + ".weight"] = mod.codes().contiguous()
            if mod.w_bits is not None:
                main[name + ".weight_scale"] = mod.w_scale.detach().float().reshape(mod.out_features, -1).contiguous()
            if iq is not None and not iq.dynamic:
                main[name + ".input_scale"] = iq.scale.detach().float().reshape(1).clone()
            elif not expert:                                # a dynamic quantizer's unused scale
                ext.update((k, sd[k]) for k in keys if k.endswith("input_quant.scale"))
            used.update(keys)
            scheme = (mod.w_bits, mod.group_size if mod.w_bits else 0,
                      None if iq is None else (iq.bits, iq.dynamic), _weight_format(mod.w_bits, name))
            groups.setdefault(scheme, []).append(name)
        elif isinstance(mod, QEmbedding):
            main[name + ".weight"] = (mod.codes.float() * mod.scale).to(mod.dtype)
            for k in (name + ".codes", name + ".scale"):
                ext[k] = sd[k]
                used.add(k)
            ignore.append(name)
        elif isinstance(mod, (ActQuantizer, StateQuantizer)):
            for k in sd:
                if k.startswith(name + ".") and k not in used:
                    ext[k] = sd[k]
                    used.add(k)
    for k, v in sd.items():
        if k not in used:
            main[k] = v
    if hybrid is not None:              # transformers' names: tensors, targets, ignored modules
        main, groups, ignore = to_transformers(hybrid, main, groups, ignore, experts)
    return main, ext, {"fields": fields(groups, ignore), "rotated": rotated, "groups": groups, "ignore": ignore}


def fields(groups: dict[tuple, list[str]], ignore: list[str]) -> dict:
    """compressed-tensors' fields of quantization_config from the linears grouped by scheme
    (scheme -> module names, in model order) and the ignored modules (`export`'s; the streamed
    quantization merges them over its blocks)."""
    ignore = list(ignore)
    config_groups, formats = {}, set()
    for i, ((wb, gs, act, fmt), names) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        formats.add(fmt)
        config_groups[f"group_{i}"] = {
            "targets": list(dict.fromkeys(_regex(n) for n in names)),
            "weights": None if wb is None else _weight_args(wb, gs),
            "input_activations": None if act is None else _act_args(*act),
            "output_activations": None, "format": fmt}
    if "lm_head" not in {n for names in groups.values() for n in names}:
        ignore.append("lm_head")
    return {"quant_method": CT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


# ---------------------------------------------------------------------------- import
def _check(main: dict, key: str, shape: tuple, dtype: Optional[torch.dtype]) -> Tensor:
    from ..errors import QMambaError

    t = main.get(key)
    if t is None:
        raise QMambaError(f"quantized checkpoint does not match its config: missing {key}")
    if tuple(t.shape) != tuple(shape) or (t.dtype != dtype if dtype is not None else not t.is_floating_point()):
        raise QMambaError(f"tensor {key} has shape {tuple(t.shape)} {t.dtype}, the config expects "
                          f"{tuple(shape)} {dtype or 'float'}")
    return t


def import_(model, main: dict[str, Tensor], ext: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `export`: tensors of a folder -> qmamba's state dict for `model` (the
    quantized structure, possibly on the meta device)."""
    from ..quant.embedding import QEmbedding
    from ..quant.linear import QLinear
    from ..quant.primitives import pack

    sd, skip = dict(ext), set()
    expected = model.state_dict()
    if hybrid_config(model) is not None:                # transformers' names -> qmamba's
        main = from_transformers(hybrid_config(model), main)
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if name + ".weight_scale" not in main and name + ".input_scale" not in main:
                continue                                    # kept in the extension (rotated) or float
            skip.update(name + s for s in (".weight", ".weight_packed", ".weight_shape", ".weight_scale",
                                           ".input_scale"))
            if mod.w_bits is None:
                sd[name + ".weight"] = main[name + ".weight"]
            else:
                out, cols = mod.out_features, mod.in_features
                if _weight_format(mod.w_bits, name) == "pack-quantized":
                    words = math.ceil(cols * mod.w_bits / 32)
                    _check(main, name + ".weight_packed", (out, words), torch.int32)
                    codes = unpack_int32(main[name + ".weight_packed"], mod.w_bits, cols)
                else:
                    codes = _check(main, name + ".weight", (out, cols), torch.int8)
                sshape = expected[name + ".w_scale"].shape
                scale = _check(main, name + ".weight_scale", (out, sshape[1] if len(sshape) == 3 else 1), None)
                sd[name + ".qweight"] = pack(codes, mod.w_bits)
                sd[name + ".w_scale"] = scale.reshape(sshape)
            for key in (name + ".input_quant.scale", name + ".input_quant.quant.scale"):
                if key in expected and name + ".input_scale" in main:
                    sd[key] = main[name + ".input_scale"].reshape(())
        elif isinstance(mod, QEmbedding):
            skip.add(name + ".weight")                      # the dequantized copy for other loaders
    for name in (k[: -len(".qweight")] for k in ext if k.endswith(".qweight")):
        skip.add(name + ".weight")                          # rotated: float copy for other loaders
    for k, v in main.items():
        if k not in skip and k not in ext:
            sd[k] = v
    return sd


# ---------------------------------------------------------------------------- what others run
class transformers_view:
    """Context manager: makes a quantized qmamba model compute what transformers computes from the
    exported folder (its forward, compressed-tensors' fake-quantized linears):
      * the SSM state in float (no state quantizer) and no mixer-internal activation quantizers
        (quant_conv, quant_x, quant_B, quant_C, quant_dt, quant_z): transformers has no such points;
      * Mamba1 x_proj's input quantized with quant_x's scale (its input_scale), although the scan
        input x is not; Mamba1 dt_proj's input not quantized (transformers' MambaMixer multiplies
        by dt_proj.weight directly, past the module that would quantize its input);
      * a Hadamard-rotated out_proj (Quamba) without its input quantizer (stored float, un-rotated);
      * hybrids: the KV cache in float (compressed-tensors' kv_cache_scheme cannot say qmamba's
        int8/int4 cache) and the routed experts without input quantizers (stored dequantized in
        float: transformers' fused experts are no nn.Linear that compressed-tensors quantizes).
    Static per-tensor scales are then applied identically, and with `ct_clamp` (the default) the
    codes are clamped to compressed-tensors' [-2^(A-1), 2^(A-1) - 1] instead of qmamba's
    +-(2^(A-1) - 1), which matters only for activations beyond the calibrated range: the view then
    equals transformers' logits. Dynamic per-token scales still differ by design
    (compressed-tensors: amax / 127.5; qmamba: amax / 127)."""

    def __init__(self, model, ct_clamp: bool = True):
        self.model, self.undo, self.ct_clamp = model, [], ct_clamp

    def _set(self, obj, attr, value):
        self.undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def __enter__(self):
        import copy

        from ..quant.activation import ActQuantizer

        for layer in self.model.backbone.layers:
            mixer = layer.mixer
            for point in mixer.QUANT_POINTS:
                q = getattr(mixer, point)
                if isinstance(q, ActQuantizer):
                    self._set(q, "mode", "off")
            if mixer.state_quant is not None:
                self._set(mixer.state_quant, "mode", "off")
            if getattr(mixer, "kv_quant", None) is not None:     # a hybrid's attention: float KV
                self._set(mixer, "kv_quant", None)
            for expert in getattr(mixer, "experts", None) or ():  # routed experts: float inputs (their
                for lin in (expert.up_proj, expert.down_proj):    # quantizer is the shared expert's too)
                    if isinstance(getattr(lin, "input_quant", None), ActQuantizer):
                        self._set(lin, "input_quant", nn.Identity())
            for name in ("x_proj", "dt_proj", "out_proj"):
                lin = getattr(mixer, name, None)
                iq = getattr(lin, "input_quant", None)
                if lin is None:
                    continue
                if name == "x_proj" and isinstance(mixer.quant_x, ActQuantizer) and not isinstance(iq, ActQuantizer):
                    xq = copy.deepcopy(mixer.quant_x)
                    xq.mode = "quant"
                    self._set(lin, "input_quant", xq)
                elif iq is not None and (name == "dt_proj" or _is_rotated(lin)):
                    for q in iq.modules():
                        if isinstance(q, ActQuantizer):
                            self._set(q, "mode", "off")
        if self.ct_clamp:                  # only the linears' input quantizers are still on
            from ..quant import primitives

            qrange = primitives.qrange
            self._set(primitives, "qrange", lambda bits, symmetric=True:
                      (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else qrange(bits, False))
        return self.model

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self.undo):
            setattr(obj, attr, value)
        self.undo.clear()
        return False
