"""Memory as real bytes (qmamba.eval.memory and `qmamba memory`): weights are the tensors of the
state dict (shared ones once), states the tensors `allocate_cache` returns."""

from __future__ import annotations

import json
import time

import pytest
import torch

from qmamba.cli import main
from qmamba.eval.memory import cast_float_weights, memory_report
from qmamba.methods import resolve_config
from qmamba.methods.checkpoint import quantize_structure
from qmamba.models import MambaLM, ModelConfig, init_weights
from qmamba.models.shapes import SHAPES, shape_config
from qmamba.quant.apply import mixers
from qmamba.quant.linear import QLinear
from qmamba.quantize import quantize

VOCAB = 64
CALIB = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


def tiny(arch: str, tie: bool = True) -> MambaLM:
    if arch == "mamba1":
        cfg = ModelConfig(arch="mamba1", vocab_size=VOCAB, d_model=32, n_layer=2, d_state=16, tie_embeddings=tie)
    else:
        cfg = ModelConfig(arch="mamba2", vocab_size=VOCAB, d_model=32, n_layer=2, d_state=32, headdim=16,
                          ngroups=2, chunk_size=8, tie_embeddings=tie)
    return init_weights(MambaLM(cfg), 0).eval()


def real_bytes(model) -> tuple[int, dict]:
    """Bytes of the state dict's tensors, each storage once: computed here, independently."""
    seen, total, by_dtype = set(), 0, {}
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        total += n
        name = str(t.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + n
    return total, by_dtype


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_float_weights_are_the_state_dict(arch, tie):
    model = tiny(arch, tie)
    r = memory_report(model, batches=(1,))
    total, by_dtype = real_bytes(model)
    assert r["meta"] is False
    assert r["weights"]["total"] == total and r["weights"]["by_dtype"] == by_dtype == {"float32": total}
    assert total == model.num_parameters() * 4                          # the tied head counted once
    emb = model.config.vocab_size * model.config.d_model * 4
    untied_total = real_bytes(tiny(arch, False))[0]
    assert untied_total - real_bytes(tiny(arch, True))[0] == emb
    assert r["weights"]["fp16"] == model.num_parameters() * 2 and r["weights"]["ratio"] == pytest.approx(2.0)
    cast_float_weights(model, torch.float16)
    assert memory_report(model)["weights"]["total"] == model.num_parameters() * 2


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("head", [False, True])
def test_quantized_weights_are_the_state_dict(arch, head):
    model = quantize(tiny(arch), "w8a8h4", calib=CALIB, method="dsq", progress=False, quantize_head=head)
    cast_float_weights(model, torch.float16)                              # as `qmamba memory` does
    r = memory_report(model)
    total, by_dtype = real_bytes(model)
    assert r["weights"]["total"] == total and r["weights"]["by_dtype"] == by_dtype
    assert set(by_dtype) == {"float16", "float32", "int8"}
    # int8: every mixer linear's codes, plus the embedding's when the head is quantized
    lins = [m for _, _, mixer in mixers(model) for m in mixer.modules() if isinstance(m, QLinear)]
    codes = sum(lin.out_features * lin.in_features for lin in lins)
    cfg = model.config
    assert by_dtype["int8"] == codes + (cfg.vocab_size * cfg.d_model if head else 0)
    # W8 mixer linears: 1 byte per weight + one float32 scale per output row = FP16 / 2 + 4 / row
    for lin in lins:
        q = lin.qweight.numel() * 1 + lin.w_scale.numel() * 4
        fp16 = lin.out_features * lin.in_features * 2
        assert q / fp16 == pytest.approx(0.5 + 2 / lin.in_features)
    ratio = sum(lin.qweight.numel() + 4 * lin.w_scale.numel() for lin in lins) / \
        sum(2 * lin.out_features * lin.in_features for lin in lins)
    assert 0.5 < ratio < 0.6
    # scales stay float32 after the cast
    assert all(lin.w_scale.dtype == torch.float32 for lin in lins)


# ------------------------------------------------------------------------------- states
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_h4_dsq_dynamic_state_bytes(arch, batch):
    model = quantize(tiny(arch), "w8a8h4", calib=CALIB, method="dsq", progress=False)
    q = model.quant_config
    assert (q.state_quant, q.state_scale) == ("dsq", "dynamic")
    cfg = model.config
    d, n, L = cfg.d_inner, cfg.d_state, cfg.n_layer
    r = memory_report(model, batches=(batch,))["batches"][str(batch)]
    assert r["state"]["ssm"] == L * (batch * d * n // 2 + batch * d * 2)   # packed codes + fp16 s_c
    assert r["state"]["conv"] == L * batch * cfg.conv_dim * (cfg.d_conv - 1)  # int8 conv codes (static A8)
    assert r["state_fp16"] == {"conv": L * batch * cfg.conv_dim * (cfg.d_conv - 1) * 2,
                               "ssm": L * batch * d * n * 2,
                               "total": L * batch * (cfg.conv_dim * (cfg.d_conv - 1) + d * n) * 2}
    assert r["ssm_ratio"] == pytest.approx((n / 2 + 2) / (2 * n))
    # the same numbers as the cache the model really allocates
    cache = model.allocate_cache(batch)
    assert cache.nbytes() == {"conv": r["state"]["conv"], "ssm": r["state"]["ssm"]}
    assert all(layer.ssm.codes.dtype == torch.uint8 and layer.ssm.scales.dtype == torch.float16 for layer in cache)


@pytest.mark.parametrize("spec, options, per_layer", [
    ("h4", dict(state_quant="dsq", state_scale="static"), lambda b, d, n: b * d * n // 2),
    ("h8", dict(state_quant="dsq", state_scale="dynamic"), lambda b, d, n: b * d * n + b * d * 2),
    ("h3", dict(state_quant="tensor", state_scale="dynamic"), lambda b, d, n: b * d * n // 2 + b * 2),
    ("h4", dict(state_quant="group", state_scale="dynamic"), lambda b, d, n: b * d * n // 2 + b * d * (n // 8) * 2),
    ("w8a8", dict(), lambda b, d, n: b * d * n * 4),                  # float state in the model's float32
])
def test_state_bytes_per_config(spec, options, per_layer):
    model = quantize(tiny("mamba2"), spec, calib=CALIB, method="rtn", progress=False, **options)
    cfg = model.config
    r = memory_report(model, batches=(2,))["batches"]["2"]
    assert r["state"]["ssm"] == cfg.n_layer * per_layer(2, cfg.d_inner, cfg.d_state)


def test_meta_structure_bytes_match_a_real_model():
    """Bytes do not depend on calibration: the meta-device structure (what `qmamba memory` builds)
    reports the bytes of the calibrated model."""
    real = quantize(tiny("mamba2"), "w4a8h4", calib=CALIB, method="dsq", progress=False)
    qcfg = resolve_config("w4a8h4", "dsq")
    with torch.device("meta"):
        meta = quantize_structure(MambaLM(real.config), qcfg, "dsq")
    a, b = memory_report(real, (1, 2)), memory_report(meta, (1, 2))
    assert b["meta"] is True and a["meta"] is False
    assert a["weights"]["total"] == b["weights"]["total"] and a["weights"]["by_dtype"] == b["weights"]["by_dtype"]
    assert a["batches"] == b["batches"]


# ------------------------------------------------------------------------------- the CLI
def test_cli_memory_on_meta_shapes(tmp_path, capsys):
    out = tmp_path / "mem.json"
    t0 = time.perf_counter()
    assert main(["memory", "mamba2-130m", "--quant", "w8a8h4", "--batch", "1,4", "--json", str(out)]) == 0
    seconds = time.perf_counter() - t0
    assert seconds < 30, f"building mamba2-130m on the meta device took {seconds:.1f} s"
    r = json.loads(out.read_text())
    assert r["meta"] is True and "meta device" in r["source"]
    assert r["quantization"]["config"] == "W8A8H4" and r["quantization"]["method"] == "qmamba"
    assert r["quantization"]["state_quant"] == "dsq" and r["float_dtype"] == "float16"
    s = SHAPES["mamba2-130m"]
    cfg = shape_config("mamba2-130m")
    d, n, L = cfg.d_inner, cfg.d_state, cfg.n_layer
    assert (d, n, L) == (2 * s["d_model"], 128, 24)
    for b in (1, 4):
        st = r["batches"][str(b)]["state"]
        assert st["ssm"] == L * (b * d * n // 2 + b * d * 2)
        assert st["conv"] == L * b * cfg.conv_dim * (cfg.d_conv - 1)
    w = r["weights"]
    in_proj = cfg.d_model * (2 * d + 2 * cfg.ngroups * n + cfg.nheads)
    assert w["by_dtype"]["int8"] == L * (in_proj + d * cfg.d_model)
    assert w["by_dtype"]["float16"] >= cfg.vocab_size * cfg.d_model * 2   # the (tied) embedding
    with torch.device("meta"):
        params = MambaLM(cfg).num_parameters()
    assert w["fp16"] == params * 2 and w["fp16"] > w["total"]
    assert 0.5 < w["ratio"] < 0.7
    assert "meta device" in capsys.readouterr().out


def test_cli_memory_float_meta_is_fp16(tmp_path):
    out = tmp_path / "mem.json"
    assert main(["memory", "mamba-130m", "--batch", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["quantization"] is None and r["meta"] is True
    assert r["weights"]["total"] == r["weights"]["fp16"] and r["weights"]["ratio"] == 1.0
    cfg = shape_config("mamba-130m")
    # a float state is stored in the model's dtype (float16 here), as transformers and mamba_ssm do
    assert r["batches"]["2"]["state"]["ssm"] == cfg.n_layer * 2 * cfg.d_inner * cfg.d_state * 2
    assert r["batches"]["2"]["ssm_ratio"] == 1.0


def test_cli_memory_on_a_model_folder(tiny_mamba2, tmp_path):
    out = tmp_path / "mem.json"
    assert main(["memory", str(tiny_mamba2[1]), "--quant", "h4", "--batch", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["meta"] is False and r["quantization"]["config"] == "H4"
    cfg = tiny_mamba2[0].config
    d, n = cfg.expand * cfg.hidden_size, cfg.state_size
    assert r["batches"]["2"]["state"]["ssm"] == cfg.num_hidden_layers * (2 * d * n // 2 + 2 * d * 2)


@pytest.mark.parametrize("argv, needle", [
    (["memory", "mamba2-130m", "--batch", "0"], "--batch"),
    (["memory", "mamba2-130m", "--batch", "x"], "--batch"),
    (["memory", "mamba2-130m", "--quant", "w9"], "W9"),
    (["memory", "mamba2-130m", "--quant", "h4", "--state-quant", "rows"], "rows"),
])
def test_cli_memory_bad_input(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qmamba memory: error:") and needle in err
