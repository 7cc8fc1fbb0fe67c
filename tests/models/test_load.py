"""`qmamba.load`: what it returns, where it finds models, and a clear QMambaError for every bad
input (missing or broken folders, configs and weight files, hub failures, dtype, device)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qmamba
from qmamba import api
from qmamba.errors import QMambaError
from qmamba.models.hf_compat import installed_version


def error_of(*args, **kwargs) -> str:
    with pytest.raises(QMambaError) as info:
        qmamba.load(*args, **kwargs)
    message = str(info.value)
    print(f"QMambaError: {message}")
    assert "\n" not in message
    return message


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_weights(folder: Path, fn) -> None:
    path = folder / "model.safetensors"
    sd = fn(load_file(path))
    save_file(sd, path)


# ----------------------------------------------------------------------------- what load returns
def test_loaded_fields(tiny_mamba2, tokenizer_vocab):
    hf, folder = tiny_mamba2
    loaded = qmamba.load(folder)
    assert isinstance(loaded, api.Loaded)
    assert loaded.path == folder and loaded.name == str(folder) and loaded.format == "hf"
    assert loaded.config == json.loads((folder / "config.json").read_text())
    assert not loaded.model.training
    assert loaded.tokenizer.is_fast                # PreTrainedTokenizerFast (4.x), TokenizersBackend (5.x)
    assert len(loaded.tokenizer) == tokenizer_vocab
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.model.parameters())


def test_tied_head_stays_tied(tiny_mamba1):
    hf, folder = tiny_mamba1
    model = qmamba.load(folder).model
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert not any(p.is_meta for p in model.parameters())
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("dtype, expect", [("bfloat16", torch.bfloat16), (torch.float16, torch.float16),
                                           (None, torch.float32), ("float32", torch.float32)])
def test_dtype(tiny_mamba1, dtype, expect):
    model = qmamba.load(tiny_mamba1[1], dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {expect}
    assert model.lm_head.weight is model.backbone.embeddings.weight
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float32


def test_bad_dtype(tiny_mamba2):
    assert "unsupported dtype" in error_of(tiny_mamba2[1], dtype="int8")
    assert "unsupported dtype" in error_of(tiny_mamba2[1], dtype=torch.float64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tiny_mamba2):
    assert "CUDA is not available" in error_of(tiny_mamba2[1], device="cuda")


def test_bad_device(tiny_mamba2):
    assert "device" in error_of(tiny_mamba2[1], device="tpu")


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_argument(tiny_mamba2, tmp_path, tokenizer_dir):
    hf, folder = tiny_mamba2
    bare = Path(shutil.copytree(folder, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*",
                                                                                          "special_*")))
    assert qmamba.load(bare).tokenizer is None
    for source in (tokenizer_dir, tokenizer_dir / "tokenizer.json", str(tokenizer_dir)):
        tok = qmamba.load(bare, tokenizer=source).tokenizer
        assert tok("Sir Walter")["input_ids"] == qmamba.load(folder).tokenizer("Sir Walter")["input_ids"]
    own = qmamba.load(folder).tokenizer
    assert qmamba.load(bare, tokenizer=own).tokenizer is own
    assert "no tokenizer" in error_of(bare, tokenizer=tmp_path / "nowhere")


def test_tokenizer_class_named_in_config(tiny_copy):
    """A tokenizer_config.json naming another fast class (as hub models do) goes through AutoTokenizer."""
    path = tiny_copy / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "GPT2TokenizerFast"}))
    tok = qmamba.load(tiny_copy).tokenizer
    if installed_version() < (5,):                 # 5.x builds every fast tokenizer as TokenizersBackend
        assert type(tok).__name__ == "GPT2TokenizerFast"
    assert tok.is_fast
    assert tok("Sir Walter")["input_ids"] == qmamba.load(tiny_copy, tokenizer=tiny_copy / "tokenizer.json")\
        .tokenizer("Sir Walter")["input_ids"]


def test_tokenizer_larger_than_vocab(hf_factory, tmp_path, save_hf_folder):
    save_hf_folder(hf_factory("mamba2", vocab_size=101), tmp_path)
    assert "8192 tokens" in error_of(tmp_path)


def test_broken_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.json").write_text("{not json")
    assert "tokenizer" in error_of(tiny_copy)


# ----------------------------------------------------------------------------- names and paths
def test_missing_path(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nowhere")
    assert "does not exist" in error_of(str(tmp_path / "nowhere"))


def test_file_instead_of_folder(tiny_mamba2):
    assert "is a file" in error_of(tiny_mamba2[1] / "config.json")


def test_unknown_model_name():
    message = error_of("ref-mamba3")
    assert "unknown model 'ref-mamba3'" in message and "ref-mamba2" in message


def test_reference_model(tiny_mamba2, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "REFERENCE_DIR", tmp_path)
    assert api.REFERENCE_MODELS == ("ref-mamba2", "ref-mamba1", "ref-hybrid") and api.DEFAULT_MODEL == "ref-mamba2"
    assert "missing from this installation" in error_of("ref-mamba1")
    shutil.copytree(tiny_mamba2[1], tmp_path / "ref-mamba2")
    loaded = qmamba.load("ref-mamba2")
    assert loaded.name == "ref-mamba2" and loaded.path == tmp_path / "ref-mamba2"


def test_reference_dir_is_in_the_package():
    assert api.REFERENCE_DIR == Path(qmamba.__file__).parent / "assets" / "models"


# ----------------------------------------------------------------------------- hub
def test_hub_offline_fails_fast():
    start = time.perf_counter()
    message = error_of("state-spaces/mamba-130m-hf")
    assert time.perf_counter() - start < 5
    assert "offline" in message and "local model folder" in message


def test_hub_unreachable_fails_fast(monkeypatch):
    """Online mode against a port where nothing listens: connection refused, at once."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    message = error_of("state-spaces/mamba-130m-hf")
    assert time.perf_counter() - start < 15
    assert "unreachable" in message and "local model folder" in message


def test_hub_cache_is_used_offline(tiny_mamba2, tmp_path, monkeypatch):
    """A hub id already in the local cache loads without the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--owner--tiny"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_mamba2[1], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    loaded = qmamba.load("owner/tiny")
    assert loaded.name == "owner/tiny" and loaded.path == repo / "snapshots" / sha


# ----------------------------------------------------------------------------- bad folders
def test_folder_without_config(tmp_path):
    assert "no config.json" in error_of(tmp_path)


def test_folder_without_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    assert "has no weights" in error_of(tiny_copy)


def test_config_not_json(tiny_copy):
    (tiny_copy / "config.json").write_text("{'model_type': mamba2")
    assert "not valid JSON" in error_of(tiny_copy)


def test_unknown_model_type(tiny_copy):
    edit_config(tiny_copy, model_type="llama")
    assert "unknown model_type 'llama'" in error_of(tiny_copy)


def test_config_of_no_known_format(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    del cfg["model_type"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    assert "neither a transformers config" in error_of(tiny_copy)


def test_config_missing_value(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    del cfg["hidden_size"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    assert "hidden_size" in error_of(tiny_copy)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_bad_safetensors(tiny_copy, damage):
    path = tiny_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file " * 40,
                      "empty": b""}[damage])
    message = error_of(tiny_copy)
    assert str(path) in message and "safetensors" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled module"])
def test_bad_bin(hf_factory, tmp_path, damage, save_bin_folder):
    save_bin_folder(hf_factory("mamba2"), tmp_path)
    path = tmp_path / "pytorch_model.bin"
    data = path.read_bytes()
    if damage == "pickled module":
        torch.save({"layer": torch.nn.Linear(2, 2)}, path)
    else:
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 50)
    message = error_of(tmp_path)
    assert str(path) in message


def test_bin_that_is_not_a_state_dict(hf_factory, tmp_path, save_bin_folder):
    save_bin_folder(hf_factory("mamba2"), tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    assert "flat dict of tensors" in error_of(tmp_path)


def test_missing_shard(hf_factory, tmp_path):
    hf_factory("mamba2").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"shard {shard.name}" in error_of(tmp_path)


def test_shape_mismatch_names_key_and_shapes(tiny_copy):
    edit_config(tiny_copy, state_size=8)                     # weights were made with 16
    message = error_of(tiny_copy)
    assert "backbone.layers.0.mixer.in_proj.weight" in message
    assert "shape (164, 32) in the weights but (148, 32) from the config" in message


def test_missing_key(tiny_copy):
    edit_weights(tiny_copy, lambda sd: {k: v for k, v in sd.items() if not k.endswith("layers.0.mixer.D")})
    assert "missing 1 key(s): backbone.layers.0.mixer.D" in error_of(tiny_copy)


def test_unexpected_keys(tiny_copy):
    edit_weights(tiny_copy, lambda sd: {**sd, **{f"extra.{i}": torch.zeros(1) for i in range(5)}})
    message = error_of(tiny_copy)
    assert "unexpected 5 key(s): extra.0, extra.1, extra.2 and 2 more" in message


def test_fewer_layers_than_config(tiny_copy):
    edit_config(tiny_copy, num_hidden_layers=2)
    assert "missing" in error_of(tiny_copy) and "backbone.layers.1." in error_of(tiny_copy)


def test_untied_head_missing(tiny_copy):
    edit_weights(tiny_copy, lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"})
    message = error_of(tiny_copy)
    assert "lm_head.weight" in message and "not tied" in message


def test_tied_head_may_be_absent_or_present(tiny_mamba1, tmp_path):
    folder = Path(shutil.copytree(tiny_mamba1[1], tmp_path / "m"))
    edit_weights(folder, lambda sd: {**sd, "lm_head.weight": sd["backbone.embeddings.weight"].clone()})
    model = qmamba.load(folder).model
    assert model.lm_head.weight is model.backbone.embeddings.weight


def test_tied_config_with_a_different_head(tiny_mamba1, tmp_path):
    """Tying would silently drop a separate head: refuse instead."""
    folder = Path(shutil.copytree(tiny_mamba1[1], tmp_path / "m"))
    edit_weights(folder, lambda sd: {**sd, "lm_head.weight": sd["backbone.embeddings.weight"] + 1})
    assert "ties lm_head to the embeddings" in error_of(folder)


def test_foreign_or_inconsistent_quantization_config(tiny_copy):
    """A config with a quantization_config goes to the quantized loader, which refuses other
    tools' formats and tensors that do not match the declared quantization."""
    edit_config(tiny_copy, quantization_config={"quant_method": "gptq"})
    assert "only checkpoints written by qmamba" in error_of(tiny_copy)
    edit_config(tiny_copy, quantization_config={"quant_method": "qmamba", "format_version": 1,
                                                "method": "rtn", "w_bits": 8, "a_bits": 8,
                                                "state_quant": "tensor", "state_scale": "static"})
    assert "does not match its config" in error_of(tiny_copy)


# ----------------------------------------------------------------------------- our own folders
@pytest.mark.parametrize("arch, extra", [("mamba1", {}), ("mamba2", {}), ("mamba2", {"norm_group_size": 16})])
def test_save_model_round_trip(arch, extra, tmp_path, tokenizer_dir):
    """A folder written by `qmamba.models.save.save_model` (the reference models ship as such)
    loads back to the same model, tokenizer and all, the norm group of mamba_ssm included."""
    from qmamba.models import MambaLM, ModelConfig, init_weights
    from qmamba.models.save import save_model

    cfg = ModelConfig(arch=arch, vocab_size=8192, d_model=16, n_layer=2, d_state=8, headdim=8, ngroups=2,
                      chunk_size=8, **extra)
    model = init_weights(MambaLM(cfg), seed=3).eval()
    save_model(model, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    loaded = qmamba.load(tmp_path / "m")
    assert loaded.model.config.to_hf() == cfg.to_hf() and loaded.tokenizer is not None
    ids = torch.randint(0, 8192, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
