"""Quantized checkpoints (qmamba.quant.checkpoint): save_quantized -> qmamba.load round trips bit
for bit for both architectures, the configs and methods; the file holds integer codes and float32
scales; config.json says how to rebuild; saving is atomic; mismatches are refused."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qmamba
from qmamba.errors import QMambaError
from qmamba.formats import compressed_tensors as ct
from qmamba.models import MambaLM, ModelConfig, init_weights
from qmamba.quant.checkpoint import QUANT_METHOD, save_quantized
from qmamba.quant.config import FORMAT_VERSION
from qmamba.quant.embedding import QEmbedding, TiedQHead
from qmamba.quant.linear import QLinear
from qmamba.quantize import quantize

ARCHS = ("mamba1", "mamba2")
METHODS = ("rtn", "smoothquant", "quamba", "dsq")
CONFIGS = {                                       # name -> (spec, options)
    "w8a8h4": ("w8a8h4", {}),
    "w4a8h4-g8": ("w4a8h4", {"w_group_size": 8}),
    "w4a16": ("w4a16", {}),
    "h4": ("h4", {}),
    "w8a8-dyn": ("w8a8", {"a_dynamic": True}),
    "w8a8h4-head": ("w8a8h4", {"quantize_head": True}),
}
VOCAB = 64
CALIB = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
SCALE_SUFFIXES = ("w_scale", ".scale", "s_n", "static_scale", "weight_scale", "input_scale")
FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "qmamba-extension.safetensors"]


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    """The fused quantized scan eagerly (compiling it costs seconds per layout; see test_state)."""
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


@functools.lru_cache(maxsize=None)
def _float_model(arch: str, tie: bool) -> MambaLM:
    """2 layers; Mamba1 d_model 32 (dt_rank 2: W4 packs dt_proj's two input columns), Mamba2 with
    4 heads and 2 groups; weights ~ N(0, 1/fan_in) so activations and states are of order 1."""
    if arch == "mamba1":
        cfg = ModelConfig(arch="mamba1", vocab_size=VOCAB, d_model=32, n_layer=2, d_state=16, tie_embeddings=tie)
    else:
        cfg = ModelConfig(arch="mamba2", vocab_size=VOCAB, d_model=32, n_layer=2, d_state=32, headdim=16,
                          ngroups=2, chunk_size=8, tie_embeddings=tie)
    model = init_weights(MambaLM(cfg), 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "dt_proj.bias")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g) - 1.0)
            elif p.dim() >= 2 and "conv1d" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(1 if "embeddings" in name else p.shape[1]))
    return model.eval()


def float_model(arch: str, tie: bool = True) -> MambaLM:
    return copy.deepcopy(_float_model(arch, tie))


def quantized(arch, config, method, tie=True, **extra) -> MambaLM:
    spec, options = CONFIGS[config]
    return quantize(float_model(arch, tie), spec, calib=CALIB, method=method, progress=False,
                    **options, **extra)


@torch.no_grad()
def logits_and_steps(model):
    """Full-forward logits, and a 3-token prefill then 3 decoding steps."""
    full = model(IDS)
    cache = model.allocate_cache(IDS.shape[0])
    out = [model(IDS[:, :3], cache)[:, -1]]
    for t in range(3, 6):
        out.append(model.step(IDS[:, t], cache))
    return full, torch.stack(out, 1)


CASES = [(a, c, m, True) for a, c, m in itertools.product(ARCHS, CONFIGS, METHODS)] + \
        [(a, "w8a8h4-head", m, False) for a, m in itertools.product(ARCHS, METHODS)]


@pytest.mark.parametrize("arch, config, method, tie", CASES,
                         ids=[f"{a}-{c}-{m}-{'tied' if t else 'untied'}" for a, c, m, t in CASES])
def test_round_trip_bit_for_bit(arch, config, method, tie, tmp_path):
    model = quantized(arch, config, method, tie)
    before = logits_and_steps(model)
    out = save_quantized(model, tmp_path / "q")
    assert out == tmp_path / "q" and sorted(p.name for p in out.iterdir()) == FILES
    loaded = qmamba.load(out)
    assert loaded.format == "hf" and loaded.tokenizer is None
    m2 = loaded.model
    after = logits_and_steps(m2)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert m2.quant_config == model.quant_config and m2.quant_method == method
    assert not m2.training

    # the tensors: compressed-tensors' integer codes and float32 scales under transformers' names,
    # qmamba's extension (state, mixer-internal quantizers) in a file of its own
    sd = load_file(out / "model.safetensors")
    ext = load_file(out / ct.EXTENSION_FILE)
    spec, options = CONFIGS[config]
    assert json.loads((out / ct.INDEX_FILE).read_text())["weight_map"] == {k: "model.safetensors" for k in sd}
    qc = model.quant_config
    linears = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")} |
                     {k[: -len(".qweight")] for k in ext if k.endswith(".qweight")})
    assert not any(k.endswith(("qweight", "w_scale")) for k in sd)
    if qc.w_bits is None:
        assert not linears
    else:
        n_linears = model.config.n_layer * (4 if arch == "mamba1" else 2) + (not tie and qc.quantize_head)
        assert len(linears) == n_linears
        for name in linears:
            lin = m2.get_submodule(name)
            if name + ".qweight" in ext:                               # Quamba's rotated out_proj
                assert method == "quamba" and name.endswith("out_proj") and sd[name + ".weight"].is_floating_point()
                continue
            if name + ".weight_packed" in sd:
                assert lin.w_bits <= 4 and sd[name + ".weight_packed"].dtype == torch.int32
                assert sd[name + ".weight_packed"].shape == (lin.out_features, math.ceil(lin.in_features * lin.w_bits / 32))
                assert sd[name + ".weight_shape"].tolist() == [lin.out_features, lin.in_features]
            else:
                assert sd[name + ".weight"].dtype == torch.int8
                assert sd[name + ".weight"].shape == (lin.out_features, lin.in_features)
                assert torch.equal(sd[name + ".weight"], lin.codes())
            assert sd[name + ".weight_scale"].dtype == torch.float32
        if options.get("w_group_size"):
            assert any(sd[n + ".weight_scale"].shape[1] > 1 for n in linears if n + ".weight_scale" in sd)
    for k, v in [*sd.items(), *ext.items()]:
        if k.endswith(SCALE_SUFFIXES):
            assert v.dtype == torch.float32, k
    if qc.quantize_head:
        assert ext["backbone.embeddings.codes"].dtype == torch.int8
        assert sd["backbone.embeddings.weight"].is_floating_point()     # dequantized, for other loaders
        assert isinstance(m2.backbone.embeddings, QEmbedding)
        if tie:
            assert isinstance(m2.lm_head, TiedQHead) and m2.lm_head._emb[0] is m2.backbone.embeddings
            assert not any(k.startswith("lm_head") for k in sd)
        else:
            assert isinstance(m2.lm_head, QLinear) and sd["lm_head.weight"].dtype == torch.int8
    elif tie:
        assert "lm_head.weight" not in sd and m2.lm_head.weight is m2.backbone.embeddings.weight
    if qc.h_bits is not None:
        assert all(f"backbone.layers.{i}.mixer.state_quant.s_n" in ext for i in range(model.config.n_layer))

    # config.json says how to rebuild
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "compressed-tensors"
    q = raw["quantization_config"]["qmamba"]
    assert q["quant_method"] == QUANT_METHOD == "qmamba" and q["format_version"] == ct.FORMAT_VERSION == 2
    assert q["qmamba_version"] == qmamba.__version__ and q["method"] == method
    assert (q["w_bits"], q["a_bits"], q["h_bits"]) == (qc.w_bits, qc.a_bits, qc.h_bits)
    assert q["config"] == qc.name and q["state_quant"] == qc.state_quant and q["state_quant"] is not None
    assert q["state_scale"] == qc.state_scale and q["w_group_size"] == qc.w_group_size
    assert q["a_dynamic"] == qc.a_dynamic and q["quantize_head"] == qc.quantize_head
    assert raw["model_type"] == ("mamba" if arch == "mamba1" else "mamba2")
    assert raw["tie_word_embeddings"] == tie


# ------------------------------------------------------------------------------- atomic saving
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A W8A8H4 (rtn) Mamba2 checkpoint and its model; tests copy the folder before damaging it."""
    model = quantized("mamba2", "w8a8h4", "rtn")
    return model, save_quantized(model, tmp_path_factory.mktemp("ckpt") / "q")


def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dest))


def test_existing_out_refused_without_force(saved, tmp_path):
    model, folder = saved
    out = _copy(folder, tmp_path / "q")
    (out / "marker.txt").write_text("old")
    with pytest.raises(QMambaError, match="already exists"):
        save_quantized(model, out)
    assert (out / "marker.txt").exists()                               # untouched
    save_quantized(model, out, force=True)
    assert not (out / "marker.txt").exists()                           # replaced as a whole
    with torch.no_grad():
        assert torch.equal(qmamba.load(out).model(IDS), model(IDS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]         # no temp or old folder left


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(saved, tmp_path, monkeypatch, existing):
    import qmamba.models.save as save_module

    model, folder = saved

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "save_file", broken)
    out = tmp_path / "q"
    if existing:
        _copy(folder, out)
    with pytest.raises(QMambaError, match="cannot write .*disk full"):
        save_quantized(model, out, force=existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["q"] if existing else [])
    if existing:                                                       # the old checkpoint survives
        with torch.no_grad():
            assert torch.equal(qmamba.load(out).model(IDS), model(IDS))


def test_save_float_model_refused(tmp_path):
    with pytest.raises(QMambaError, match="not quantized"):
        save_quantized(float_model("mamba1"), tmp_path / "q")
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------- refusals
def test_quantizing_a_quantized_model_raises(saved):
    model, folder = saved
    with pytest.raises(QMambaError, match="already quantized"):
        quantize(model, "w8a8h4", calib=CALIB, method="rtn", progress=False)
    loaded = qmamba.load(folder)
    with pytest.raises(QMambaError, match="already quantized"):
        quantize(loaded, "h4", calib=CALIB, method="dsq", progress=False)


def _edit_config(folder: Path, outer: bool = False, **changes) -> None:
    """Change qmamba's extension of quantization_config (`outer`: compressed-tensors' fields)."""
    raw = json.loads((folder / "config.json").read_text())
    (raw["quantization_config"] if outer else raw["quantization_config"]["qmamba"]).update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def _edit_tensors(folder: Path, fn, file: str = "model.safetensors") -> None:
    sd = load_file(folder / file)
    fn(sd)
    save_file(sd, str(folder / file), metadata={"format": "pt"})


QW = "backbone.layers.0.mixer.in_proj.weight"                     # int8 codes (compressed-tensors)


@pytest.mark.parametrize("case, needle", [
    ("config_w4", QW + "_packed"),                      # int8 (260, 32) where W4 expects int32 (260, 4)
    ("config_dsq", "backbone.layers.0.mixer.state_quant.static_scale"),   # (1, 1) where dsq is (d, 1)
    ("config_w16", QW),                                 # no W: qweight is unexpected
    ("missing", "backbone.layers.1.mixer.state_quant.s_n"),
    ("unexpected", "backbone.layers.0.mixer.extra"),
    ("float_codes", QW),
    ("shape", "backbone.layers.1.mixer.out_proj.weight_scale"),
])
def test_tensors_not_matching_config_raise_naming_the_tensor(saved, tmp_path, case, needle):
    out = _copy(saved[1], tmp_path / "q")
    if case == "config_w4":
        _edit_config(out, w_bits=4)
    elif case == "config_dsq":
        _edit_config(out, state_quant="dsq")
    elif case == "config_w16":
        _edit_config(out, w_bits=None)
    elif case == "missing":
        _edit_tensors(out, lambda sd: sd.pop(needle), ct.EXTENSION_FILE)
    elif case == "unexpected":
        _edit_tensors(out, lambda sd: sd.__setitem__(needle, torch.zeros(3)))
    elif case == "float_codes":
        _edit_tensors(out, lambda sd: sd.__setitem__(QW, sd[QW].float()))
    elif case == "shape":
        _edit_tensors(out, lambda sd: sd.__setitem__(needle, sd[needle][:-1]))
    with pytest.raises(QMambaError, match=needle.replace(".", r"\.")):
        qmamba.load(out)


def test_integer_dtype_mismatch_raises(saved, tmp_path):
    out = _copy(saved[1], tmp_path / "q")
    _edit_tensors(out, lambda sd: sd.__setitem__(QW, sd[QW].view(torch.uint8)))
    with pytest.raises(QMambaError, match=QW.replace(".", r"\.")):
        qmamba.load(out)


def test_newer_format_version_raises(saved, tmp_path):
    out = _copy(saved[1], tmp_path / "q")
    _edit_config(out, format_version=ct.FORMAT_VERSION + 1)
    with pytest.raises(QMambaError, match="newer"):
        qmamba.load(out)


def test_foreign_quantization_config_raises(saved, tmp_path):
    out = _copy(saved[1], tmp_path / "q")
    _edit_config(out, outer=True, quant_method="gptq")
    with pytest.raises(QMambaError, match="gptq"):
        qmamba.load(out)


def test_loaded_dtype_keeps_float32_scales(saved):
    model, folder = saved
    m = qmamba.load(folder, dtype="bfloat16").model
    lin = m.backbone.layers[0].mixer.in_proj
    assert lin.w_scale.dtype == torch.float32 and lin.qweight.dtype == torch.int8
    assert m.backbone.layers[0].mixer.state_quant.s_n.dtype == torch.float32
    assert m.backbone.embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out, ref = m(IDS).float(), model(IDS)
    # bfloat16 activations (8-bit mantissa; some A8/H4 codes move) against the float32 model:
    # close, not equal (measured 0.054; a wrong scale or code layout gives errors of order 1)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.15, err


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_stochastic_rounding_reload_reproduces(mode, tmp_path):
    model = quantize(float_model("mamba2"), "h4", calib=CALIB, method="rtn", state_quant="dsq",
                     state_scale=mode, state_rounding="stochastic", progress=False)
    with torch.no_grad():
        before = model(IDS)
    loaded = qmamba.load(save_quantized(model, tmp_path / "q")).model
    with torch.no_grad():
        assert torch.equal(loaded(IDS), before)


def test_format_version_1_folders_still_load(tmp_path):
    """A folder in the private layout of format_version 1 (quant_method "qmamba", qweight tensors,
    one safetensors file), as qmamba wrote it before compressed-tensors, loads bit for bit."""
    from qmamba.models.save import save_model, state_dict_for_save
    from qmamba.quant.checkpoint import quantization_config

    model = quantized("mamba2", "w4a8h4-g8", "qmamba")
    out = save_model(model, tmp_path / "v1", extra_config={"quantization_config": quantization_config(model)},
                     tensors=state_dict_for_save(model))
    # format_version 1 wrote a Mamba2's gated-norm group size whenever it was not all of d_inner
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "qmamba_norm_group_size": model.config.norm_group_size}))
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == "qmamba" and raw["format_version"] == FORMAT_VERSION == 1
    loaded = qmamba.load(out).model
    before, after = logits_and_steps(model), logits_and_steps(loaded)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_format_version_1_grouped_mamba2_keeps_its_whole_width_norm(tmp_path):
    """A grouped Mamba2 quantized by qmamba before the per-group gated norm (format_version 1, a
    transformers config, no qmamba_norm_group_size: the norm was over all of d_inner) loads with
    the function it was calibrated with, not with the per-group norm of today's default."""
    from qmamba.models.save import save_model, state_dict_for_save
    from qmamba.quant.checkpoint import quantization_config

    fp = float_model("mamba2")
    fp.config = dataclasses.replace(fp.config, norm_group_size=fp.config.d_inner)
    for layer in fp.backbone.layers:
        layer.mixer.norm.group_size = fp.config.d_inner
    model = quantize(fp, "w8a8h4", calib=CALIB, method="rtn", progress=False)
    out = save_model(model, tmp_path / "v1", extra_config={"quantization_config": quantization_config(model)},
                     tensors=state_dict_for_save(model))
    raw = json.loads((out / "config.json").read_text())
    raw.pop("qmamba_norm_group_size", None)                    # as format_version 1 wrote it
    (out / "config.json").write_text(json.dumps(raw))
    loaded = qmamba.load(out).model
    assert loaded.backbone.layers[0].mixer.norm.group_size == model.config.d_inner
    before, after = logits_and_steps(model), logits_and_steps(loaded)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_missing_extension_file_is_one_clear_error(saved, tmp_path):
    out = _copy(saved[1], tmp_path / "q")
    (out / ct.EXTENSION_FILE).unlink()
    with pytest.raises(QMambaError, match="lacks qmamba-extension.safetensors"):
        qmamba.load(out)
    raw = json.loads((out / "config.json").read_text())
    del raw["quantization_config"]["qmamba"]                          # a plain llm-compressor folder
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(QMambaError, match="without qmamba's extension"):
        qmamba.load(out)
