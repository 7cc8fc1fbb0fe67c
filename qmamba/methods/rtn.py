"""Round-to-nearest: min-max static per-tensor activation scales, per-channel weights, and (by
default) a static per-tensor state scale: the plain PTQ baseline. It is the lifecycle with no
step of its own."""

from __future__ import annotations

from ..quant.apply import install_quantizers, quantize_weights
from ..quant.calibrate import run_calibration
from .registry import METHODS, Method, register


def calibrate_and_round(model, qcfg, calib, observers=None, progress=True):
    """install -> calibrate -> round: the steps every static method shares after its own float
    transforms."""
    install_quantizers(model, qcfg, observers)
    run_calibration(model, calib, progress=progress)
    quantize_weights(model, qcfg)
    return model


@register
class RTN(Method):
    name = "rtn"
    description = "round-to-nearest, min-max static per-tensor activations, per-channel weights"


rtn = METHODS["rtn"]
