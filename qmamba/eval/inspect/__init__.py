"""Where a float Mamba model's outliers are: SSM state maxima, activation ranges per channel at
every quantization point, and the state quantization error of per-tensor, per-channel and DSQ
scales, from one calibration run; written as PNG plots, `summary.md` and `stats.json`
(`qmamba inspect`).

What is measured, per analysed layer (shapes as in `qmamba.models.scan`: d channels, n state
indices; Mamba2 channels are grouped by head, c = head * headdim + i):

  state maxima    max over all tokens of |h_t[c, n]|, the states of the exact per-token
                  recurrence (`selective_scan_ref` fed with the mixer's `per_channel` inputs,
                  run by the probe the mixer hands its scan to): the map DSQ factorises into a
                  channel scale times a state-axis scale. Its profiles along each axis (max over the
                  other) and their max/median ratios, and per head for Mamba2.
  activations     max |a| per channel at every quantization point: the inputs of in_proj,
                  (Mamba1) dt_proj, out_proj, the conv input and the scan inputs x, B, C, dt and
                  the gate z (forward pre-hooks; Mamba1's x_proj reads x itself).
  state SQNR      10 log10(||h||^2 / ||h - Q(h)||^2) of one quantize-dequantize at `bits` of FP
                  states sampled at SAMPLE_POSITIONS evenly spaced tokens of every sequence, with
                  `StateQuantizer`s calibrated on those same states (observe -> finish_calibration
                  -> fake_quant), their maxima raised to the maxima over every token (the `amax`
                  static scales come from, as a calibration that observes every token has). A
                  single write of FP states: not the error the re-quantized recurrence
                  accumulates, which `qmamba eval` measures.

Modules, by job: `probe` (the calibration run and what it records), `statistics` (SQNR, ratios,
the JSON-able numbers), `plots` (the PNGs), `summary` (summary.md), `report` (argument checks and
the output folder).
"""

from .report import check_bits, inspect_model, parse_layers

__all__ = ["check_bits", "inspect_model", "parse_layers"]
