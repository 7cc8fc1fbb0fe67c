"""`qmamba.load`: one call from a name or a path to a model in eval mode and its tokenizer.

What `name_or_path` may be, tried in this order:
  1. a built-in reference model, `ref-mamba2` (the default), `ref-mamba1` or `ref-hybrid`, shipped as
     `qmamba/assets/models/<name>/` (write `./ref-mamba2` for a local folder of that name);
  2. an existing local folder, in transformers or mamba_ssm format (see `qmamba.models.load`);
  3. a Hugging Face hub id `owner/name`: the local hub cache first, then the hub itself unless
     HF_HUB_OFFLINE is set. An unreachable hub fails within HF_HUB_ETAG_TIMEOUT seconds (10).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from .errors import QMambaError
from .methods.checkpoint import load_quantized
from .models.lm import MambaLM
from .models.load import load_folder
from .utils.paths import MODELS_DIR
from .utils.tokenizer import TOKENIZER_FILE, load_tokenizer

REFERENCE_MODELS = ("ref-mamba2", "ref-mamba1", "ref-hybrid")
DEFAULT_MODEL = "ref-mamba2"
REFERENCE_DIR = MODELS_DIR
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a hub download fetches: configs, tokenizer, and one kind of weights (see _hub_patterns)
_HUB_COMMON = ["*.json", "*.txt", "*.model"]


@dataclass
class Loaded:
    model: MambaLM                  # eval mode, on the requested device and dtype
    tokenizer: Any                  # transformers PreTrainedTokenizerFast, or None
    path: Path                      # the folder the model was read from
    name: str                       # what the caller asked for
    format: str                     # "hf" | "mamba_ssm"
    config: dict                    # the raw config.json


# ------------------------------------------------------------------------------ dtype / device
def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """None -> float32; a torch dtype or one of the names float32, bfloat16, float16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise QMambaError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """A torch device that exists on this machine (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise QMambaError(f"unknown device {device!r}; expected cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QMambaError(f"device {device!r} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QMambaError(f"device {device!r} requested but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise QMambaError(f"unsupported device {device!r}; expected cpu or cuda")
    return dev


# ------------------------------------------------------------------------------ where the model is
def reference_model_dir(name: str) -> Path:
    folder = REFERENCE_DIR / name
    if not (folder / "config.json").is_file():
        raise QMambaError(f"reference model {name!r} is missing from this installation (expected "
                          f"{folder}); pass a local model folder or a hub id instead")
    return folder


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or env in ("1", "ON", "YES", "TRUE")


def _hub_patterns(files: list[str]) -> list[str]:
    """Download safetensors when the repo has them, pytorch_model*.bin otherwise, never both."""
    if any(f.endswith(".safetensors") for f in files):
        return _HUB_COMMON + ["*.safetensors"]
    return _HUB_COMMON + ["pytorch_model*.bin"]


def _network_errors() -> tuple:
    """Connection failures of the HTTP client huggingface_hub uses (requests < 1.0, httpx >= 1.0,
    httpx2 in the newest releases)."""
    errors = []
    for module, names in (("requests", ("ConnectionError", "Timeout")), ("httpx", ("TransportError",)),
                          ("httpx2", ("TransportError",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names]
    return tuple(errors)


def download_from_hub(repo_id: str) -> Path:
    """The snapshot folder of a hub model: from the local cache, else downloaded.

    The online step starts with a metadata request bounded by HF_HUB_ETAG_TIMEOUT (repo_info
    has no timeout of its own), so an unreachable hub fails fast instead of hanging."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    local_hint = "a local model folder works without the hub"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise QMambaError(f"{repo_id!r} is not a local folder, not in the local Hugging Face cache, and "
                          f"the hub is offline (HF_HUB_OFFLINE is set); {local_hint}")
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        info = HfApi().model_info(repo_id, timeout=timeout)
        path = snapshot_download(repo_id, etag_timeout=timeout,
                                 allow_patterns=_hub_patterns([s.rfilename for s in info.siblings or []]))
    except (RepositoryNotFoundError, GatedRepoError):
        raise QMambaError(f"{repo_id!r} is neither a local folder nor a model on the Hugging Face hub "
                          "(or it is private/gated)") from None
    except (*_network_errors(), OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise QMambaError(f"the Hugging Face hub is unreachable (offline?) so {repo_id!r} cannot be "
                          f"downloaded ({type(e).__name__}); {local_hint}") from None
    except HfHubHTTPError as e:
        raise QMambaError(f"the Hugging Face hub refused {repo_id!r}: {str(e).splitlines()[0]}") from None
    return Path(path)


def resolve_model_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """The local folder for a reference name, a local path or a hub id."""
    name = str(name_or_path)
    if name in REFERENCE_MODELS:
        return reference_model_dir(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QMambaError(f"{path} is a file; a model is a folder with config.json and weights")
        return path
    if isinstance(name_or_path, str) and _HUB_ID.match(name):
        return download_from_hub(name)
    if not isinstance(name_or_path, str) or os.sep in name or name.startswith((".", "~")):
        raise QMambaError(f"model folder {path} does not exist")
    raise QMambaError(f"unknown model {name!r}: not a reference model ({', '.join(REFERENCE_MODELS)}), "
                      "not a local folder and not a hub id (owner/name)")


# ------------------------------------------------------------------------------ tokenizer
def _tokenizer_for(tokenizer, folder: Path):
    if tokenizer is None:
        return load_tokenizer(folder) if (folder / TOKENIZER_FILE).is_file() else None
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


# ------------------------------------------------------------------------------ load
def load(name_or_path: Union[str, os.PathLike], *, dtype: Union[None, str, torch.dtype] = None,
         device: Union[str, torch.device] = "cpu", tokenizer=None) -> Loaded:
    """Load a model (eval mode) and its tokenizer.

    name_or_path: reference model name, local folder, or hub id (see the module docstring).
    dtype: None (float32), a torch dtype or "float32" | "bfloat16" | "float16".
    device: "cpu", "cuda" or "cuda:N".
    tokenizer: None (the model folder's own, or None if it has none), a tokenizer folder or
        tokenizer.json path, or a tokenizer object used as is.
    """
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    folder = resolve_model_path(name_or_path)
    model, fmt, raw = load_folder(folder, dt, dev, load_quantized)
    tok = _tokenizer_for(tokenizer, folder)
    if tok is not None and len(tok) > model.config.vocab_size:
        raise QMambaError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary has only "
                          f"{model.config.vocab_size}: they do not belong together")
    return Loaded(model=model, tokenizer=tok, path=folder, name=str(name_or_path), format=fmt, config=raw)
