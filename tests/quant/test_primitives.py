"""Quantization primitives (qmamba.quant.primitives), weight quantization (qmamba.quant.linear)
and activation quantizers (qmamba.quant.activation): hypothesis properties checked against
plain-PyTorch references written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qmamba.errors import QMambaError
from qmamba.quant.activation import ActQuantizer
from qmamba.quant.linear import QLinear, quantize_weight, weight_scale
from qmamba.quant.primitives import (EPS, asymmetric_params, codes_per_byte, dequantize, dequantize_weight,
                                     fake_quant, pack, pack_codes, pack_int2, pack_int4, qrange, quantize,
                                     round_stochastic, storage_dtype, to_groups, unpack, unpack_codes, unpack_int2,
                                     unpack_int4)

PROPS = settings(max_examples=60, deadline=None, database=None)
BITS = st.integers(2, 8)
# float32 arithmetic slack of x / scale and q * scale: |x / scale| <= 127 carries an absolute
# error of ~127 * 2^-24 < 1e-5 in units of the scale, and the product a relative 2^-24
REL = 1e-5


@st.composite
def tensors(draw, max_len: int = 48, min_len: int = 1):
    """A float32 tensor: hand-picked values (edge cases shrink well) times a magnitude."""
    vals = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=min_len, max_size=max_len))
    mag = draw(st.sampled_from([1e-4, 1e-1, 1.0, 7.0, 3e3]))
    return torch.tensor(vals, dtype=torch.float32) * mag


@st.composite
def random_tensors(draw, max_dims: int = 3):
    """A larger seeded gaussian tensor with a random shape and some outliers."""
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=max_dims)))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x * torch.where(torch.rand(shape, generator=g) < 0.05, 20.0, 1.0)


def bound(scale, x) -> torch.Tensor:
    """scale / 2 plus float32 slack, elementwise."""
    return scale / 2 * (1 + REL) + x.abs() * REL + 1e-30


# ----------------------------------------------------------------------------- ranges and dtypes
@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_and_storage_dtype(bits):
    assert qrange(bits) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)       # restricted symmetric
    assert qrange(bits, symmetric=False) == (0, 2 ** bits - 1)
    assert storage_dtype(bits) == torch.int8 and storage_dtype(bits, False) == torch.uint8


@pytest.mark.parametrize("bits", [0, 1, 17])
def test_qrange_rejects_bits(bits):
    with pytest.raises(ValueError):
        qrange(bits)


# ----------------------------------------------------------------------------- symmetric
@PROPS
@given(x=st.one_of(tensors(), random_tensors()), bits=BITS)
def test_symmetric_codes_in_range_and_error_bound(x, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max().clamp(min=EPS) / qmax                     # reference symmetric scale
    q = quantize(x, scale, bits)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax
    assert torch.equal(q.float(), torch.clamp(torch.round(x / scale), -qmax, qmax))   # reference codes
    xh = dequantize(q, scale)
    assert xh.dtype == torch.float32
    assert ((xh - x).abs() <= bound(scale, x)).all()
    assert torch.equal(quantize(-x, scale, bits), -q)                # symmetric: -x -> -q


@PROPS
@given(x=st.one_of(tensors(), random_tensors()), bits=BITS,
       frac=st.floats(0.05, 2.0))
def test_fake_quant_equals_quantize_dequantize_and_clamps_outside(x, bits, frac):
    """Any scale (also one that clips): inside the range error <= scale/2, outside the value is
    clamped to +-qmax * scale; fake_quant is quantize -> dequantize bit for bit."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().max() * frac).clamp(min=1e-6) / qmax
    fq = fake_quant(x, scale, bits)
    assert torch.equal(fq, dequantize(quantize(x, scale, bits), scale))
    inside = x.abs() <= qmax * scale
    assert ((fq - x).abs()[inside] <= bound(scale, x)[inside]).all()
    outside = x.abs() > (qmax + 0.5) * scale * (1 + REL)
    assert torch.equal(fq[outside], (torch.sign(x) * qmax * scale)[outside])


@PROPS
@given(x=st.one_of(tensors(), random_tensors()), bits=BITS, scale=st.floats(1e-4, 1e3))
def test_fake_quant_is_idempotent(x, bits, scale):
    s = torch.tensor(scale, dtype=torch.float32)
    once = fake_quant(x, s, bits)
    assert torch.equal(fake_quant(once, s, bits), once)


def test_symmetric_scale_of_zeros_is_usable():
    x = torch.zeros(5)
    from qmamba.quant.primitives import symmetric_scale

    s = symmetric_scale(x.abs().max(), 4)
    assert s > 0 and torch.equal(fake_quant(x, s, 4), x)


# ----------------------------------------------------------------------------- asymmetric
@PROPS
@given(x=st.one_of(tensors(min_len=2), random_tensors()), bits=BITS)
def test_asymmetric_params_map_range_onto_codes(x, bits):
    qmax = 2 ** bits - 1
    xmin, xmax = x.min(), x.max()
    scale, zero = asymmetric_params(xmin, xmax, bits)
    lo, hi = min(xmin.item(), 0.0), max(xmax.item(), 0.0)
    assert scale.item() == pytest.approx(max((hi - lo) / qmax, EPS), rel=1e-6)
    assert zero == torch.round(zero) and 0 <= zero.item() <= qmax
    q = quantize(x, scale, bits, zero)
    assert q.dtype == torch.uint8 and int(q.min()) >= 0 and int(q.max()) <= qmax
    xh = dequantize(q, scale, zero)
    assert ((xh - x).abs() <= bound(scale, x)).all()
    # the end points of the range land on (or, after a rounding tie, next to) the end codes
    ends = quantize(torch.tensor([lo, hi]), scale, bits, zero).tolist()
    if (hi - lo) / qmax > 2 * EPS:                                   # else the EPS floor of the scale rules
        assert ends[0] == 0 and ends[1] >= qmax - 1
    assert torch.equal(fake_quant(x, scale, bits, zero), xh)


# ----------------------------------------------------------------------------- 4-bit packing
def test_pack_int2_round_trips_every_byte():
    """All 256 quadruples of 2-bit codes (-2..1): one distinct byte each, element 4i + j in bits
    2j..2j+1, and back."""
    quads = torch.cartesian_prod(*[torch.arange(-2, 2, dtype=torch.int8)] * 4)           # (256, 4)
    packed = pack_int2(quads)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert len(set(packed.flatten().tolist())) == 256
    assert packed[..., 0].tolist() == [sum((v & 3) << (2 * j) for j, v in enumerate(q)) for q in quads.tolist()]
    assert torch.equal(unpack_int2(packed), quads)


@pytest.mark.parametrize("size", [4, 5, 7, 16])
def test_dense_state_packing_pads_and_drops(size):
    """The state's storage: 2-bit codes four per byte (padded with zero codes), 4-bit two per
    byte, 8-bit as they are; unpack with the size gives the codes back."""
    q = torch.randint(-1, 2, (3, 2, size), generator=torch.Generator().manual_seed(size), dtype=torch.int8)
    for bits, per_byte in ((2, 4), (4, 2), (8, 1)):
        p = pack_codes(q, per_byte)
        assert p.shape[-1] == -(-size // per_byte)
        assert torch.equal(unpack_codes(p, per_byte, size), q)
        assert codes_per_byte(bits, dense=True) == per_byte
    assert pack(q, 2).shape[-1] == -(-size // 2)          # weights keep two codes per byte at 2 bits


def test_pack_int4_round_trips_every_code_pair():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(codes, codes)                       # (256, 2): every (lo, hi)
    packed = pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert len(set(packed.flatten().tolist())) == 256                 # injective: one byte per pair
    assert torch.equal(unpack_int4(packed), pairs)
    # element 2i in the low nibble, 2i+1 in the high nibble
    assert packed[..., 0].tolist() == [(lo & 0xF) | ((hi & 0xF) << 4) for lo, hi in pairs.tolist()]


@PROPS
@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=3), half=st.integers(1, 8),
       seed=st.integers(0, 2 ** 16))
def test_pack_int4_round_trip_random_shapes(shape, half, seed):
    q = torch.randint(-8, 8, (*shape, 2 * half), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (*shape, half)
    assert torch.equal(unpack_int4(p), q)
    for bits in (2, 3, 4):
        assert torch.equal(unpack(pack(q.clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1), bits), bits),
                           q.clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1))
    assert pack(q, 8) is q and unpack(q, 8) is q                    # 5..8 bits: one code per byte


@pytest.mark.parametrize("shape", [(3,), (2, 5), (1, 4, 7)])
def test_pack_int4_odd_last_dim_raises(shape):
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(shape, dtype=torch.int8))


# ----------------------------------------------------------------------------- stochastic rounding
def test_round_stochastic_is_unbiased():
    x = torch.tensor([0.1, 0.5, 2.3, -1.7, -0.25, 3.0, -4.0, 0.999])
    n = 20000
    draws = round_stochastic(x.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(draws, draws.round())                         # integers ...
    assert ((draws == x.floor()) | (draws == x.ceil())).all()        # ... the two neighbours only
    # E[round(x)] = x: std of one draw <= 0.5, so the mean is within 5 sigma = 0.018
    assert (draws.mean(0) - x).abs().max() < 5 * 0.5 / math.sqrt(n)
    assert torch.equal(draws[:, 5], torch.full((n,), 3.0))          # integers stay put
    # the probability of rounding up is the fractional part
    up = (draws[:, 2] == 3.0).float().mean()
    assert up == pytest.approx(0.3, abs=0.02)


def test_round_stochastic_seeded_reproducible():
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 5
    a = round_stochastic(x, torch.Generator().manual_seed(7))
    b = round_stochastic(x, torch.Generator().manual_seed(7))
    c = round_stochastic(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s = torch.tensor(0.1)
    qa = quantize(x, s, 8, stochastic=True, generator=torch.Generator().manual_seed(3))
    qb = quantize(x, s, 8, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(qa, qb)
    fa = fake_quant(x, s, 8, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fa, dequantize(qa, s))                        # same draw, same codes


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_straight_through_gradient(bits, stochastic):
    qmax = 2 ** (bits - 1) - 1
    s = torch.tensor(0.1)
    inside = torch.linspace(-(qmax - 0.6), qmax - 0.6, 41) * s        # |x / s| < qmax - 0.5
    outside = torch.tensor([qmax + 1.2, qmax + 7.0, -(qmax + 1.2), -(qmax + 30.0)]) * s
    x = torch.cat([inside, outside]).requires_grad_()
    y = fake_quant(x, s, bits, stochastic=stochastic, generator=torch.Generator().manual_seed(0))
    y.sum().backward()
    assert torch.equal(x.grad[:41], torch.ones(41))
    assert torch.equal(x.grad[41:], torch.zeros(4))


# ----------------------------------------------------------------------------- weights
@PROPS
@given(out=st.integers(1, 7), groups=st.integers(1, 4), gs=st.sampled_from([0, 2, 4, 8]),
       bits=BITS, seed=st.integers(0, 2 ** 16))
def test_weight_quantization_error_bound(out, groups, gs, bits, seed):
    inp = groups * (gs or 5)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 3
    scale = weight_scale(w, bits, gs)
    qmax = 2 ** (bits - 1) - 1
    if gs:
        assert scale.shape == (out, inp // gs, 1)
        ref = to_groups(w, gs).abs().amax(-1, keepdim=True).clamp(min=EPS) / qmax
    else:
        assert scale.shape == (out, 1)
        ref = w.abs().amax(-1, keepdim=True).clamp(min=EPS) / qmax
    assert torch.equal(scale, ref)
    q, s = quantize_weight(w, bits, gs)
    assert torch.equal(s, scale)
    assert q.dtype == torch.int8 and q.shape == (out, inp)
    assert int(q.abs().max()) <= qmax
    wh = dequantize_weight(q, s, gs)
    per_elem = (s.expand(*s.shape[:-1], gs).flatten(-2) if gs else s.expand(out, inp))
    assert ((wh - w).abs() <= bound(per_elem, w)).all()
    # every channel (group) uses its full range: its max maps to +-qmax
    assert (q.abs().view(out, -1, gs or inp).amax(-1) == qmax).all()


def test_weight_clip_shrinks_the_range():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    clip = torch.full((4, 1), 0.5)
    assert torch.allclose(weight_scale(w, 8, clip=clip), weight_scale(w, 8) * 0.5)
    q, s = quantize_weight(w, 8, clip=clip)
    big = w.abs() > w.abs().amax(1, keepdim=True) * 0.5 * (1 + 1 / 127)
    assert (q.abs()[big] == 127).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlinear_group_size_not_dividing_falls_back_to_per_channel(bits):
    lin = nn.Linear(12, 5, bias=True)
    m = QLinear.from_linear(lin, bits, group_size=8)                 # 8 does not divide 12
    assert m.group_size == 0 and m.w_scale.shape == (5, 1)
    ref = QLinear.from_linear(lin, bits, group_size=0)
    assert torch.equal(m.qweight, ref.qweight) and torch.equal(m.w_scale, ref.w_scale)
    g = QLinear.from_linear(lin, bits, group_size=4)                 # 4 does: group-wise
    assert g.group_size == 4 and g.w_scale.shape == (5, 3, 1)
    assert g.qweight.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert g.qweight.shape == (5, 12 // 2 if bits <= 4 else 12)
    x = torch.randn(3, 12)
    for q in (m, g):
        assert torch.allclose(q(x), nn.functional.linear(x, q.dequantized_weight(), lin.bias))
    # the in-place path falls back the same way
    f = QLinear.from_linear(lin, None)
    f.quantize_weights_(bits, 8)
    assert f.group_size == 0 and torch.equal(f.qweight, ref.qweight)


def test_qlinear_dequantized_weight_within_half_step():
    lin = nn.Linear(16, 6, bias=False)
    for bits, gs in ((8, 0), (4, 0), (4, 8), (2, 4)):
        m = QLinear.from_linear(lin, bits, gs)
        s = m.w_scale.expand(*m.w_scale.shape[:-1], gs).flatten(-2) if gs else m.w_scale
        assert ((m.dequantized_weight() - lin.weight).abs() <= bound(s, lin.weight)).all()


@pytest.mark.parametrize("bits, in_features", [(4, 3), (4, 7), (3, 5), (2, 5)])
def test_qlinear_packed_codes_with_odd_input_dim(bits, in_features):
    """An odd input size at <= 4 bits (weights: two codes per byte, the checkpoint format) is
    padded with a zero code in the last byte: stored in ceil(in / 2) bytes, the padding
    dropped on unpacking, the codes those of the unpadded weight, the product that of the
    dequantized weight."""
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 4, bias=True)
    m = QLinear.from_linear(lin, bits)
    per_byte = 2
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (4, -(-in_features // per_byte))
    qmax = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(lin.weight.detach() / m.w_scale), -qmax, qmax)   # (4, in)
    assert torch.equal(unpack(m.qweight, bits, in_features).float(), codes)
    padding = unpack(m.qweight, bits)[:, in_features:]
    assert padding.shape[1] == (-in_features) % per_byte and (padding == 0).all()
    w = m.dequantized_weight()
    assert w.shape == lin.weight.shape and ((w - lin.weight).abs() <= bound(m.w_scale, lin.weight)).all()
    x = torch.randn(3, in_features)
    assert torch.allclose(m(x), nn.functional.linear(x, w, lin.bias), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- activations
def _observe(q: ActQuantizer, xs):
    q.mode = "observe"
    for x in xs:
        assert torch.equal(q(x), x)                                  # observing passes x through
    q.finish_calibration()


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 50, 16, generator=g) for _ in range(3)]
    xs[1][0, 3, 5] = 40.0                                            # one outlier
    return xs


@pytest.mark.parametrize("bits", [4, 8])
def test_act_minmax_static_scale(bits):
    xs = _batches()
    q = ActQuantizer(bits)
    _observe(q, xs)
    absmax = max(x.abs().max().item() for x in xs)
    assert q.mode == "quant"
    assert q.scale.item() == pytest.approx(absmax / (2 ** (bits - 1) - 1), rel=1e-6)
    x = xs[0]
    assert torch.equal(q(x), fake_quant(x, q.scale, bits))


def test_act_percentile_below_minmax():
    xs = _batches()
    mm, pc = ActQuantizer(8), ActQuantizer(8, observer="percentile", percentile=99.0)
    _observe(mm, xs)
    _observe(pc, xs)
    assert pc.scale.item() < mm.scale.item()
    pool = torch.cat([x.abs().flatten() for x in xs])
    assert pc.scale.item() == pytest.approx(torch.quantile(pool, 0.99).item() / 127, rel=1e-5)
    full = ActQuantizer(8, observer="percentile", percentile=100.0)
    _observe(full, xs)
    assert full.scale.item() == pytest.approx(mm.scale.item(), rel=1e-6)


def test_act_dynamic_per_token():
    q = ActQuantizer(8, dynamic=True)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    x[1, 4] *= 100
    s = q.current_scale(x)
    assert s.shape == (2, 7, 1)
    assert torch.equal(s, x.abs().amax(-1, keepdim=True) / 127)
    y = q(x)
    assert torch.equal(y, fake_quant(x, s, 8))
    per_token = torch.stack([torch.stack([fake_quant(x[b, t], x[b, t].abs().max() / 127, 8)
                                          for t in range(7)]) for b in range(2)])
    assert torch.equal(y, per_token)
    _observe(q, [x])                                                 # dynamic: calibration keeps no scale
    assert torch.equal(q(x), y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_act_observe_non_finite_raises_naming_where(bad):
    q = ActQuantizer(8, where="backbone.layers.3.mixer.quant_x")
    q.mode = "observe"
    x = torch.randn(2, 4, 8)
    x[1, 2, 3] = bad
    with pytest.raises(QMambaError, match=r"backbone\.layers\.3\.mixer\.quant_x"):
        q(x)


def test_act_modes_off_and_quant():
    q = ActQuantizer(4)
    q.scale.data.fill_(0.5)
    x = torch.randn(3, 8)
    q.mode = "off"
    assert torch.equal(q(x), x)
    q.mode = "quant"
    assert torch.equal(q(x), fake_quant(x, torch.tensor(0.5), 4))
