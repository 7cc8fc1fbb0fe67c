"""Q-Mamba: DSQ state quantization + ESR block-wise reconstruction (the paper's method).

Install quantizers -> calibrate (static scales, DSQ s_n) -> ESR learns the clipping and scales
block by block under a parallel-scan simulation of the quantized state, rounding each block's
weights with its learned clipping -> any weights left are rounded to nearest. Every option of
`qmamba.methods.esr.ESRConfig` is a method option (e.g. sim="exact", epochs=4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..quant.apply import install_quantizers, quantize_weights
from ..quant.calibrate import run_calibration
from .registry import register
from .esr import ESRConfig, reconstruct


@register("qmamba", "Q-Mamba: DSQ state quantization + ESR block-wise reconstruction (default)",
          state_quant="dsq", state_scale="dynamic")
def qmamba(model, qcfg, calib, progress=True, resume_dir: Optional[Path] = None, **esr_options):
    install_quantizers(model, qcfg)
    run_calibration(model, calib, progress=progress)
    model.esr_records = reconstruct(model, qcfg, calib, ESRConfig(seed=qcfg.seed, **esr_options),
                                    resume_dir=resume_dir, progress=progress)
    quantize_weights(model, qcfg)
    return model
