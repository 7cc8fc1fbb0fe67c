"""What both mixers share: the quantization points, the scan and the state allocation.

A mixer computes the scan inputs x, dt, B, C (and the gate z) from its input with linear
projections and a causal conv, runs the selective scan, and projects the gated output back. The
points where `qmamba.quant` inserts quantizers are named here once:

    quant_conv                                     activation quantizer of the conv input (what
                                                   the conv state stores)
    quant_x, quant_B, quant_C, quant_dt, quant_z   activation quantizers of the scan inputs and
                                                   the gate (nn.Identity until a method sets them)
    in_proj, x_proj, dt_proj, out_proj             nn.Linear, swapped for quantized linears
    state_quant                                    None (float state) or the object that owns the
                                                   SSM state: see below
    state_sim                                      None, or what `state_quant` runs instead of the
                                                   scan while training (ESR's simulations)

The float model's scan is the parallel one of each family (`parallel_scan`), its state an
`SSMState`. A mixer knows nothing else about states: once `state_quant` is set (by
`qmamba.quant`, which quantizes the state), the mixer hands its scan to it and allocates its cache
from it, through two methods:

    state_quant.scan(mixer, x, dt, B, C, state) -> y (b, l, d) float32; reads and updates `state`
    state_quant.allocate(batch, device)         -> the SSM state of one layer (an `SSMState`)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import LayerState, SSMState
from .layer_spec import StateSpec


class MixerBase(nn.Module):
    """The Mamba mixers' shared machinery and the declarations both make alike (see
    `qmamba.models.layer_spec`): the quantization points, the conv and SSM states."""
    LAYER_TYPE = ""
    QUANT_POINTS = ("quant_conv", "quant_x", "quant_B", "quant_C", "quant_dt", "quant_z")
    LEARNABLE: dict = {}          # option name -> parameter path (e.g. {"dt_bias": "dt_bias"})

    def linear_groups(self) -> tuple:
        raise NotImplementedError

    def smoothing_pairs(self) -> tuple:
        raise NotImplementedError

    def states(self) -> tuple[StateSpec, ...]:
        """The conv state (its last w-1 inputs) and the SSM state (d, n), per sequence."""
        d, n = self.ssm_state_shape()
        w = self.conv1d.weight
        return (StateSpec("conv", (w.shape[0], w.shape[-1] - 1)),
                StateSpec("ssm", (d, n), headdim=getattr(self, "headdim", 1)))

    def _init_quant_points(self):
        for name in self.QUANT_POINTS:
            setattr(self, name, nn.Identity())
        self.state_quant: Optional[nn.Module] = None      # owns the state's scan when set
        self.state_sim: Optional[nn.Module] = None        # ESR's simulation, read by state_quant

    # each mixer provides its scan inputs in two forms: native (parallel_scan) and per-channel
    # (the shapes of `qmamba.models.scan.reference.selective_scan_ref`, shared by the sequential
    # and simulated paths)
    def parallel_scan(self, x, dt, B, C, h0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def per_channel(self, x, dt, B, C) -> tuple:
        raise NotImplementedError

    def channel_A_D(self) -> tuple[Tensor, Tensor]:
        """A ((d, n) or (d, 1)) and D (d,) in the per-channel form, float32."""
        raise NotImplementedError

    def scan(self, x, dt, B, C, state: Optional[LayerState]) -> Tensor:
        """The selective scan of the mixer's native inputs; reads and updates `state` if given.
        Float state: the parallel scan; otherwise whatever `state_quant.scan` does. Returns
        y (b, l, d) in float32."""
        if self.state_quant is not None:
            return self.state_quant.scan(self, x, dt, B, C, state)
        h0 = None if state is None else state.ssm.read()
        y, h = self.parallel_scan(x, dt, B, C, h0)
        if state is not None:
            state.ssm.write(h)
        return y

    def segmented_scan(self, x, dt, B, C, h0: Optional[Tensor], every: int, on_state) -> tuple[Tensor, Tensor]:
        """The parallel scan in segments of `every` tokens; the state carried from one segment
        to the next is `on_state(h)` (b, d, n). Calibration observes it (every 16th token); the
        ESR "chunk" simulation quantizes it. Returns y (b, l, d), the last carried state."""
        ys, h = [], h0
        for s in range(0, x.shape[1], every):
            seg = slice(s, s + every)
            y, h = self.parallel_scan(x[:, seg], dt[:, seg], B[:, seg], C[:, seg], h)
            h = on_state(h)
            ys.append(y)
        return torch.cat(ys, dim=1), h

    def carried_scan(self, x, dt, B, C, h0: Optional[Tensor], every: int, on_state) -> tuple[Tensor, Tensor]:
        """`segmented_scan`'s numbers in two parallel passes over all c segments at once (ESR's
        "chunk" simulation; the segment loop is sequential and its scans are too short to be
        efficient):
          1. every segment from a zero state: its own share hz_i (b, d, n) of its final state
             (`end_states`: no read-out);
          2. the carried states, in a loop over c segments: H_{i+1} = on_state(a_i H_i + hz_i),
             a_i = exp(A sum_{t in i} dt_t) (b, d, n|1) the segment's total decay, H_0 = h0;
          3. every segment again from its entering state H_i: the read-outs y (b, l, d).
        Padding to c * every tokens has dt = 0 (no decay, no input). Returns y, H_c."""
        b, length = x.shape[:2]
        c = -(-length // every)
        if c == 1:
            y, h = self.parallel_scan(x, dt, B, C, h0)
            return y, on_state(h)
        pad = c * every - length
        if pad:
            x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))

        def fold(t: Tensor) -> Tensor:                                      # (b, c s, ...) -> (b c, s, ...)
            return t.reshape(b * c, every, *t.shape[2:])

        hz = self.end_states(fold(x), fold(dt), fold(B), fold(C))          # (b c, d, n)
        hz = hz.unflatten(0, (b, c))                                        # (b, c, d, n)
        _, dt_c, A, _, _, _ = self.per_channel(x, dt, B, C)                 # dt_c (b, c s, d)
        decay = torch.exp(dt_c.float().unflatten(1, (c, every)).sum(2).unsqueeze(-1) * A)  # (b, c, d, n|1)
        h = torch.zeros_like(hz[:, 0]) if h0 is None else h0.float()
        entering = []
        for i in range(c):
            entering.append(h)
            h = on_state(decay[:, i] * h + hz[:, i])
        y, _ = self.parallel_scan(fold(x), fold(dt), fold(B), fold(C), torch.stack(entering, 1).flatten(0, 1))
        return y.unflatten(0, (b, c)).flatten(1, 2)[:, :length], h

    def end_states(self, x, dt, B, C) -> Tensor:
        """The state (b, d, n) after each sequence from a zero state (no read-out needed)."""
        return self.parallel_scan(x, dt, B, C, None)[1]

    def ssm_state_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def decode_constants(self) -> tuple[Tensor, Tensor]:
        """A and D in the per-channel form of the token step ((d, n) or (d, 1), and (d,)),
        recomputed only when A_log or D change (a decode step would redo it for every token)."""
        if torch.is_inference(self.A_log) or torch.is_inference(self.D):
            return self.channel_A_D()       # inference tensors keep no version counter to key a cache on
        key = (self.A_log._version, self.A_log.data_ptr(), self.D._version, self.D.data_ptr())
        if self.__dict__.get("_decode_key") != key:
            with torch.no_grad():
                self.__dict__["_decode_consts"] = self.channel_A_D()
            self.__dict__["_decode_key"] = key
        return self.__dict__["_decode_consts"]

    # the conv state holds conv inputs; with a static A-bit quantizer there, it holds their codes
    def _conv_int_scale(self) -> Optional[Tensor]:
        q = self.quant_conv
        if getattr(q, "mode", None) == "quant" and not q.dynamic and q.bits <= 8:
            return q.scale.detach()
        return None

    def conv_read(self, state: LayerState, dtype) -> Tensor:
        s = self._conv_int_scale()
        if state.conv.dtype == torch.int8 and s is not None:
            return (state.conv.float() * s).to(dtype)
        return state.conv.to(dtype)

    def conv_write(self, state: LayerState, tail: Tensor):
        s = self._conv_int_scale()
        if state.conv.dtype == torch.int8 and s is not None:
            state.conv = torch.round(tail.float() / s).clamp(-127, 127).to(torch.int8)
        else:
            state.conv = tail.to(state.conv.dtype)

    def allocate_state(self, batch: int, dtype: torch.dtype, device) -> LayerState:
        d, n = self.ssm_state_shape()
        conv = torch.zeros(batch, self.conv1d.weight.shape[0], self.conv1d.weight.shape[-1] - 1,
                           dtype=torch.int8 if self._conv_int_scale() is not None else dtype, device=device)
        if self.state_quant is not None:
            ssm = self.state_quant.allocate(batch, device)
        else:
            ssm = SSMState(torch.zeros(batch, d, n, dtype=dtype, device=device))
        return LayerState(conv=conv, ssm=ssm)


def conv_step(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One token of the depthwise causal conv. conv_state (b, d, w-1); x (b, d); weight (d, 1, w).
    Returns the conv output (b, d) and the new conv state."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)   # (b, d, w)
    out = (window * weight[:, 0, :].to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out, window[..., 1:]
