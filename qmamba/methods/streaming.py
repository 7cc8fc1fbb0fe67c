"""Quantization of a model larger than memory, block by block (`qmamba quantize --low-memory`).

The float model is never built: its structure lives on the meta device, its weights stay in the
folder's safetensors files (`qmamba.models.lazy`). For the calibration ids (N, L):
  1. the embedding rows of the ids are read -> the first block's inputs, in the model's dtype,
     as the batches of 16 sequences that `run_calibration` feeds the model;
  2. for each block i: its tensors are read (cast to the dtype) into the meta block, which
     becomes the only materialised block; the method's quantizers are installed in it (the
     same `install_quantizers`, for layer i), it observes its inputs (its outputs, computed
     exactly as the whole-model calibration pass computes them, are the next block's inputs),
     its static scales are fixed, ESR reconstructs it (qmamba: `esr.reconstruct_block`, on the
     ESR inputs carried from block to block as the in-memory loop carries them), its weights
     are rounded; its tensors go to the output shards and the block goes back to the meta device;
  3. the embedding, final norm and lm_head are copied (cast) to the shards chunk by chunk; the
     extension file, the index and config.json are written, and the folder is renamed into place.
The steps are the in-memory lifecycle's, in another order that changes no number (a block's
calibration and reconstruction read only its own inputs): the folder equals the in-memory one
tensor for tensor (tests/methods/test_streaming.py). Held in memory: one block's float weights,
the calibration activations (N x L x d_model) and ESR's four activation sets.

Methods with a float transform or modules of their own (smoothquant, quamba), quantize_head,
hybrid models and ESR's resume folder are refused with one line.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import QMambaError
from ..formats import compressed_tensors as ct
from ..formats.shards import DEFAULT_SHARD_BYTES, ShardWriter, index
from ..models.config import HYBRID_MODEL_TYPES
from ..models.hf_compat import writer_version
from ..models.lazy import LazyWeights
from ..models.lm import Block, MambaLM, QuantState
from ..models.load import EMBEDDINGS, LM_HEAD, check_state_dict, detect_format, model_config, read_config
from ..models.save import TOKENIZER_FILES, atomic_folder
from ..quant.apply import install_quantizers, quantize_weights
from ..quant.calibrate import quantizers
from ..quant.checkpoint import export_tensors
from ..quant.config import QuantConfig
from .esr import reconstruct_block
from .registry import Method

log = logging.getLogger("qmamba.streaming")
CALIB_BATCH = 16             # run_calibration's batch size


class _NoMixer:
    """A finished (or later) layer as `install_quantizers` / `quantize_weights` see it: nothing."""
    QUANT_POINTS = ()

    def linear_groups(self):
        return ()

    def states(self):
        return ()


def _view(block: Block, i: int) -> SimpleNamespace:
    """A 'model' whose only layer with anything to quantize is `block`, at index i (quantizer
    names and seeds depend on the index)."""
    skip = SimpleNamespace(layer_type=block.layer_type, mixer=_NoMixer())
    return SimpleNamespace(backbone=SimpleNamespace(layers=[skip] * i + [block]))


def _holder(block: Block, i: int) -> nn.Module:
    """A module whose named_modules() are block i's under their full names (backbone.layers.i...)."""
    root, backbone, layers = nn.Module(), nn.Module(), nn.Module()
    layers.add_module(str(i), block)
    backbone.add_module("layers", layers)
    root.add_module("backbone", backbone)
    return root


def check_supported(method: Method, qcfg: QuantConfig, opts, cfg=None) -> None:
    """One line for what the block-by-block path cannot do."""
    for step in ("transform", "prepare"):
        if getattr(type(method), step) is not getattr(Method, step):
            raise QMambaError(f"--low-memory does not support method {method.name} (its {step} step "
                              "needs the whole model); use rtn, dsq or qmamba")
    if type(method).reconstruct is not Method.reconstruct and method.name != "qmamba":
        raise QMambaError(f"--low-memory does not support method {method.name}'s reconstruction")
    if getattr(opts, "resume_dir", None) is not None:
        raise QMambaError("--low-memory does not support --esr-resume")
    if qcfg.quantize_head:
        raise QMambaError("--low-memory does not support --quantize-head")
    if cfg is not None and cfg.model_type in HYBRID_MODEL_TYPES:
        raise QMambaError(f"--low-memory supports Mamba and Mamba2 models, not {cfg.model_type}")


def check_folder(folder: Path, method: Method, qcfg: QuantConfig, opts) -> None:
    """What `quantize_folder` refuses, checked from the headers alone (before calibration)."""
    weights = LazyWeights(folder)
    _, cfg = _config(Path(folder), weights)
    check_supported(method, qcfg, opts, cfg)


def _config(folder: Path, weights: LazyWeights):
    raw = read_config(folder)
    if "quantization_config" in raw:
        raise QMambaError(f"{folder} is already quantized; quantize the float model instead")
    fmt = detect_format(raw)
    cfg = model_config(raw, fmt)
    if fmt == "hf" and "tie_word_embeddings" not in raw and writer_version(raw)[0] >= 5 \
            and LM_HEAD in weights.shapes and EMBEDDINGS in weights.shapes:
        import dataclasses
        cfg = dataclasses.replace(cfg, tie_embeddings=weights.equal(LM_HEAD, EMBEDDINGS))
    return raw, cfg


def quantize_folder(folder: Path, out: Path, qcfg: QuantConfig, method: Method, opts, calib: torch.Tensor,
                    dtype: torch.dtype = torch.float32, tokenizer_dir: Optional[Path] = None,
                    force: bool = False, progress: bool = True, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    on_block: Optional[Callable[[dict], None]] = None) -> dict:
    """Quantize the float model in `folder` block by block into the quantized folder `out`
    (atomically). calib: (N, L) token ids. Returns the run's figures: seconds per block, total
    seconds, the most blocks ever materialised at once, the output bytes; `on_block(record)` is
    called after every block."""
    t_start = time.time()
    folder, out = Path(folder), Path(out)
    weights = LazyWeights(folder)
    raw, cfg = _config(folder, weights)
    check_supported(method, qcfg, opts, cfg)
    with torch.device("meta"):
        model = MambaLM(cfg)                                    # the structure, no data
    check_state_dict(model, weights.meta(), f"the weights in {folder}")
    esr = opts.esr_config(qcfg.seed) if method.name == "qmamba" else None
    observers = method.observers(qcfg, opts)
    tmp, commit, abort = atomic_folder(out, force)
    writer = ShardWriter(tmp, shard_bytes)
    stats = {"blocks": [], "max_live_blocks": 0}
    try:
        with torch.random.fork_rng():
            torch.manual_seed(qcfg.seed)
            groups, ignore, ext, records = _blocks(model, weights, qcfg, calib, dtype, esr, observers,
                                                   writer, stats, progress, on_block)
        for name in (EMBEDDINGS, "backbone.norm_f.weight", *(() if cfg.tie_embeddings else (LM_HEAD,))):
            shape = weights.shapes[name]
            if len(shape) == 2:
                writer.add_chunks(name, shape, dtype, (c for _, c in weights.row_chunks(name, dtype)))
            else:
                writer.add(name, weights.read([name], dtype)[name])
        weight_map = writer.close()
        save_file(ext, str(tmp / ct.EXTENSION_FILE), metadata={"format": "pt"})
        model.quant_state = QuantState(qcfg, method.name, seconds=time.time() - t_start, records=records)
        _, _, qc = export_tensors(model)        # the meta float model: the qmamba fields, no groups
        qc = {**ct.fields(groups, ignore), ct.EXTENSION_KEY: qc[ct.EXTENSION_KEY]}
        hf = cfg.to_hf()
        hf["torch_dtype"] = str(dtype).replace("torch.", "")
        hf["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        (tmp / ct.INDEX_FILE).write_text(json.dumps(index(weight_map, writer.total_size), indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        commit()
    except OSError as e:
        writer.abort()
        abort()
        raise QMambaError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        writer.abort()
        abort()
        raise
    stats.update(seconds=round(time.time() - t_start, 2), records=records,
                 output_bytes=sum(p.stat().st_size for p in out.iterdir() if p.is_file()))
    return stats


def _release(model, i: int) -> None:
    """Block i back to the meta device: its tensors leave memory."""
    with torch.device("meta"):
        model.backbone.layers[i] = Block(model.config, model.backbone.layers[i].layer_type)


def _blocks(model, weights, qcfg, calib, dtype, esr, observers, writer, stats, progress, on_block):
    """Step 2 of the module docstring for every block: (merged compressed-tensors groups, ignore
    list, extension tensors, ESR records or None)."""
    from tqdm.auto import tqdm

    layers = model.backbone.layers
    # calibration inputs: run_calibration's batches, each (b, L, d_model) in `dtype`
    hidden = [weights.gather_rows(EMBEDDINGS, calib[i:i + CALIB_BATCH], dtype)
              for i in range(0, len(calib), CALIB_BATCH)]
    if esr is not None:
        ids = calib[: esr.nsamples, : esr.seqlen]
        X_fp = weights.gather_rows(EMBEDDINGS, ids, dtype).float()          # (N, L, d_model)
        X_q = X_fp.clone()
        g = torch.Generator().manual_seed(esr.seed)
        work = torch.device(esr.device) if esr.device else \
            (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    groups: dict[tuple, list[str]] = {}
    ignore: list[str] = []
    ext: dict = {}
    records = [] if esr is not None else None
    for i in tqdm(range(len(layers)), desc="quantize", unit="block", disable=not progress):
        t0 = time.time()
        prefix = f"backbone.layers.{i}."
        names = [k for k in weights.keys() if k.startswith(prefix)]
        sd = weights.read(names, dtype)
        block = layers[i]
        block.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=True, assign=True)
        del sd
        block.eval()
        stats["max_live_blocks"] = max(stats["max_live_blocks"], sum(
            any(not p.is_meta for p in layer.parameters()) for layer in layers))
        view = _view(block, i)
        install_quantizers(view, qcfg, observers)
        qs = list(quantizers(block))
        if qs:                                  # run_calibration, for this block's quantizers
            for q in qs:
                q.mode = "observe"
            with torch.no_grad():
                hidden = [block(h) for h in hidden]
            for q in qs:
                if q.mode == "observe":
                    q.mode = "quant"
            for q in qs:
                q.finish_calibration()
        t_calib = time.time() - t0
        if esr is not None:
            X_fp, X_q, rec = reconstruct_block(block, i, X_fp, X_q, qcfg, esr, g, work)
            block.to("cpu")
            records.append(rec)
        quantize_weights(view, qcfg)
        holder = _holder(block, i)
        main, ext_i, info = ct.export(holder, {k: v.detach().contiguous() for k, v in holder.state_dict().items()})
        for scheme, ns in info["groups"].items():
            groups.setdefault(scheme, []).extend(ns)
        ignore += info["ignore"]
        ext.update(ext_i)
        for k in sorted(main):
            writer.add(k, main[k])
        del main, ext_i, holder, view
        _release(model, i)
        del block
        rec = {"block": i, "seconds": round(time.time() - t0, 2), "calibrate_seconds": round(t_calib, 2)}
        stats["blocks"].append(rec)
        if on_block is not None:
            on_block(rec)
    return groups, ignore, ext, records


def too_big_for_memory(folder: Path, dtype: torch.dtype) -> Optional[str]:
    """Why the float model of `folder` cannot be built in memory while block by block it can (a
    phrase for the log), or None: the folder fits, or is not one the streamed path takes (then
    the in-memory path says what is wrong)."""
    from ..models.budget import META_BYTES_PER_LAYER, available_memory, human, model_size

    try:
        raw = read_config(folder)
        if "quantization_config" in raw:
            return None
        cfg = model_config(raw, detect_format(raw))
        if cfg.model_type in HYBRID_MODEL_TYPES:
            return None
        LazyWeights(folder)                     # safetensors, readable
    except QMambaError:
        return None
    need = model_size(cfg).parameters * torch.empty((), dtype=dtype).element_size() + cfg.n_layer * META_BYTES_PER_LAYER
    avail = available_memory()
    if avail is None or need <= avail:
        return None
    return f"the {str(dtype).replace('torch.', '')} model needs {human(need)}, more than the {human(avail)} available"
