"""`QuantConfig` (qmamba.quant.config): the WxAyHz notation, its validation and serialization."""

from __future__ import annotations

import json

import pytest

from qmamba.errors import QMambaError
from qmamba.quant.config import ROUNDINGS, SCALE_MODES, STATE_QUANTIZERS, QuantConfig


@pytest.mark.parametrize("spec, bits, name", [
    ("w8a8h4", (8, 8, 4), "W8A8H4"),
    ("W8A8", (8, 8, None), "W8A8"),
    ("w4a16", (4, None, None), "W4"),
    ("w4a8h8", (4, 8, 8), "W4A8H8"),
    ("h4", (None, None, 4), "H4"),
    ("w8a8h16", (8, 8, None), "W8A8"),          # H16 = floating-point state
    ("W2A4H2", (2, 4, 2), "W2A4H2"),
    ("  w8A8H4 ", (8, 8, 4), "W8A8H4"),
    ("a8", (None, 8, None), "A8"),
    ("w16a8", (None, 8, None), "A8"),
])
def test_parse_accepts(spec, bits, name):
    q = QuantConfig.parse(spec)
    assert (q.w_bits, q.a_bits, q.h_bits) == bits
    assert q.kv_bits is None                                           # no KV part: float KV cache
    assert q.name == name
    assert QuantConfig.parse(q.name) == q                              # the name parses back


@pytest.mark.parametrize("spec, bits, name", [
    ("w8a8h4kv8", (8, 8, 4, 8), "W8A8H4KV8"),
    ("w8a8h4kv4", (8, 8, 4, 4), "W8A8H4KV4"),
    ("w8a8kv8", (8, 8, None, 8), "W8A8KV8"),
    ("W8A8H4KV16", (8, 8, 4, None), "W8A8H4"),      # KV16 = floating-point KV cache
    ("kv4", (None, None, None, 4), "KV4"),
    (" w4a16Kv8 ", (4, None, None, 8), "W4KV8"),
])
def test_parse_kv_part(spec, bits, name):
    q = QuantConfig.parse(spec)
    assert (q.w_bits, q.a_bits, q.h_bits, q.kv_bits) == bits
    assert q.name == name
    assert QuantConfig.parse(q.name) == q


@pytest.mark.parametrize("spec", ["w8a8h4kv3", "w8a8kv2", "kv1", "w8a8h4kv6", "kv9"])
def test_kv_bits_unsupported_one_line(spec):
    with pytest.raises(QMambaError) as info:
        QuantConfig.parse(spec)
    msg = str(info.value)
    assert "\n" not in msg and "8 or 4" in msg and msg.startswith("KV")


@pytest.mark.parametrize("spec", ["w8a8h4kv", "kv8h4", "w8kv8a8", "w8a8h4kv8x", "kvv8"])
def test_kv_part_misplaced_rejected(spec):
    with pytest.raises(QMambaError, match="WxAyHz"):
        QuantConfig.parse(spec)


def test_kv_bits_direct_validation():
    assert QuantConfig(kv_bits=8).name == "KV8"
    assert QuantConfig.parse("w8a8kv4").kv_group_size == 32                 # tokens per key scale
    with pytest.raises(QMambaError, match="8 or 4"):
        QuantConfig(kv_bits=5)
    with pytest.raises(QMambaError, match="group sizes must be positive"):
        QuantConfig.parse("kv4", kv_group_size=0)


@pytest.mark.parametrize("spec", ["", "   ", "w9a8", "a2", "a9", "w8x8", "h1", "h9", "w1", "a16", "w16a16h16",
                                  "w8a8h4x", "h4w8", "w", "8a8", "w8 a8", "w-4"])
def test_parse_rejects_naming_what_is_accepted(spec):
    with pytest.raises(QMambaError) as info:
        QuantConfig.parse(spec)
    msg = str(info.value)
    assert "WxAyHz" in msg and "w8a8h4" in msg                         # says what is accepted
    assert "2..8" in msg and "4..8" in msg


@pytest.mark.parametrize("bad", [None, 8, b"w8a8"])
def test_parse_rejects_non_strings(bad):
    with pytest.raises(QMambaError):
        QuantConfig.parse(bad)


def test_parse_quantizes_nothing_message():
    with pytest.raises(QMambaError, match="quantizes nothing"):
        QuantConfig.parse("w16a16h16")


def test_defaults():
    q = QuantConfig.parse("w8a8h4")
    assert q.w_group_size == 0 and not q.a_dynamic and q.a_observer == "minmax"
    assert q.state_quant is None and q.state_scale is None               # the method's defaults
    assert q.state_rounding == "nearest" and q.state_group_size == 8 and not q.quantize_head


def test_options_and_name():
    q = QuantConfig.parse("w4a8h4", w_group_size=64, a_dynamic=True, state_quant="dsq",
                          state_scale="static", state_rounding="stochastic", quantize_head=True, seed=3)
    assert q.name == "W4A8H4" and q.w_group_size == 64 and q.a_dynamic and q.seed == 3
    assert q.replace(h_bits=None).name == "W4A8"
    assert QuantConfig().name == "FP"


@pytest.mark.parametrize("spec, options", [
    ("w8a8h4", {}),
    ("w4a8h4", dict(w_group_size=32, state_quant="group", state_group_size=4, state_scale="static")),
    ("w8a8", dict(a_dynamic=True, a_observer="percentile", a_percentile=99.9)),
    ("h3", dict(state_quant="dsq", state_scale="dynamic", state_rounding="stochastic", seed=11)),
    ("w4a16", dict(quantize_head=True)),
    ("w8a8h4kv4", {}),
    ("w8a8kv8", dict(kv_group_size=64)),
])
def test_dict_round_trip(spec, options):
    q = QuantConfig.parse(spec, **options)
    d = q.to_dict()
    assert d["config"] == q.name
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == q      # through JSON, as in config.json
    assert QuantConfig.from_dict({**d, "quant_method": "qmamba", "format_version": 1, "method": "rtn"}) == q


@pytest.mark.parametrize("field, value, needle", [
    ("state_quant", "rows", "state quantizer"),
    ("state_scale", "sometimes", "scale mode"),
    ("state_rounding", "up", "rounding"),
    ("a_observer", "mse", "observer"),
    ("state_group_size", 0, "group size"),
    ("w_group_size", -1, "group size"),
])
def test_bad_options_raise(field, value, needle):
    with pytest.raises(QMambaError, match=needle):
        QuantConfig.parse("w8a8h4", **{field: value})


def test_bad_option_messages_list_choices():
    with pytest.raises(QMambaError) as info:
        QuantConfig.parse("h4", state_quant="rows")
    assert all(k in str(info.value) for k in STATE_QUANTIZERS)
    with pytest.raises(QMambaError) as info:
        QuantConfig.parse("h4", state_scale="x")
    assert all(k in str(info.value) for k in SCALE_MODES)
    with pytest.raises(QMambaError) as info:
        QuantConfig.parse("h4", state_rounding="x")
    assert all(k in str(info.value) for k in ROUNDINGS)


@pytest.mark.parametrize("field, value", [("w_bits", 9), ("a_bits", 3), ("h_bits", 1), ("h_bits", 16)])
def test_constructor_validates_bits(field, value):
    with pytest.raises(QMambaError):
        QuantConfig(**{field: value})


def test_frozen():
    q = QuantConfig.parse("w8a8h4")
    with pytest.raises(Exception):
        q.w_bits = 4
    assert hash(q) == hash(QuantConfig.parse("W8A8H4"))
