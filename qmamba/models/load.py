"""Read a model folder into a `MambaLM`: the two config formats, the weight files, the checks.

Formats of a folder (told apart by its config.json):
  * "hf"         transformers (4.x or 5.x): `model_type` mamba, mamba2 or falcon_mamba;
  * "mamba_ssm"  state-spaces/mamba's `MambaLMHeadModel`: d_model, n_layer, ssm_cfg;
  * a config with `quantization_config` is a quantized qmamba checkpoint, which the caller's
    `load_quantized` builds (`qmamba.load` passes `qmamba.methods.checkpoint.load_quantized`).
Weights, first found wins: model.safetensors.index.json (shards), model.safetensors,
pytorch_model.bin.index.json (shards), pytorch_model.bin. mamba_ssm's key
`backbone.embedding.weight` is renamed to transformers' `backbone.embeddings.weight`; the names of
the hybrids (Nemotron-H, Granite-4.0-H) are mapped by `hybrid_weights`.

The model is built on the `meta` device and the checkpoint tensors are assigned to it
(`load_state_dict(assign=True)`, the gpt-fast pattern), so weights are never allocated twice.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import QMambaError
from ..utils.io import read_json
from .budget import (MANY_LAYERS, META_BYTES_PER_LAYER, MIN_QUANT_BYTES_PER_PARAM, check_bytes,
                     describe_size, human, model_size)
import re

from .config import HYBRID_MODEL_TYPES, ModelConfig, from_hf_dict, from_mamba_ssm_dict
from .hf_compat import tied_head
from .lm import MambaLM

StateDict = dict[str, Tensor]
# (folder, raw config.json, dtype, device) -> the quantized model in eval mode
QuantizedLoader = Callable[[Path, dict, torch.dtype, Union[str, torch.device]], MambaLM]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"
RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}
LM_HEAD, EMBEDDINGS = "lm_head.weight", "backbone.embeddings.weight"


# ------------------------------------------------------------------------------------ config
def read_config(folder: Path) -> dict:
    """The raw config.json of a model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise QMambaError(f"{folder} has no config.json: not a model folder")
    return read_json(path, "config file")


def detect_format(raw: dict) -> str:
    """'hf' (has model_type) or 'mamba_ssm' (has d_model and n_layer)."""
    if "model_type" in raw:
        return "hf"
    if "d_model" in raw and "n_layer" in raw:
        return "mamba_ssm"
    raise QMambaError("config.json is neither a transformers config (model_type) nor a mamba_ssm "
                      "config (d_model, n_layer, ssm_cfg)")


def model_config(raw: dict, fmt: str) -> ModelConfig:
    return from_hf_dict(raw) if fmt == "hf" else from_mamba_ssm_dict(raw)


# ------------------------------------------------------------------------------------ weights
def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, shards in index order."""
    folder = Path(folder)
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        if (folder / index).is_file():
            weight_map = read_json(folder / index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise QMambaError(f"weight index {folder / index} has no weight_map")
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            for shard in shards:
                if not shard.is_file():
                    raise QMambaError(f"shard {shard.name} listed in {index} is missing from {folder}")
            return shards
        if (folder / single).is_file():
            return [folder / single]
    raise QMambaError(f"{folder} has no weights ({SAFETENSORS} or {BIN}, possibly sharded)")


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise QMambaError(f"cannot read weights {path}: truncated or not a safetensors file ({e})") from None


def _read_bin(path: Path) -> StateDict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise QMambaError(f"cannot read weights {path}: not a plain tensor checkpoint (only tensors "
                          "are loaded, with torch.load(weights_only=True)) or corrupt") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise QMambaError(f"cannot read weights {path}: truncated or corrupt ({reason})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise QMambaError(f"weights {path} do not hold a flat dict of tensors")
    return sd


def read_weights(folder: Path) -> StateDict:
    """All tensors of a folder's checkpoint (on CPU), mamba_ssm names renamed to ours."""
    sd: StateDict = {}
    for path in weight_files(folder):
        sd.update(_read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path))
    return {RENAMES.get(k, k): v for k, v in sd.items()}


_GRANITE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GRANITE_PARTS = (("input_layernorm.", 0, "norm."), ("mamba.", 0, "mixer."), ("self_attn.", 0, "mixer."),
                  ("post_attention_layernorm.", 1, "norm."), ("shared_mlp.input_linear.", 1, None),
                  ("shared_mlp.output_linear.", 1, None), ("block_sparse_moe.router.layer.", 1, "mixer.gate."))
_FUSED_EXPERTS = re.compile(r"(.+\.experts)\.(up_proj|down_proj|gate_up_proj)$")


def hybrid_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """A hybrid checkpoint's tensors under qmamba's names (already qmamba's: unchanged).

    Nemotron-H: `backbone.*` (or `model.*`) as qmamba names them, routed experts one linear each
    (`mixer.experts.{i}.up_proj.weight`; 3-D `mixer.experts.up_proj` are split); multi-token
    prediction heads (`mtp.*`) are dropped. Granite-4.0-H: layer i of the checkpoint is blocks
    2i (input_layernorm, mamba or self_attn) and 2i+1 (post_attention_layernorm, the MoE and
    shared MLP); `block_sparse_moe.input_linear` / `output_linear` (experts, out, in) become
    `experts.{i}.up_proj` / `down_proj`, `shared_mlp` `shared_experts` (or the `mlp` layer itself
    where there are no experts), `router.layer` `gate`; `model.embed_tokens` / `model.norm` are
    `backbone.embeddings` / `backbone.norm_f`."""
    out: StateDict = {}
    if cfg.model_type == "nemotron_h":
        for k, v in sd.items():
            if k.startswith("mtp."):
                continue
            k = "backbone." + k[len("model."):] if k.startswith("model.") else k
            m = _FUSED_EXPERTS.match(k)
            if m and v.dim() == 3:
                for i in range(v.shape[0]):
                    out[f"{m.group(1)}.{i}.{m.group(2)}.weight"] = v[i]
                continue
            out[k] = v
        return out
    moe = cfg.hybrid["n_experts"] > 0
    for k, v in sd.items():
        if k.startswith("backbone.") or k == LM_HEAD:
            out[k] = v
            continue
        if k == "model.embed_tokens.weight":
            out[EMBEDDINGS] = v
            continue
        if k == "model.norm.weight":
            out["backbone.norm_f.weight"] = v
            continue
        m = _GRANITE.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest.startswith("block_sparse_moe.") and rest.endswith(("input_linear.weight", "output_linear.weight")):
                name = "up_proj" if "input_linear" in rest else "down_proj"
                for e in range(v.shape[0]):
                    out[f"backbone.layers.{2 * i + 1}.mixer.experts.{e}.{name}.weight"] = v[e]
                continue
            for prefix, offset, new in _GRANITE_PARTS:
                if rest.startswith(prefix):
                    if new is None:                                          # the shared MLP
                        lin = "up_proj" if "input_linear" in prefix else "down_proj"
                        new = f"mixer.shared_experts.{lin}." if moe else f"mixer.{lin}."
                    out[f"backbone.layers.{2 * i + offset}.{new}{rest[len(prefix):]}"] = v
                    break
            else:
                out[k] = v                                                   # reported as unexpected
            continue
        out[k] = v
    return out


_QMAMBA_LAYER = re.compile(r"backbone\.layers\.(\d+)\.(norm|mixer)\.(.+)")
_QMAMBA_EXPERT = re.compile(r"experts\.(\d+)\.(up_proj|down_proj)\.weight")
_GRANITE_FFN = (("gate.", "block_sparse_moe.router.layer."), ("shared_experts.up_proj.", "shared_mlp.input_linear."),
                ("shared_experts.down_proj.", "shared_mlp.output_linear."), ("up_proj.", "shared_mlp.input_linear."),
                ("down_proj.", "shared_mlp.output_linear."))


def transformers_names(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """The inverse of `hybrid_weights`: qmamba's tensors of a hybrid under the names and layouts
    that transformers' checkpoints use (any suffix: `.weight`, `.weight_scale`, ...); other
    models unchanged. Nemotron-H: qmamba's names are already the checkpoint's (`backbone.*`,
    routed experts one linear each, which transformers 5.x fuses while loading). Granite-4.0-H:
    blocks 2i and 2i+1 are layer i (`input_layernorm` + `mamba` or `self_attn`;
    `post_attention_layernorm` + `block_sparse_moe` + `shared_mlp`), the routed experts' float
    weights stacked into (experts, out, in) `input_linear` / `output_linear`."""
    if cfg.model_type != "granitemoehybrid":
        return dict(sd)
    out: StateDict = {}
    experts: dict[tuple, dict[int, Tensor]] = {}
    for k, v in sd.items():
        if k == EMBEDDINGS:
            out["model.embed_tokens.weight"] = v
            continue
        if k == "backbone.norm_f.weight":
            out["model.norm.weight"] = v
            continue
        m = _QMAMBA_LAYER.match(k)
        if m is None:
            out[k] = v                                                       # lm_head.weight
            continue
        block, part, rest = int(m.group(1)), m.group(2), m.group(3)
        i, ffn = divmod(block, 2)
        pre = f"model.layers.{i}."
        if part == "norm":
            out[pre + ("post_attention_layernorm." if ffn else "input_layernorm.") + rest] = v
        elif not ffn:
            out[pre + ("self_attn." if cfg.layer_types[block] == "attention" else "mamba.") + rest] = v
        elif (e := _QMAMBA_EXPERT.fullmatch(rest)) is not None:
            experts.setdefault((i, e.group(2)), {})[int(e.group(1))] = v
        else:
            new = next((name + rest[len(old):] for old, name in _GRANITE_FFN if rest.startswith(old)), None)
            if new is None or rest.startswith("experts."):
                raise QMambaError(f"granitemoehybrid: no transformers name for {k} (a quantized routed expert "
                                  "is written in float under transformers' names; its codes stay in qmamba's extension)")
            out[pre + new] = v
    for (i, proj), per in experts.items():                                  # (experts, out, in)
        fused = "input_linear" if proj == "up_proj" else "output_linear"
        out[f"model.layers.{i}.block_sparse_moe.{fused}.weight"] = torch.stack([per[e] for e in sorted(per)])
    return out


def transformers_module(cfg: ModelConfig, name: str) -> str:
    """A qmamba module name (a linear, the embeddings) under transformers' names
    (`transformers_names` of its `.weight`)."""
    return next(iter(transformers_names(cfg, {name + ".weight": torch.empty(0)})))[: -len(".weight")]


# ------------------------------------------------------------------------------------ checks
def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_state_dict(model: MambaLM, sd: StateDict, source: str = "the weights") -> None:
    """Raise QMambaError unless `sd` has exactly the model's keys with the model's shapes.
    A tied lm_head may be absent from `sd` (it is the embedding). `source` names the weights."""
    expected = model.state_dict()                                           # meta tensors: shapes only
    tied = model.config.tie_embeddings
    missing = [k for k in expected if k not in sd and not (tied and k == LM_HEAD)]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} key(s): {_few(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} key(s): {_few(unexpected)}"] if unexpected else [])
        hint = "" if tied or LM_HEAD not in missing else " (the config says lm_head is not tied)"
        raise QMambaError(f"{source} do not match config.json: {'; '.join(parts)}{hint}")
    for key, ref in expected.items():
        if key in sd and sd[key].shape != ref.shape:
            raise QMambaError(f"{source} do not match config.json: {key} has shape {tuple(sd[key].shape)} "
                              f"in the weights but {tuple(ref.shape)} from the config")


# ------------------------------------------------------------------------------------ build
def build_model(cfg: ModelConfig, sd: StateDict, dtype: torch.dtype,
                device: Union[str, torch.device] = "cpu", source: str = "the weights") -> MambaLM:
    """A MambaLM in eval mode whose parameters ARE the (cast, moved) checkpoint tensors."""
    with torch.device("meta"):
        model = MambaLM(cfg)
    check_state_dict(model, sd, source)
    if cfg.tie_embeddings and LM_HEAD in sd and not torch.equal(sd[LM_HEAD], sd[EMBEDDINGS]):
        raise QMambaError(f"config.json ties lm_head to the embeddings, but {source} hold a different "
                          "lm_head.weight (untie it in config.json if the head is separate)")
    # Nemotron-H's sigmoid router stays in float32 at any dtype, as transformers keeps it
    fp32 = cfg.hybrid.get("router") == "sigmoid"
    sd = {k: v.to(device=device, dtype=torch.float32 if fp32 and ".mixer.gate." in k else
                  dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd[LM_HEAD] = sd[EMBEDDINGS]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:                                                  # assign made two Parameters
        model.lm_head.weight = model.backbone.embeddings.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {_few(left)}")
    return model.eval()


def check_model_fits(folder, raw: dict, dtype: torch.dtype, device="cpu") -> None:
    """Before a model folder is read and built: refuse a config.json whose model cannot fit in
    the memory available at `dtype`, or whose layer count is beyond any real model and describes
    far more parameters than the weight files hold (the config does not belong to the weights).
    Tiny and ordinary configs pass untouched."""
    folder = Path(folder)
    quantized = "quantization_config" in raw
    try:
        cfg = from_hf_dict(raw) if quantized else model_config(raw, detect_format(raw))
    except Exception:          # a config the loader rejects with its own message
        return
    size = model_size(cfg)
    per_param = MIN_QUANT_BYTES_PER_PARAM if quantized else torch.empty((), dtype=dtype).element_size()
    need = int(size.parameters * per_param) + cfg.n_layer * META_BYTES_PER_LAYER
    where = folder / "config.json"
    check_bytes(need, f"the model of {where}, {describe_size(cfg, size)} in "
                      f"{'quantized form' if quantized else str(dtype).replace('torch.', '')},", device)
    if quantized or cfg.n_layer <= MANY_LAYERS:
        return                 # a mismatch fails fast in the loader's own checks
    try:
        on_disk = sum(os.path.getsize(p) for p in weight_files(folder))
    except (QMambaError, OSError):
        return                 # missing weights: the loader says so
    if on_disk < size.parameters:      # float weights take >= 2 bytes per parameter on disk
        raise QMambaError(f"{where} describes {describe_size(cfg, size)}, but the weights in {folder} "
                          f"hold only {human(on_disk)}: the config does not belong to these weights (or they are truncated)")


def load_folder(folder, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                load_quantized: Optional[QuantizedLoader] = None) -> tuple[MambaLM, str, dict]:
    """Model folder -> (model in eval mode, format 'hf' | 'mamba_ssm', raw config.json). A
    quantized folder is built by `load_quantized(folder, raw, dtype, device)`: this package
    knows nothing of quantization."""
    folder = Path(folder)
    raw = read_config(folder)
    check_model_fits(folder, raw, dtype, device)        # an absurd config.json fails here, in one line
    if "quantization_config" in raw:
        if load_quantized is None:
            raise QMambaError(f"{folder} holds a quantized model (config.json has a quantization_config); "
                              "load it with qmamba.load")
        return load_quantized(folder, raw, dtype, device), "hf", raw
    fmt = detect_format(raw)
    cfg = model_config(raw, fmt)
    sd = read_weights(folder)
    if cfg.model_type in HYBRID_MODEL_TYPES:
        sd = hybrid_weights(cfg, sd)
    if fmt == "hf":                     # 5.x configs may be silent on tying (hf_compat.tied_head)
        tie = tied_head(raw, sd, cfg.tie_embeddings, LM_HEAD, EMBEDDINGS)
        if tie != cfg.tie_embeddings:
            cfg = dataclasses.replace(cfg, tie_embeddings=tie)
    return build_model(cfg, sd, dtype, device, f"the weights in {folder}"), fmt, raw
