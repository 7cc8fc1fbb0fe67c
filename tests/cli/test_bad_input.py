"""Every user mistake ends as one line on stderr and exit status 2, never a traceback: in-process
through `qmamba.cli.main`, and once through `python -m qmamba` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from qmamba import api
from qmamba.cli import eval as cli_eval
from qmamba.cli import main

ROOT = Path(__file__).resolve().parents[2]


def fails(argv, capsys, *needles) -> str:
    """Run the CLI, expect exit 2 and a one-line error that contains every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"qmamba {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def text(tmp_path):
    def write(content: bytes) -> str:
        path = tmp_path / "text.txt"
        path.write_bytes(content)
        return str(path)
    return write


# ----------------------------------------------------------------------------- the model argument
def test_missing_model_folder(capsys, tmp_path):
    fails(["eval", str(tmp_path / "nowhere")], capsys, "does not exist")


def test_unknown_model_name(capsys):
    fails(["eval", "ref-mamba9"], capsys, "unknown model 'ref-mamba9'")
    fails(["generate", "ref-mamba9", "--prompt", "x"], capsys, "unknown model 'ref-mamba9'")


def test_reference_model_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "REFERENCE_DIR", tmp_path)
    fails(["eval"], capsys, "reference model 'ref-mamba2' is missing from this installation")


def test_folder_without_config(capsys, tmp_path):
    fails(["eval", str(tmp_path)], capsys, "no config.json")


def test_folder_without_weights(capsys, tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    fails(["eval", str(tiny_copy)], capsys, "has no weights")


def test_garbage_weights(capsys, tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(b"\x00" * 100)
    fails(["eval", str(tiny_copy)], capsys, "model.safetensors", "safetensors file")


def test_unknown_model_type(capsys, tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    fails(["eval", str(tiny_copy)], capsys, "unknown model_type 'gpt2'")


def test_hub_offline(capsys):
    fails(["eval", "state-spaces/mamba-130m-hf"], capsys, "offline", "local model folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tiny_mamba2):
    fails(["eval", str(tiny_mamba2[1]), "--device", "cuda"], capsys, "CUDA is not available")
    fails(["generate", str(tiny_mamba2[1]), "--device", "cuda", "--prompt", "x"], capsys, "CUDA")


def test_model_without_tokenizer(capsys, tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    fails(["eval", str(tiny_copy)], capsys, "has no tokenizer", "--tokenizer")


# ----------------------------------------------------------------------------- the text and windows
def test_empty_text_file(capsys, tiny_mamba2, text):
    fails(["eval", str(tiny_mamba2[1]), "--ppl", text(b"")], capsys, "is empty")


def test_non_utf8_text_file(capsys, tiny_mamba2, text):
    fails(["eval", str(tiny_mamba2[1]), "--ppl", text(b"caf\xe9 \xff")], capsys, "not UTF-8")


def test_missing_text_file(capsys, tiny_mamba2, tmp_path):
    fails(["eval", str(tiny_mamba2[1]), "--ppl", str(tmp_path / "none.txt")], capsys, "does not exist")


@pytest.mark.parametrize("seqlen", ["1", "0", "-3"])
def test_seqlen_below_two(capsys, tiny_mamba2, text, seqlen):
    fails(["eval", str(tiny_mamba2[1]), "--ppl", text(b"Some words here."), "--seqlen", seqlen], capsys,
          "--seqlen must be at least 2")


def test_text_shorter_than_one_window(capsys, tiny_mamba2, text):
    fails(["eval", str(tiny_mamba2[1]), "--ppl", text(b"A short text."), "--seqlen", "2048"], capsys,
          "fewer than one window of seqlen=2048")


# ----------------------------------------------------------------------------- options
def test_limit_without_tasks(capsys):
    fails(["eval", "--limit", "5"], capsys, "--limit applies to --tasks only")


def test_json_is_a_folder(capsys, tmp_path):
    fails(["eval", "--json", str(tmp_path)], capsys, "is a folder")


def test_tasks_not_available_yet(capsys, tiny_mamba2, monkeypatch):
    monkeypatch.setitem(sys.modules, cli_eval.HARNESS, None)          # as if the module did not exist
    fails(["eval", str(tiny_mamba2[1]), "--tasks", "cloze"], capsys, "zero-shot tasks are not available yet")


def test_tasks_without_lm_eval(capsys, tiny_mamba2, monkeypatch):
    def import_module(name):                                          # the harness, without lm-eval
        raise ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval")

    monkeypatch.setattr(cli_eval, "importlib", types.SimpleNamespace(import_module=import_module))
    fails(["eval", str(tiny_mamba2[1]), "--tasks", "cloze"], capsys, "need the package 'lm_eval'")


def test_generate_empty_prompt(capsys, tiny_mamba2):
    fails(["generate", str(tiny_mamba2[1]), "--prompt", ""], capsys, "--prompt is empty")


def test_generate_negative_values(capsys, tiny_mamba2):
    fails(["generate", str(tiny_mamba2[1]), "--prompt", "x", "--temperature", "-1"], capsys, "temperature")
    fails(["generate", str(tiny_mamba2[1]), "--prompt", "x", "--max-new-tokens", "-1"], capsys,
          "max_new_tokens")


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--dtype", "float64"])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- a real process
def test_subprocess_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "qmamba", "eval", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("qmamba eval: error: model folder") and "does not exist" in err
    assert proc.stdout == ""
