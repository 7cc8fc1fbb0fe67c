"""`load_tokenizer`: the project tokenizer or a saved one, as a transformers fast tokenizer, with
one-line errors for a missing or broken one. The one tokenizer loader of the package (used by
`qmamba.load` and by the lm-eval adapter)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import QMambaError
from .io import read_json
from .paths import TOKENIZER_DIR

TOKENIZER_FILE = "tokenizer.json"


def first_line(e: Exception) -> str:
    """The first non-empty line of an exception's message (at most 160 characters)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(e).__name__


def load_tokenizer(source: Optional[Union[str, os.PathLike]] = None):
    """A fast tokenizer from a folder (tokenizer.json, tokenizer_config.json, ...) or a
    tokenizer.json file; None: the project tokenizer (`qmamba/assets/tokenizer`). A folder whose
    tokenizer_config.json names a class other than PreTrainedTokenizerFast goes through
    AutoTokenizer (slow to import, so only then)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = Path(TOKENIZER_DIR if source is None else source).expanduser()
    folder, file = (path.parent, path) if path.is_file() else (path, path / TOKENIZER_FILE)
    if not file.is_file():
        raise QMambaError(f"no tokenizer at {path} (expected {TOKENIZER_FILE})")
    try:
        Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises bare Exception
        raise QMambaError(f"tokenizer file {file} is not a valid tokenizer.json ({first_line(e)})") from None
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(file))
    tok_config = folder / "tokenizer_config.json"
    named = read_json(tok_config, "tokenizer config").get("tokenizer_class") if tok_config.is_file() else None
    if named in (None, "PreTrainedTokenizerFast"):
        cls = PreTrainedTokenizerFast
    else:
        from transformers import AutoTokenizer as cls
    try:
        tok = cls.from_pretrained(str(folder))
    except (OSError, ValueError, ImportError) as e:
        raise QMambaError(f"cannot load the tokenizer in {folder}: {first_line(e)}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise QMambaError(f"the tokenizer in {folder} is not a fast tokenizer ({type(tok).__name__})")
    return tok
