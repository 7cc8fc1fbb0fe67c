"""Write a model as a Hugging Face-style folder (config.json + model.safetensors + tokenizer),
atomically: everything goes to a temporary folder beside the target, which is then renamed."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..errors import QMambaError
from ..utils.io import check_output, umask
from .lm import MambaLM
from .load import transformers_names

log = logging.getLogger("qmamba")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# transformers ties no head of these, whatever tie_word_embeddings says (5.x's NemotronH has
# `_tied_weights_keys = {}`): a folder without lm_head.weight would load with a random head
NEVER_TIED = ("nemotron_h",)


def state_dict_for_save(model: MambaLM) -> dict[str, torch.Tensor]:
    """Contiguous tensors under qmamba's names, without a tied lm_head where transformers ties
    it again on load (it drops it the same way)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and model.config.model_type not in NEVER_TIED:
        sd.pop("lm_head.weight", None)
    elif model.config.tie_embeddings and "lm_head.weight" in sd:        # its own copy on disk
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    return sd


# our temporary and replaced folders beside an output NAME: .NAME.tmp-HOST-PID-RAND, .NAME.old-HOST-PID-RAND
def _ours(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(?P<kind>tmp|old)-{re.escape(_host())}-(?P<pid>\d+)-[0-9a-f]{{8}}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary folders that an interrupted save of `out` (SIGKILL, power loss) left
    beside it: only ours (our name pattern, made on this host) and only when the process that
    made them is gone. A replaced folder (.old-) whose save died between its two renames, with
    `out` missing, is the user's previous output: it is put back instead. Returns what it removed."""
    out = Path(out)
    removed = []
    try:
        entries = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    ours = _ours(out)
    for p in entries:
        m = ours.match(p.name)
        if not m or _alive(int(m["pid"])) or not p.is_dir():
            continue
        try:
            if m["kind"] == "old" and not out.exists():
                os.replace(p, out)
                log.warning("restored %s from an interrupted save (%s)", out, p.name)
                continue
            shutil.rmtree(p)
            removed.append(p)
            log.info("removed %s, left by an interrupted save (process %s)", p, m["pid"])
        except OSError:
            pass
    return removed


def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _user_modes(folder: Path) -> None:
    """The modes a plain mkdir/open would give (0777/0666 less the umask): some writers
    (safetensors) create their files 0600."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def atomic_folder(out: Path, force: bool):
    """Context-free helper: returns a fresh temporary folder next to `out` and a commit function.

    The folder is created with the user's umask (not tempfile's 0700) and named after this host
    and process, so that the next save cleans it up if this one is killed (`clean_stale`)."""
    out = Path(out)
    clean_stale(out)
    if out.exists() and not force:
        raise QMambaError(f"output folder {out} already exists (pass --force to replace it)")
    check_output(out, "output folder", folder=True, force=True)     # a file there, a parent that is a file, ...
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out, "tmp")
        tmp.mkdir()                                  # mode 0777 & ~umask
    except OSError as e:
        raise QMambaError(f"cannot write {out}: {e.strerror or e}") from None

    def commit():
        _user_modes(tmp)
        if out.exists():
            old = _sibling(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)

    def abort():
        shutil.rmtree(tmp, ignore_errors=True)

    return tmp, commit, abort


def save_model(model: MambaLM, out, tokenizer_dir: Optional[Path] = None, force: bool = False,
               extra_config: Optional[dict] = None, tensors: Optional[dict] = None,
               files: Optional[dict] = None, json_files: Optional[dict] = None) -> Path:
    """Save `model` with its transformers-style config.json, atomically: its state dict (a
    hybrid's under transformers' names, `load.transformers_names`; or the given `tensors`) as
    model.safetensors, or `files` ({file name: tensors}) as safetensors files,
    plus `json_files` ({file name: object}) and the tokenizer files of `tokenizer_dir`."""
    out = Path(out)
    tmp, commit, abort = atomic_folder(out, force)
    try:
        cfg = model.config.to_hf()
        cfg["torch_dtype"] = str(model.backbone.norm_f.weight.dtype).replace("torch.", "")
        cfg.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if files is None:               # a hybrid's tensors under transformers' names
            files = {"model.safetensors": tensors if tensors is not None else
                     transformers_names(model.config, state_dict_for_save(model))}
        for name, sd in files.items():
            save_file(sd, str(tmp / name), metadata={"format": "pt"})
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
        commit()
    except OSError as e:                 # disk full, a folder that vanished, ...
        abort()
        raise QMambaError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        abort()
        raise
    return out
