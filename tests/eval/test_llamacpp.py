"""qmamba.eval.llamacpp: reading llama-bench's JSON (a recorded output of the real tool), the GGUF
cache key, and where the tools are looked for."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from qmamba.errors import QMambaError
from qmamba.eval import llamacpp

SAMPLE = Path(__file__).parent / "data" / "llama_bench_sample.json"


# ------------------------------------------------------------------------------- llama-bench JSON
def test_parse_recorded_llama_bench_output():
    """The sample is `llama-bench -m model-f32.gguf -m model-q8_0.gguf -m model-q4_0.gguf -p 8 -n 4
    -t 1 -r 3 -o json` (llama.cpp of llama-cpp-python 0.3.36) on ref-mamba2's GGUFs as
    `qmamba bench --against llama.cpp` makes them: one prompt and one generation test per model."""
    text = SAMPLE.read_text()
    raw = json.loads(text)
    rows = llamacpp.parse_llama_bench(text)
    assert len(rows) == len(raw) == 6
    assert [r["test"] for r in rows] == ["pp8", "tg4"] * 3
    for r, t in zip(rows, raw):
        assert r["tokens_per_second"] == statistics.median(t["samples_ts"])
        assert len(r["samples_ts"]) == 3 and r["n_threads"] == 1
        assert r["model_size"] == t["model_size"] > 0
        assert Path(r["model_filename"]).name.startswith("model-")
    sizes = {Path(r["model_filename"]).name: r["model_size"] for r in rows}
    assert sizes["model-f32.gguf"] > sizes["model-q8_0.gguf"] > sizes["model-q4_0.gguf"]


@pytest.mark.parametrize("text, message", [
    ("llama-bench: error", "printed no JSON"),
    ('{"a": 1}', "not a list"),
    ('[{"n_prompt": 8}]', "lacks a field"),
])
def test_parse_refuses_what_is_not_llama_bench_json(text, message):
    with pytest.raises(QMambaError, match=message):
        llamacpp.parse_llama_bench(text)


def test_parse_refuses_a_test_without_samples():
    raw = json.loads(SAMPLE.read_text())
    raw[0]["samples_ts"] = []
    with pytest.raises(QMambaError, match="no samples"):
        llamacpp.parse_llama_bench(json.dumps(raw))


def test_run_bench_maps_rows_to_types(tmp_path, monkeypatch):
    """run_bench reads prefill from the pp row and decode from the tg row of each model."""
    raw = json.loads(SAMPLE.read_text())
    ggufs = {t: tmp_path / f"model-{t}.gguf" for t in ("f32", "q8_0", "q4_0")}
    monkeypatch.setattr(llamacpp, "_run", lambda cmd, what, cwd=None: SAMPLE.read_text())
    tools = llamacpp.Tools(*(tmp_path / n for n in ("llama-bench", "llama-quantize", "c.py", "python")))
    cmd, res = llamacpp.run_bench(tools, ggufs, 8, 4, 1, 3)
    assert cmd[cmd.index("-p") + 1] == "8" and cmd[cmd.index("-n") + 1] == "4" and cmd[-2:] == ["-o", "json"]
    for t, g in ggufs.items():
        mine = [r for r in raw if Path(r["model_filename"]).name == g.name]
        pp = next(r for r in mine if r["n_gen"] == 0)
        tg = next(r for r in mine if r["n_prompt"] == 0)
        assert res[t]["prefill"] == statistics.median(pp["samples_ts"])
        assert res[t]["decode"] == statistics.median(tg["samples_ts"])
        assert res[t]["model_size"] == tg["model_size"]
    with pytest.raises(QMambaError, match="no pp/tg result"):
        llamacpp.run_bench(tools, {**ggufs, "q6_k": tmp_path / "model-q6_k.gguf"}, 8, 4, 1, 3)


# ------------------------------------------------------------------------------- the GGUF cache key
def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "mamba2"}\n')
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return path


def test_folder_key_follows_content_not_place(tmp_path):
    a = _folder(tmp_path / "a")
    b = Path(shutil.copytree(a, tmp_path / "b"))
    key = llamacpp.folder_key(a)
    assert llamacpp.folder_key(b) == key
    (b / ".cache-of-something").write_text("x")              # hidden files are not the model
    assert llamacpp.folder_key(b) == key
    data = bytearray((b / "model.safetensors").read_bytes())
    data[1000] ^= 1                                              # one bit of one weight
    (b / "model.safetensors").write_bytes(bytes(data))
    assert llamacpp.folder_key(b) != key
    c = Path(shutil.copytree(a, tmp_path / "c"))
    (c / "tokenizer.json").write_text("{}")                      # a tokenizer changes the GGUF
    assert llamacpp.folder_key(c) != key
    d = Path(shutil.copytree(a, tmp_path / "d"))
    os.rename(d / "model.safetensors", d / "model-renamed.safetensors")
    assert llamacpp.folder_key(d) != key


def test_folder_key_follows_the_converter(tmp_path):
    a = _folder(tmp_path / "a")
    conv = tmp_path / "convert_hf_to_gguf.py"
    conv.write_text("v1")
    k1 = llamacpp.folder_key(a, conv)
    conv.write_text("v2")
    assert llamacpp.folder_key(a, conv) != k1 != llamacpp.folder_key(a)


def test_folder_key_of_an_empty_folder(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(QMambaError, match="no files"):
        llamacpp.folder_key(tmp_path / "e")


# ------------------------------------------------------------------------------- finding the tools
def _fake_tree(root: Path) -> Path:
    """llama.cpp's layout: TREE/build/bin/{llama-bench,llama-quantize}, TREE/convert_hf_to_gguf.py."""
    bin_ = root / "build" / "bin"
    bin_.mkdir(parents=True)
    for n in ("llama-bench", "llama-quantize"):
        (bin_ / n).write_text("#!/bin/sh\n")
        (bin_ / n).chmod(0o755)
    (root / "convert_hf_to_gguf.py").write_text("")
    return bin_ / "llama-bench"


def test_find_tools_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("QMAMBA_CACHE", str(tmp_path / "cache"))
    env = {"QMAMBA_LLAMA_CPP_PYTHON": sys.executable}
    with pytest.raises(QMambaError, match="--llama-cpp-build"):
        llamacpp.find_tools(None, env)
    bench = _fake_tree(tmp_path / "tree")
    tools = llamacpp.find_tools(str(bench), env)
    assert tools.quantize == bench.parent / "llama-quantize"
    assert tools.converter == tmp_path / "tree" / "convert_hf_to_gguf.py"
    assert llamacpp.find_tools(None, {**env, "QMAMBA_LLAMA_BENCH": str(bench.parent)}).bench == bench
    with pytest.raises(QMambaError, match="llama-bench not found"):
        llamacpp.find_tools(str(tmp_path / "nowhere"), env)
    (bench.parent / "llama-quantize").unlink()
    with pytest.raises(QMambaError, match="llama-quantize not found"):
        llamacpp.find_tools(str(bench), env)


def test_parse_types():
    assert llamacpp.parse_types("F32, q8_0,q4_0,q8_0") == ["f32", "q8_0", "q4_0"]
    for bad in ("", "q3", "f32,int8"):
        with pytest.raises(QMambaError, match="--llama-types"):
            llamacpp.parse_types(bad)
