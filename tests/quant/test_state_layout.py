"""The state-quantizer layouts (qmamba.quant.state_layout): the registry of kinds, and every
layout against a direct reference computation.

The reference quantize-dequantizes a random state h (b, d, n) element by element: for each
element it finds the elements that share its scale by explicit index arithmetic (same head,
same group, ...), computes the scale from them (dynamic: their amax / qmax rounded to float16;
static: the static scale's entry for that element), rounds and multiplies back. Every path of
the quantizer must equal it bit for bit: the fake quantizer, quantize -> dequantize (codes too),
the integer cache's write and read, the fused token step of `qmamba.quant.qscan`, and the
channel x state split of the scales that the C kernel takes. A kind registered from a test (one
class) then runs through every path of a model-free scan, the C kernel included where it builds.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qmamba.errors import QMambaError
from qmamba.kernels import lookup
from qmamba.models.scan.reference import selective_scan_ref
from qmamba.quant import qscan, state_layout
from qmamba.quant.config import STATE_QUANTIZERS, QuantConfig
from qmamba.quant.primitives import EPS, unpack_codes
from qmamba.quant.state import StateQuantizer
from qmamba.quant.state_layout import LAYOUTS, StateLayout, make_layout, register

KINDS = ("tensor", "channel", "state", "head", "group", "dsq")
B, D, N, P, GS = 2, 12, 8, 4, 4            # P channels per head (3 heads), GS state indices per group


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


def fp16(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(2.0 ** -24, 65504.0).half().float()


def members(kind: str, c: int, j: int) -> list[tuple[int, int]]:
    """The (channel, state index) pairs that share the scale of element (c, j)."""
    cells = itertools.product(range(D), range(N))
    same = {
        "tensor": lambda c2, j2: True,
        "channel": lambda c2, j2: c2 == c,
        "state": lambda c2, j2: j2 == j,
        "head": lambda c2, j2: c2 // P == c // P,
        "group": lambda c2, j2: c2 == c and j2 // GS == j // GS,
        "dsq": lambda c2, j2: c2 == c,
    }[kind]
    return [(c2, j2) for c2, j2 in cells if same(c2, j2)]


def static_entry(kind: str, static: torch.Tensor, c: int, j: int) -> torch.Tensor:
    """The static scale of element (c, j), read by hand from the kind's static tensor."""
    return {
        "tensor": lambda: static[0, 0],
        "channel": lambda: static[c, 0],
        "state": lambda: static[0, j],
        "head": lambda: static[c // P, 0, 0],
        "group": lambda: static[c, j // GS, 0],
        "dsq": lambda: static[c, 0],
    }[kind]()


def reference(kind: str, mode: str, h: torch.Tensor, s_n: torch.Tensor, static: torch.Tensor, qmax: int):
    """Codes (b, d, n), the scale of every element (b, d, n) and the dequantized state, by loops."""
    sn = s_n if kind == "dsq" else torch.ones(N)
    static = static.clamp(min=EPS)
    codes, scales, out = torch.zeros(B, D, N), torch.zeros(B, D, N), torch.zeros(B, D, N)
    for b, c, j in itertools.product(range(B), range(D), range(N)):
        if mode == "dynamic":
            amax = torch.stack([(h[b, c2, j2] / sn[j2]).abs() for c2, j2 in members(kind, c, j)]).max()
            s = fp16(amax / qmax)
        else:
            s = static_entry(kind, static, c, j)
        q = torch.round(h[b, c, j] / sn[j] / s).clamp(-qmax, qmax)
        codes[b, c, j], scales[b, c, j], out[b, c, j] = q, s, q * s * sn[j]
    return codes, scales, out


def random_quantizer(kind: str, mode: str, bits: int, seed: int = 0) -> tuple[StateQuantizer, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = StateQuantizer(kind, bits, D, N, headdim=P, scale_mode=mode, group_size=GS)
    with torch.no_grad():
        q.s_n.copy_(0.25 + 2 * torch.rand(N, generator=g))
        q.static_scale.copy_((0.02 + 0.3 * torch.rand(q.static_scale.shape, generator=g)) * 7 / q.qmax)
    h = torch.randn(B, D, N, generator=g) * (0.2 + 3 * torch.rand(1, D, 1, generator=g))
    return q, h


# ------------------------------------------------------------------------------- the registry
def test_registry_holds_every_kind_in_order():
    assert tuple(LAYOUTS) == KINDS
    assert STATE_QUANTIZERS == {k: LAYOUTS[k].description for k in KINDS}
    for name, cls in LAYOUTS.items():
        assert issubclass(cls, StateLayout) and cls.name == name and cls.description
        assert set(cls.kernel_modes) <= {"static", "dynamic"}
    assert {k: sorted(LAYOUTS[k].kernel_modes) for k in KINDS} == {
        "tensor": ["static"], "channel": ["dynamic", "static"], "state": ["static"],
        "head": ["static"], "group": [], "dsq": ["dynamic", "static"]}
    assert [k for k in KINDS if LAYOUTS[k].uses_s_n] == ["dsq"]


def test_registry_refuses_unknown_and_duplicate_kinds():
    with pytest.raises(QMambaError, match="unknown state quantizer 'nope'.*tensor, channel"):
        make_layout("nope", D, N)
    with pytest.raises(QMambaError, match="unknown state quantizer"):
        StateQuantizer("nope", 4, D, N)
    with pytest.raises(QMambaError, match="unknown state quantizer"):
        QuantConfig(h_bits=4, state_quant="nope")

    class Again(StateLayout):
        name = "dsq"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)
    assert LAYOUTS["dsq"] is state_layout.DSQLayout


def test_layouts_validate_their_sizes():
    with pytest.raises(QMambaError, match="does not divide d_state 8"):
        make_layout("group", D, N, group_size=3)
    with pytest.raises(QMambaError, match="head dim 5 does not divide 12 channels"):
        make_layout("head", D, N, headdim=5)
    make_layout("channel", D, N, headdim=5, group_size=3)          # sizes it does not use: ignored
    assert make_layout("channel", D, N, headdim=P).headdim == 1
    assert make_layout("head", D, N, headdim=P).headdim == P


def test_layouts_compare_by_what_they_compute():
    assert make_layout("head", D, N, headdim=P) == make_layout("head", D, N, headdim=P)
    assert make_layout("head", D, N, headdim=P) != make_layout("head", D, N, headdim=2)
    assert make_layout("group", D, N, group_size=4) != make_layout("group", D, N, group_size=2)
    assert make_layout("channel", D, N, group_size=4) == make_layout("channel", D, N, group_size=2)
    assert make_layout("channel", D, N) != make_layout("dsq", D, N)
    assert len({make_layout(k, D, N, headdim=P, group_size=GS) for k in KINDS}) == len(KINDS)


@pytest.mark.parametrize("kind, static, split", [
    ("tensor", (1, 1), (B, D, N)), ("channel", (D, 1), (B, D, N)), ("state", (1, N), (B, D, N)),
    ("head", (D // P, 1, 1), (B, D // P, P, N)), ("group", (D, N // GS, 1), (B, D, N // GS, GS)),
    ("dsq", (D, 1), (B, D, N))])
def test_shapes(kind, static, split):
    layout = make_layout(kind, D, N, headdim=P, group_size=GS)
    assert layout.static_shape() == static
    assert layout.dynamic_shape(B) == (B, *static)
    t = torch.arange(B * D * N).reshape(B, D, N)
    assert layout.split(t).shape == split
    assert torch.equal(layout.merge(layout.split(t)), t)
    assert torch.equal(layout.split(t).flatten(), t.flatten())                 # element order kept
    for mode in ("static", "dynamic"):
        q = StateQuantizer(kind, 4, D, N, headdim=P, group_size=GS, scale_mode=mode)
        assert tuple(q.static_scale.shape) == static
        assert q.dynamic_shape(B) == ((B, *static) if mode == "dynamic" else (B, 0))
        assert tuple(q.allocate(B).scales.shape) == q.dynamic_shape(B)


# ------------------------------------------------------------------------------- against the loops
@pytest.mark.parametrize("kind, mode, bits", [
    (k, m, b) for k, m, b in itertools.product(KINDS, ("dynamic", "static"), (4, 8))])
def test_every_path_equals_the_reference(kind, mode, bits):
    q, h = random_quantizer(kind, mode, bits)
    codes, scales, ref = reference(kind, mode, h, q.s_n.detach(), q.static_scale.detach(), q.qmax)
    assert (codes != 0).any() and (codes.abs() == q.qmax).any()         # a real test: codes in range
    with torch.no_grad():
        # the fake quantizer and quantize -> dequantize
        assert torch.equal(q.fake_quant(h), ref)
        got, scale = q.quantize(h)
        assert got.dtype == torch.int8 and torch.equal(got.float(), codes)
        assert (scale is None) == (mode == "static")
        assert torch.equal(q.dequantize(got, scale), ref)
        if scale is not None:
            assert torch.equal(q.layout.merge(scale.expand(q.layout.split(h).shape)), scales)
        # the integer cache
        state = q.allocate(B)
        assert torch.equal(state.write(h), ref)
        assert torch.equal(unpack_codes(state.codes, state.per_byte, N).float(), codes)
        assert torch.equal(state.read(), ref)
        # the fused token step: dt = 0 keeps h (exp(0) h + 0), then quantizes it
        zeros = torch.zeros(B, D)
        step = qscan.make_step(q.layout, mode == "dynamic", float(q.qmax))
        h_step, _ = step(h, zeros, zeros, torch.zeros(D, N), torch.zeros(B, 1, N), torch.zeros(B, 1, N),
                         q.s_n.detach().float(), q.static_scale.detach().float().clamp(min=1e-12))
        assert torch.equal(h_step, ref)


@pytest.mark.parametrize("kind, mode", [(k, m) for k in KINDS for m in ("dynamic", "static")])
def test_kernel_split_of_the_scales(kind, mode):
    """Where the C kernel runs a kind, its scale of element (c, j) is s_n[j] * s_c[c] and
    round(h / s_n / s_c) gives the reference codes (dynamic: s_c from the amax of h / s_n)."""
    q, h = random_quantizer(kind, mode, 4)
    if mode not in q.layout.kernel_modes:
        assert not qscan.use_cpu_kernel(q, h)
        if not q.layout.kernel_modes:
            with pytest.raises(QMambaError, match="does not run"):
                qscan._kernel_scales(q)
        return
    codes, scales, _ = reference(kind, mode, h, q.s_n.detach(), q.static_scale.detach(), q.qmax)
    s_n, s_c = qscan._kernel_scales(q)
    assert s_n.shape == (N,) and s_c.shape == (D, 1)
    v = h / s_n
    if mode == "dynamic":
        s_c = fp16(v.abs().amax(-1, keepdim=True) / q.qmax)                   # (b, d, 1), per write
        assert torch.equal(s_c.expand(B, D, N), scales)
    else:
        sn = q.s_n.detach() if kind == "dsq" else torch.ones(N)
        assert torch.equal(s_n * s_c, scales[0] * sn)                         # static: same for every b
    assert torch.equal(torch.round(v / s_c).clamp(-q.qmax, q.qmax), codes)


# ------------------------------------------------------------------------------- a new kind: one class
class PairLayout(StateLayout):
    """A kind defined only here: one scale per pair of adjacent channels (the C kernel: static)."""
    name = "pair"
    description = "one scale per pair of adjacent channels"
    reduce_dims = (2, 3)
    kernel_modes = frozenset({"static"})

    def split(self, t):
        return t.unflatten(1, (t.shape[1] // 2, 2))

    def merge(self, v):
        return v.flatten(1, 2)

    def kernel_scales(self, static, s_n):
        return self._ones_n(static), static.reshape(-1, 1).repeat_interleave(2, dim=0)


@pytest.fixture
def pair(monkeypatch):
    monkeypatch.setitem(LAYOUTS, "pair", PairLayout)


@pytest.mark.parametrize("mode", ("dynamic", "static"))
def test_a_registered_class_is_a_working_kind(pair, mode):
    """A layout class is all a kind needs: config, quantizer, cache, fused scan and the exact
    recurrence agree, and for static scales so does the C kernel (where it builds)."""
    assert QuantConfig(h_bits=4, state_quant="pair").state_quant == "pair"
    g = torch.Generator().manual_seed(3)
    q = StateQuantizer("pair", 4, D, N, scale_mode=mode)
    assert q.static_scale.shape == (D // 2, 1, 1) and q.dynamic_shape(B) == ((B, D // 2, 1, 1) if mode == "dynamic" else (B, 0))
    h = torch.randn(B, D, N, generator=g)
    fq = q.fake_quant(h)
    for k in range(D // 2):          # one scale per channel pair: amax over the pair / qmax
        pair_ = h[:, 2 * k:2 * k + 2]
        s = (fp16(pair_.abs().amax((1, 2), keepdim=True) / q.qmax) if mode == "dynamic"
             else q.static_scale.detach()[k].clamp(min=EPS))
        assert torch.equal(fq[:, 2 * k:2 * k + 2], torch.round(pair_ / s).clamp(-q.qmax, q.qmax) * s)
    q.mode = "observe"
    q.observe(torch.randn(4, D, N, generator=g) * 2)
    q.finish_calibration()
    length = 5
    x, dt = torch.randn(B, length, D, generator=g), torch.rand(B, length, D, generator=g)
    A = -2 * torch.rand(D, N, generator=g)
    Bm, Cm = torch.randn(B, length, 1, N, generator=g), torch.randn(B, length, 1, N, generator=g)
    with torch.no_grad():
        y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, None, None, q.fake_quant)
        y, h_last = qscan.quantized_scan(x, dt, A, Bm, Cm, None, q)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert (h_last != h_ref).float().mean() <= 0.02                     # rare .5 ties may flip
        state = q.allocate(B)                                               # decoding, token by token
        ys = [state.step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t]) for t in range(length)]
        torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-4, atol=1e-4)
    if mode == "static" and lookup("dsq_scan", "cpu") is not None:
        assert qscan.use_cpu_kernel(q, x)
        state = q.allocate(B)
        y_k = qscan.kernel_scan(state, x, dt, A, Bm, Cm)
        torch.testing.assert_close(y_k, y_ref, rtol=1e-4, atol=1e-4)
        eager = q.allocate(B)
        eager.write(h_ref)
        assert (unpack_codes(state.codes, state.per_byte, N) != unpack_codes(eager.codes, eager.per_byte, N)
                ).float().mean() <= 0.02
