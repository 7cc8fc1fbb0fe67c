"""qmamba.utils.tokenizer.load_tokenizer: the project tokenizer by default, a folder or a
tokenizer.json file, and one-line QMambaErrors for a missing or broken one."""

from __future__ import annotations

import shutil

import pytest
from transformers import PreTrainedTokenizerFast

import qmamba.api
from qmamba.errors import QMambaError
from qmamba.utils.paths import TOKENIZER_DIR
from qmamba.utils.tokenizer import load_tokenizer


def test_default_is_the_project_tokenizer():
    tok = load_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 8192
    assert tok.eos_token == "<|endoftext|>"
    ids = tok.encode("Anne Elliot", add_special_tokens=False)
    assert ids == load_tokenizer(TOKENIZER_DIR).encode("Anne Elliot", add_special_tokens=False)
    assert ids == load_tokenizer(TOKENIZER_DIR / "tokenizer.json").encode("Anne Elliot", add_special_tokens=False)
    assert qmamba.api.load_tokenizer is load_tokenizer           # the one loader, re-exported


def test_missing_and_broken(tmp_path):
    with pytest.raises(QMambaError, match="no tokenizer at") as err:
        load_tokenizer(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(TOKENIZER_DIR, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(QMambaError, match="not a valid tokenizer.json") as err:
        load_tokenizer(broken)
    assert "\n" not in str(err.value)
