"""`qmamba.quantize(model, config, calib)`: the one-call Python entry point."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import QMambaError
from .methods import get_method, resolve_config
from .models.lm import QuantState
from .quant.apply import is_quantized
from .quant.calibrate import calibration_ids
from .quant.config import QuantConfig


def quantize(model, config: Union[str, QuantConfig] = "w8a8h4", calib=None, method: str = "qmamba",
             tokenizer=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
             progress: bool = True, method_options: Optional[dict] = None, **config_options):
    """Quantize a float model in place and return it.

    model: a `MambaLM` or what `qmamba.load` returns (then its tokenizer is used).
    config: 'w8a8h4'-style string or a QuantConfig; `config_options` set its fields
        (e.g. state_quant='channel', state_scale='static', a_dynamic=True).
    calib: None (the shipped validation text), a text file path, or token ids (N, L).
    method_options: the method's options by name (the fields of its options dataclass, e.g.
        `qmamba.methods.esr.ESRConfig`'s for "qmamba").
    The model's `quant_state` records the config, the method, the time and any reconstruction
    records.
    """
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    if is_quantized(model):
        raise QMambaError("this model is already quantized; quantize the float model instead")
    qcfg = resolve_config(config, method, seed=seed, **config_options)
    ids = _calibration(calib, tokenizer, nsamples, seqlen, seed)
    m = get_method(method)
    opts = m.make_options(method_options)
    t0 = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        records = m.run(model, qcfg, ids, opts, progress=progress)
    model.quant_state = QuantState(qcfg, method, seconds=time.time() - t0, records=records)
    model.eval()
    return model


def quantize_low_memory(model_path, out, config: Union[str, QuantConfig] = "w8a8h4", calib=None,
                        method: str = "qmamba", tokenizer=None, nsamples: int = 128, seqlen: int = 512,
                        seed: int = 0, dtype=None, progress: bool = True, method_options: Optional[dict] = None,
                        force: bool = False, shard_bytes: Optional[int] = None, on_block=None,
                        **config_options) -> dict:
    """Quantize the float model of a folder (safetensors) block by block, never holding more than
    one block's float weights, and write the quantized folder `out` (the folder `quantize` +
    `save_quantized` write, tensor for tensor; shards with an index when it is large).

    Arguments as `quantize`'s; model_path: a reference name, a folder or a hub id (`qmamba.load`'s);
    tokenizer: None (the folder's), a tokenizer folder / tokenizer.json path, or a tokenizer.
    Returns the run's figures (`qmamba.methods.streaming.quantize_folder`)."""
    from .api import resolve_dtype, resolve_model_path
    from .methods.streaming import DEFAULT_SHARD_BYTES, check_folder, quantize_folder
    from .utils.tokenizer import TOKENIZER_FILE, load_tokenizer

    folder = resolve_model_path(model_path)
    tok_dir = folder
    if tokenizer is None and (folder / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(folder)
    elif isinstance(tokenizer, (str, Path)):
        tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
        tokenizer = load_tokenizer(tokenizer)
    qcfg = resolve_config(config, method, seed=seed, **config_options)
    m = get_method(method)
    opts = m.make_options(method_options)
    check_folder(folder, m, qcfg, opts)               # before the calibration text is read
    ids = _calibration(calib, tokenizer, nsamples, seqlen, seed)
    return quantize_folder(folder, out, qcfg, m, opts, ids, dtype=resolve_dtype(dtype), tokenizer_dir=tok_dir,
                           force=force, progress=progress, shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES,
                           on_block=on_block)


def _calibration(calib, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) calibration ids: given as a tensor, or drawn from a text file (None:
    the shipped validation text)."""
    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if ids.dim() != 2:
            raise QMambaError("calibration ids must be a (nsamples, seqlen) tensor")
        return ids
    return calibration_ids(tokenizer, Path(calib) if calib is not None else None, nsamples, seqlen, seed)
