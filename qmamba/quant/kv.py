"""The KV cache of attention layers (the hybrids) at 8 or 4 bits, as KIVI quantizes it.

Shapes: b batch, K key/value heads, t tokens, e head_dim; G the key group size
(`QuantConfig.kv_group_size`).

    keys    per channel: one scale per (sequence, kv head, channel) over a group of G consecutive
            tokens (KIVI: key outliers sit in fixed channels), computed when the group's last
            token arrives. The tokens of the group still filling (fewer than G) stay in floating
            point in the cache dtype: the float window.
    values  per token: one scale per (sequence, token, kv head) over head_dim, computed when the
            token arrives.

Codes are symmetric in [-qmax, qmax]: int8 at 8 bits, two 4-bit codes per byte (uint8, the last
dim halved) at 4 bits, packed as the SSM state cache packs them (`qmamba.quant.primitives.
pack_codes`); scales are stored as float16 (rounded to float16 in the simulation too).

Decode meets exactly what is stored: `QuantizedKVState` keeps codes, scales and the window, and
attention reads them dequantized. The parallel forward simulates the same cache: a query at
position i reads key j quantized when j's group was complete at i ((j // G + 1) * G <= i + 1), in
float otherwise, and every value quantized; so forward, step and prefill + step compute the same
numbers (tests/quant/test_kv.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.cache import KVState
from .primitives import codes_per_byte, pack_codes, qrange, unpack_codes
from .state_layout import fp16_scale

DEFAULT_GROUP_SIZE = 32


class KVQuantizer(nn.Module):
    """The KV quantizer of one attention layer, installed as its `kv_quant`: quantizes and
    dequantizes keys and values, allocates the integer cache, and gives attention the keys and
    values it reads (`attend`). It has no tensors of its own: every scale is computed from the
    keys and values it quantizes. `mode` "off" reads keys and values in float."""

    def __init__(self, bits: int, kv_heads: int, head_dim: int, group_size: int = DEFAULT_GROUP_SIZE,
                 where: str = ""):
        super().__init__()
        self.bits, self.kv_heads, self.head_dim, self.group_size, self.where = bits, kv_heads, head_dim, group_size, where
        self.qmax = qrange(bits)[1]
        self.per_byte = codes_per_byte(bits)
        self.mode = "quant"

    def extra_repr(self) -> str:
        return f"KV{self.bits}, keys per channel over {self.group_size} tokens, values per token"

    # ------------------------------------------------------------------ quantize / dequantize
    def _round(self, x: Tensor, scale: Tensor) -> Tensor:
        return torch.round(x / scale).clamp(-self.qmax, self.qmax).to(torch.int8)

    def quantize_keys(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """k (b, K, t, e), t a multiple of G -> codes int8 (b, K, t, e), scales (b, K, t/G, e)."""
        g = k.float().unflatten(2, (k.shape[2] // self.group_size, self.group_size))   # (b, K, t/G, G, e)
        scale = fp16_scale(g.abs().amax(dim=3, keepdim=True) / self.qmax)
        return self._round(g, scale).flatten(2, 3), scale.squeeze(3)

    def dequantize_keys(self, codes: Tensor, scales: Tensor) -> Tensor:
        g = codes.float().unflatten(2, (codes.shape[2] // self.group_size, self.group_size))
        return (g * scales.float().unsqueeze(3)).flatten(2, 3)

    def quantize_values(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """v (b, K, t, e) -> codes int8 (b, K, t, e), scales (b, K, t, 1)."""
        v = v.float()
        scale = fp16_scale(v.abs().amax(dim=-1, keepdim=True) / self.qmax)
        return self._round(v, scale), scale

    def dequantize_values(self, codes: Tensor, scales: Tensor) -> Tensor:
        return codes.float() * scales.float()

    def token_bytes(self, batch: int = 1) -> float:
        """Bytes the cache holds per token of context once its key groups are complete (codes,
        value scales, key scales shared by G tokens); the float window of at most G - 1 tokens
        comes on top."""
        codes = 2 * self.kv_heads * -(-self.head_dim // self.per_byte)
        return batch * (codes + self.kv_heads * 2 + self.kv_heads * self.head_dim * 2 / self.group_size)

    # ------------------------------------------------------------------ the cache and attention
    def allocate(self, batch: int, dtype: torch.dtype, device) -> KVState:
        """The integer cache; a float `KVState` while the quantizer is off."""
        if self.mode == "off":
            return KVState(batch, self.kv_heads, self.head_dim, dtype, device)
        return QuantizedKVState(self, batch, dtype, device)

    def attend(self, k: Tensor, v: Tensor, state=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The new tokens' keys (after RoPE) and values k, v (b, K, l, e), and the layer's cache
        (None: a forward without one), which takes them in. Returns what attention reads:
        keys quantized where their group is complete, keys in float where the cache has them in
        float (both (b, K, t, e), t all tokens), values (b, K, t, e), and `quantized` (l, t)
        bool: query i of the new tokens reads key j quantized."""
        dtype, (b, K, l, e) = k.dtype, k.shape
        if state is not None and not isinstance(state, QuantizedKVState) or state is None and self.mode == "off":
            if state is not None:                                          # a float cache: float keys
                k, v = state.append(k, v)
            return k, k, v, torch.ones(l, k.shape[2], dtype=torch.bool, device=k.device)
        if state is None:
            k_old = v_old = k.new_zeros(b, K, 0, e)
            window = k_old
        else:
            k_old, v_old = state.keys().to(dtype), state.values().to(dtype)   # the quantized prefix
            window = state.window.to(dtype)
        start = k_old.shape[2] + window.shape[2]
        tail = torch.cat([window, k], dim=2)                               # float keys after the prefix
        full = tail.shape[2] // self.group_size * self.group_size
        k_codes, k_scales = self.quantize_keys(tail[:, :, :full])
        v_codes, v_scales = self.quantize_values(v)
        if state is not None:
            state.store(k_codes, k_scales, tail[:, :, full:], v_codes, v_scales)
        k_new = self.dequantize_keys(k_codes, k_scales).to(dtype)
        keys_q = torch.cat([k_old, k_new, tail[:, :, full:]], dim=2)
        keys_f = torch.cat([k_old, tail], dim=2)
        values = torch.cat([v_old, self.dequantize_values(v_codes, v_scales).to(dtype)], dim=2)
        t = keys_q.shape[2]
        ready = (torch.arange(t, device=k.device) // self.group_size + 1) * self.group_size   # j's group complete at ready-1
        quantized = ready[None, :] <= torch.arange(start + 1, start + l + 1, device=k.device)[:, None]
        return keys_q, keys_f, values, quantized


class QuantizedKVState(KVState):
    """The keys and values of one attention layer as stored at KV8/KV4: key codes (b, K, t_q, e)
    and their scales (b, K, t_q / G, e) for the complete groups, the float window (b, K, r, e)
    of the group still filling (r < G), value codes (b, K, t, e) and scales (b, K, t, 1); codes
    int8 (8 bits) or two to a byte (4 bits: e / 2 uint8), scales float16."""

    def __init__(self, quantizer: KVQuantizer, batch: int, dtype, device):
        q = self.quantizer = quantizer
        cols = -(-q.head_dim // q.per_byte)
        code_dtype = torch.int8 if q.per_byte == 1 else torch.uint8
        self.k_codes = torch.zeros(batch, q.kv_heads, 0, cols, dtype=code_dtype, device=device)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.k_scales = torch.zeros(batch, q.kv_heads, 0, q.head_dim, dtype=torch.float16, device=device)
        self.v_scales = torch.zeros(batch, q.kv_heads, 0, 1, dtype=torch.float16, device=device)
        self.window = torch.zeros(batch, q.kv_heads, 0, q.head_dim, dtype=dtype, device=device)

    @property
    def length(self) -> int:
        return self.v_codes.shape[2]

    def keys(self) -> Tensor:
        """The keys of the complete groups, dequantized (float32)."""
        q = self.quantizer
        return q.dequantize_keys(unpack_codes(self.k_codes, q.per_byte, q.head_dim), self.k_scales)

    def values(self) -> Tensor:
        q = self.quantizer
        return q.dequantize_values(unpack_codes(self.v_codes, q.per_byte, q.head_dim), self.v_scales)

    def store(self, k_codes: Tensor, k_scales: Tensor, window: Tensor, v_codes: Tensor, v_scales: Tensor):
        """Append completed key groups and new values; `window` replaces the float window."""
        per_byte = self.quantizer.per_byte
        self.k_codes = torch.cat([self.k_codes, pack_codes(k_codes, per_byte)], dim=2)
        self.k_scales = torch.cat([self.k_scales, k_scales.half()], dim=2)
        self.v_codes = torch.cat([self.v_codes, pack_codes(v_codes, per_byte)], dim=2)
        self.v_scales = torch.cat([self.v_scales, v_scales.half()], dim=2)
        self.window = window.to(self.window.dtype)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """As `KVState.append`: take the new tokens in; returns the keys as stored (quantized
        groups dequantized, then the window) and the values dequantized."""
        keys, _, values, _ = self.quantizer.attend(k, v, self)
        return keys, values

    def tensors(self) -> dict[str, Tensor]:
        return {"kv.k_codes": self.k_codes, "kv.k_scales": self.k_scales, "kv.k_window": self.window,
                "kv.v_codes": self.v_codes, "kv.v_scales": self.v_scales}
