"""Quantization block by block (`qmamba quantize --low-memory`, `qmamba.quantize_low_memory`):
the folder it writes equals the in-memory `quantize` + `save_quantized` folder tensor for tensor
(and config.json but its timestamp), loads to the same logits, may be sharded with a valid index,
never materialises more than one block, and refuses what it cannot do in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qmamba
from qmamba.cli import main
from qmamba.formats import compressed_tensors as ct
from qmamba.methods import streaming
from qmamba.models import lazy
from qmamba.quant.checkpoint import save_quantized
from qmamba.quantize import quantize_low_memory

ESR = {"nsamples": 2, "seqlen": 16, "epochs": 1, "batch_size": 2}


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 4000, (18, 24), generator=torch.Generator().manual_seed(0))   # two batches of 16


def tensors(folder: Path) -> dict:
    """(is the extension, name) -> tensor over every safetensors file of a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            key = (f.name == ct.EXTENSION_FILE, k)
            assert key not in out, key
            out[key] = v
    return out


def config(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["qmamba"].pop("created")
    return cfg


def in_memory(name, method, calib, out, **opts):
    loaded = qmamba.load(name)
    model = copy.deepcopy(loaded.model)
    qmamba.quantize(model, "w8a8h4", calib=calib, method=method, progress=False, **opts)
    return save_quantized(model, out, tokenizer_dir=loaded.path)


def assert_same_folder(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]), k
    assert config(a) == config(b)
    ids = torch.randint(0, 4000, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(qmamba.load(a).model(ids), qmamba.load(b).model(ids))


@pytest.mark.parametrize("name,method", [("ref-mamba2", "rtn"), ("ref-mamba2", "dsq"), ("ref-mamba2", "qmamba"),
                                         ("ref-mamba1", "qmamba")])
def test_streamed_equals_in_memory(name, method, calib, tmp_path):
    mo = ESR if method == "qmamba" else None
    a = in_memory(name, method, calib, tmp_path / "mem", method_options=mo)
    stats = quantize_low_memory(name, tmp_path / "low", "w8a8h4", calib=calib, method=method, method_options=mo,
                                progress=False)
    assert_same_folder(a, tmp_path / "low")
    assert stats["max_live_blocks"] == 1 and len(stats["blocks"]) == 6
    if method == "qmamba":
        assert [r["block"] for r in stats["records"]] == list(range(6))


def test_shards_and_index(calib, tmp_path):
    """Small shards: several files, an index that names exactly them and every main tensor, the
    extension file outside the index (vLLM loads what the index names), same tensors."""
    a = in_memory("ref-mamba2", "dsq", calib, tmp_path / "mem")
    b = tmp_path / "low"
    quantize_low_memory("ref-mamba2", b, "w8a8h4", calib=calib, method="dsq", progress=False, shard_bytes=2_000_000)
    idx = json.loads((b / ct.INDEX_FILE).read_text())
    files = sorted(p.name for p in b.glob("*.safetensors") if p.name != ct.EXTENSION_FILE)
    assert len(files) > 2 and sorted(set(idx["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    held = {k: f for f in files for k in load_file(str(b / f))}
    assert held == idx["weight_map"]
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for (e, _), t in tensors(b).items() if not e)
    assert not list(b.glob(".*"))                                     # no temporary shard left
    assert_same_folder(a, b)


def test_one_block_read_at_a_time(calib, tmp_path, monkeypatch):
    """Every read of weights asks for one block's tensors (or none of a block's), and the blocks
    are read in order, each once."""
    reads = []
    real = lazy.LazyWeights.read
    monkeypatch.setattr(lazy.LazyWeights, "read", lambda self, names, dtype: (reads.append(list(names)),
                                                                              real(self, names, dtype))[1])
    quantize_low_memory("ref-mamba2", tmp_path / "low", "w8a8h4", calib=calib, method="rtn", progress=False)
    blocks = [{n.split(".")[2] for n in names if n.startswith("backbone.layers.")} for names in reads]
    assert [b for b in blocks if b] == [{str(i)} for i in range(6)]


def test_live_block_count_is_measured(calib, tmp_path, monkeypatch):
    """max_live_blocks counts the materialised blocks: a run that keeps its blocks counts 6."""
    monkeypatch.setattr(streaming, "_release", lambda model, i: None)
    stats = quantize_low_memory("ref-mamba2", tmp_path / "low", "w8a8h4", calib=calib, method="rtn", progress=False)
    assert stats["max_live_blocks"] == 6


def test_cli_low_memory_tiny_transformers(tiny_mamba2, tmp_path, capsys):
    """The CLI on a transformers checkpoint; the folder loads in qmamba and in transformers."""
    import transformers

    out, mem = tmp_path / "low", tmp_path / "mem"
    argv = ["quantize", str(tiny_mamba2[1]), "--method", "dsq", "--nsamples", "4", "--calib-seqlen", "32"]
    assert main(argv + ["--out", str(mem)]) == 0
    assert main(argv + ["--out", str(out), "--low-memory"]) == 0
    assert "block by block" in capsys.readouterr().out
    assert_same_folder(mem, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()


def test_automatic_when_too_big(tiny_mamba2, tmp_path, capsys, caplog, monkeypatch):
    from qmamba.models import budget

    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 20)     # the model: 2.1 MiB
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_mamba2[1]), "--method", "rtn", "--nsamples", "4", "--calib-seqlen", "32",
                 "--out", str(out)]) == 0
    assert "block by block" in capsys.readouterr().out
    assert any("quantizing block by block (--low-memory)" in r.getMessage() for r in caplog.records)
    assert (out / ct.INDEX_FILE).is_file()


def fails(argv, capsys, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err


def test_bad_input(tiny_mamba2, save_bin_folder, tmp_path, capsys):
    base = ["--nsamples", "4", "--calib-seqlen", "32", "--low-memory"]
    binf = save_bin_folder(tiny_mamba2[0], tmp_path / "bin")
    capsys.readouterr()
    fails(["quantize", str(binf), "--method", "rtn", *base, "--out", str(tmp_path / "a")], capsys, "cannot be memory-mapped")
    for extra, needle in ((["--method", "smoothquant"], "does not support method smoothquant"),
                          (["--method", "quamba"], "does not support method quamba"),
                          (["--method", "rtn", "--quantize-head"], "--quantize-head"),
                          (["--method", "qmamba", "--esr-resume", str(tmp_path / "r")], "--esr-resume")):
        fails(["quantize", "ref-mamba2", *extra, *base, "--out", str(tmp_path / "b")], capsys, needle)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
