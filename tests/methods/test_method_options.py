"""Methods as registered lifecycle classes with typed options: options dataclasses (unknown names
refused), the flags generated from their fields, and the model's one quantization record."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from qmamba.cli.common import add_quant_args, method_options
from qmamba.errors import QMambaError
from qmamba.methods import available, get_method
from qmamba.methods.esr import ESRConfig
from qmamba.methods.registry import Method, option_fields
from qmamba.models import MambaLM, ModelConfig, QuantState, init_weights
from qmamba.quantize import quantize


def test_every_method_is_a_lifecycle_with_an_options_dataclass():
    assert set(available()) == {"rtn", "smoothquant", "quamba", "dsq", "qmamba"}
    for name in available():
        m = get_method(name)
        assert isinstance(m, Method) and m.name == name and dataclasses.is_dataclass(m.options)


def test_esr_defaults_are_unchanged():
    d = ESRConfig()
    assert (d.sim, d.epochs, d.batch_size, d.nsamples, d.seqlen, d.lr, d.chunk, d.seed, d.device) == \
        ("exact", 4, 4, 64, 256, 2e-2, 32, 0, None)
    assert (d.learn_weights, d.learn_acts, d.learn_state, d.learn_dt_bias) == (True, True, True, False)


@pytest.mark.parametrize("method, options, needle", [
    ("rtn", {"alpha": 0.5}, "method rtn has no option(s) alpha"),
    ("qmamba", {"seed": 3}, "method qmamba has no option(s) seed"),       # the quantization seed
    ("smoothquant", {"alpha": 2.0}, "must be in [0, 1]"),
    ("quamba", {"percentile": 0.0}, "must be in (0, 100]"),
    ("qmamba", {"epochs": 0}, "ESR epochs must be positive"),
])
def test_bad_options(method, options, needle):
    with pytest.raises(QMambaError) as e:
        get_method(method).make_options(options)
    assert needle in str(e.value)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_quant_args(p)
    return p.parse_args(list(argv))


def test_flags_are_generated_from_the_option_fields():
    flags = {f.flag for f in option_fields(get_method("qmamba").options)}
    assert {"--esr-sim", "--esr-epochs", "--esr-lr", "--esr-nsamples", "--esr-seqlen", "--esr-batch-size",
            "--esr-dt-bias", "--esr-resume", "--esr-chunk", "--esr-learn-weights"} <= flags
    assert "--esr-seed" not in flags
    args = parse("--esr-sim", "chunk", "--esr-epochs", "2", "--esr-dt-bias", "--no-esr-learn-acts",
                 "--esr-resume", "r")
    assert method_options(args) == dict(sim="chunk", epochs=2, learn_dt_bias=True, learn_acts=False,
                                        resume_dir=Path("r"))
    assert method_options(parse("--method", "smoothquant", "--smoothquant-alpha", "0.7")) == {"alpha": 0.7}
    assert method_options(parse("--method", "rtn")) == {}
    with pytest.raises(QMambaError, match=r"--esr-epochs only apply to --method qmamba \(ESR\), not quamba"):
        method_options(parse("--method", "quamba", "--esr-epochs", "2"))


def test_quantize_records_one_quant_state():
    cfg = ModelConfig(arch="mamba2", vocab_size=64, d_model=32, n_layer=2, headdim=16, d_state=16)
    model = init_weights(MambaLM(cfg), 0)
    assert model.quant_state is None and model.quant_config is None
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, "w8a8h8", calib=calib, method="qmamba", progress=False,
             method_options=dict(nsamples=2, seqlen=16, epochs=1))
    qs = model.quant_state
    assert isinstance(qs, QuantState) and qs.method == "qmamba" and qs.config.name == "W8A8H8"
    assert qs.seconds > 0 and [r["block"] for r in qs.records] == [0, 1]
    assert model.quant_config is qs.config and model.quant_method == "qmamba"
