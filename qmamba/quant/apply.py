"""Put quantizers into a model: activation quantizers at the mixers' quantization points,
quantized linears (float weights until `quantize_weights`), and one state quantizer per layer.

The order every method follows: transform the float model (smoothing, rotation) ->
`install_quantizers` -> calibrate (`qmamba.quant.calibrate`) -> `quantize_weights` -> optionally
reconstruct (ESR).
"""

from __future__ import annotations

import logging

from ..models.layer_spec import get_path, quantizable_linears, set_path, state_spec
from .activation import ActQuantizer
from .config import QuantConfig
from .kv import KVQuantizer
from .linear import QLinear
from .state import StateQuantizer

log = logging.getLogger(__name__)


def mixers(model):
    """(index, layer type, mixer) for every layer."""
    for i, layer in enumerate(model.backbone.layers):
        yield i, layer.layer_type, layer.mixer


def _act(qcfg: QuantConfig, where: str, observer: str | None = None) -> ActQuantizer:
    return ActQuantizer(qcfg.a_bits, dynamic=qcfg.a_dynamic, observer=observer or qcfg.a_observer,
                        percentile=qcfg.a_percentile, where=where)


def install_quantizers(model, qcfg: QuantConfig, observers: dict | None = None) -> None:
    """Install (uncalibrated) quantizers for `qcfg` in place, where each layer declares them
    (`qmamba.models.layer_spec`): activation quantizers at its quantization points, a quantized
    linear for each of its linears (one input quantizer per group of linears that read the same
    input), a state quantizer for its SSM state, a KV quantizer for its KV cache (`qcfg.kv_bits`;
    a model without attention layers logs one warning and runs as without the KV part).
    `observers` maps a quantization point name (e.g. "quant_x") or a linear's name to the observer
    it should use instead of the config's."""
    if qcfg.state_quant is None or qcfg.state_scale is None:
        raise ValueError("resolve the method's state quantizer defaults before installing")
    observers = observers or {}
    kv_layers = 0
    for i, _, mixer in mixers(model):
        prefix = f"backbone.layers.{i}.mixer"
        if qcfg.a_bits is not None:
            for point in mixer.QUANT_POINTS:
                setattr(mixer, point, _act(qcfg, f"{prefix}.{point}", observers.get(point)))
        if qcfg.a_bits is not None or qcfg.w_bits is not None:
            for group in mixer.linear_groups():
                iq = None
                for name in group.linears:
                    lin = get_path(mixer, name)
                    if isinstance(lin, QLinear):
                        continue
                    if iq is None and qcfg.a_bits is not None and not group.input_quantized:
                        iq = _act(qcfg, f"{prefix}.{name}.input", observers.get(name))
                    set_path(mixer, name, QLinear.from_linear(lin, None, input_quant=iq))
        ssm = state_spec(mixer, "ssm")
        if qcfg.h_bits is not None and ssm is not None:
            d, n = ssm.shape
            mixer.state_quant = StateQuantizer(
                qcfg.state_quant, qcfg.h_bits, d, n, headdim=ssm.headdim,
                scale_mode=qcfg.state_scale, rounding=qcfg.state_rounding,
                group_size=qcfg.state_group_size, seed=qcfg.seed * 7919 + i, where=prefix)
        kv = state_spec(mixer, "kv")
        if qcfg.kv_bits is not None and kv is not None:
            kv_layers += 1
            if mixer.kv_quant is None:
                _, kv_heads, head_dim = kv.shape
                mixer.kv_quant = KVQuantizer(qcfg.kv_bits, kv_heads, head_dim, group_size=qcfg.kv_group_size,
                                             where=prefix)
    if qcfg.kv_bits is not None and not kv_layers:
        log.warning("%s: the model has no attention layers, so no KV cache; KV%d changes nothing",
                    qcfg.name, qcfg.kv_bits)


def quantize_weights(model, qcfg: QuantConfig, clips: dict | None = None) -> None:
    """Round every declared linear's weights to `qcfg.w_bits` (round-to-nearest; `clips` maps a
    module path to per-channel clip factors learned elsewhere)."""
    if qcfg.quantize_head:
        quantize_head(model)
    if qcfg.w_bits is None:
        return
    clips = clips or {}
    for i, _, mixer in mixers(model):
        for name in quantizable_linears(mixer):
            lin = get_path(mixer, name)
            if isinstance(lin, QLinear) and lin.w_bits is None:
                lin.quantize_weights_(qcfg.w_bits, qcfg.w_group_size,
                                      clips.get(f"backbone.layers.{i}.mixer.{name}"))


def quantize_head(model) -> None:
    """8-bit embedding and lm_head (tied heads stay tied)."""
    from .embedding import QEmbedding, TiedQHead

    emb = model.backbone.embeddings
    if isinstance(emb, QEmbedding):
        return
    qemb = QEmbedding.from_embedding(emb)
    model.backbone.embeddings = qemb
    if model.config.tie_embeddings:
        model.lm_head = TiedQHead(qemb)
    else:
        model.lm_head = QLinear.from_linear(model.lm_head, 8)


def state_quantizers(model) -> list[StateQuantizer]:
    return [m.state_quant for _, _, m in mixers(model) if m.state_quant is not None]


def set_quant_mode(model, mode: str) -> None:
    """'quant' | 'off' for every activation, state and KV quantizer (e.g. 'off' for FP targets)."""
    for m in model.modules():
        if isinstance(m, (ActQuantizer, StateQuantizer, KVQuantizer)):
            m.mode = mode


def is_quantized(model) -> bool:
    return any(isinstance(m, (QLinear, ActQuantizer, StateQuantizer, KVQuantizer)) for m in model.modules())
