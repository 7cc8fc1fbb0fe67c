"""The compressed-tensors half of a quantized folder, checked against the `compressed-tensors`
package itself: its pydantic QuantizationConfig accepts quantization_config as written (and
ignores qmamba's extension key), its pack_to_int32 packs codes exactly as qmamba does, and its
schemes name the linears qmamba quantized."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qmamba.formats import compressed_tensors as ct

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed "
                    "(pip install 'compressed-tensors>=0.15')")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [7, 32, 45, 64])
def test_packing_is_the_librarys(bits, cols):
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (5, cols), generator=torch.Generator().manual_seed(bits * cols),
                          dtype=torch.int8)
    ours = ct.pack_int32(codes, bits)
    assert ours.dtype == torch.int32 and ours.shape == (5, math.ceil(cols * bits / 32))
    assert torch.equal(ours, pack_to_int32(codes, bits))
    assert torch.equal(ct.unpack_int32(ours, bits, cols), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size((5, cols))), codes)


CASES = [("mamba2", "w8a8h4", "rtn", {}), ("mamba2", "w4a8h4", "qmamba", {"w_group_size": 8}),
         ("mamba1", "w8a8", "smoothquant", {"a_dynamic": True}), ("mamba2", "w4a16", "rtn", {}),
         ("mamba1", "w8a8h4", "quamba", {"quantize_head": True}), ("mamba2", "h4", "dsq", {})]


@pytest.mark.parametrize("arch, spec, method, options", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_quantization_config_is_the_librarys(arch, spec, method, options, tmp_path, monkeypatch):
    from tests.quant.test_checkpoint import CALIB, float_model
    from qmamba.quant.checkpoint import save_quantized
    from qmamba.quantize import quantize

    monkeypatch.setenv("QMAMBA_COMPILE", "0")
    model = quantize(float_model(arch), spec, calib=CALIB, method=method, progress=False, **options)
    out = save_quantized(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)                      # raises on a malformed field
    assert "qmamba" in qc and not hasattr(parsed, "qmamba")              # the extension is ignored
    assert parsed.quant_method == "compressed-tensors" and parsed.quantization_status == "compressed"
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    quantized = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")})
    from compressed_tensors.utils.match import match_name

    for name in quantized:                                               # each in exactly one group
        hits = [g for g, s in parsed.config_groups.items() if any(match_name(name, t) for t in s.targets)]
        assert len(hits) == 1, name
        scheme = parsed.config_groups[hits[0]]
        assert scheme.weights.num_bits == model.quant_config.w_bits
        fmt = scheme.format.value if hasattr(scheme.format, "value") else scheme.format
        assert (name + ".weight_packed" in sd) == (fmt == "pack-quantized")
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            assert sd[name + ".input_scale"].shape == (1,)
    if model.quant_config.w_bits is None:
        assert not quantized and not parsed.config_groups
