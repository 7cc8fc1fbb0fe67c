"""Round-to-nearest: min-max static per-tensor activation scales, per-channel weights, and (by
default) a static per-tensor state scale: the plain PTQ baseline."""

from __future__ import annotations

from ..quant.apply import install_quantizers, quantize_weights
from ..quant.calibrate import run_calibration
from .registry import register


def calibrate_and_round(model, qcfg, calib, observers=None, progress=True):
    """The steps every static method shares after its own float transforms."""
    install_quantizers(model, qcfg, observers)
    run_calibration(model, calib, progress=progress)
    quantize_weights(model, qcfg)
    return model


@register("rtn", "round-to-nearest, min-max static per-tensor activations, per-channel weights")
def rtn(model, qcfg, calib, progress=True):
    return calibrate_and_round(model, qcfg, calib, progress=progress)
