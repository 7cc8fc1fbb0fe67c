"""Write a model as a Hugging Face-style folder (config.json + model.safetensors + tokenizer),
atomically: everything goes to a temporary folder beside the target, which is then renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..errors import QMambaError
from .lm import MambaLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def state_dict_for_save(model: MambaLM) -> dict[str, torch.Tensor]:
    """Contiguous tensors, without the tied lm_head (transformers drops it the same way)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def atomic_folder(out: Path, force: bool):
    """Context-free helper: returns a fresh temporary folder next to `out` and a commit function."""
    out = Path(out)
    if out.exists() and not force:
        raise QMambaError(f"output folder {out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))

    def commit():
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)

    def abort():
        shutil.rmtree(tmp, ignore_errors=True)

    return tmp, commit, abort


def save_model(model: MambaLM, out, tokenizer_dir: Optional[Path] = None, force: bool = False,
               extra_config: Optional[dict] = None, tensors: Optional[dict] = None) -> Path:
    """Save `model` (or the given `tensors`) with its transformers-style config.json."""
    out = Path(out)
    tmp, commit, abort = atomic_folder(out, force)
    try:
        cfg = model.config.to_hf()
        cfg["torch_dtype"] = str(model.backbone.norm_f.weight.dtype).replace("torch.", "")
        cfg.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(tensors if tensors is not None else state_dict_for_save(model),
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
        commit()
    except BaseException:
        abort()
        raise
    return out
