"""Calibration: sequences of tokens from a text file (the shipped validation text by default),
and one pass of them through the model with every quantizer observing.

Static activation scales and all state scales come from here; the float state is observed after
every 16th token of every sequence (`qmamba.quant.state_scan.OBSERVE_EVERY`), computed by the parallel scan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import QMambaError
from ..utils.paths import VALIDATION_TEXT
from .activation import ActQuantizer
from .state import StateQuantizer

DEFAULT_CALIB_TEXT = VALIDATION_TEXT


def calibration_ids(tokenizer, path: Optional[Path] = None, nsamples: int = 128, seqlen: int = 512,
                    seed: int = 0) -> Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the text -> (N, L) long."""
    if nsamples <= 0 or seqlen < 2:
        raise QMambaError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    path = Path(path) if path is not None else DEFAULT_CALIB_TEXT
    if not path.is_file():
        raise QMambaError(f"calibration text {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QMambaError(f"calibration text {path} is not UTF-8") from None
    if tokenizer is None:
        raise QMambaError("calibration needs the model's tokenizer; this model folder has none")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < seqlen:
        raise QMambaError(f"calibration text {path} has {len(ids)} tokens, fewer than one sequence of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def quantizers(model):
    for m in model.modules():
        if isinstance(m, (ActQuantizer, StateQuantizer)):
            yield m


@torch.no_grad()
def run_calibration(model, calib: Tensor, batch_size: int = 16, progress: bool = True):
    """Observe every quantizer of `model` on `calib` (N, L), then fix the static scales."""
    qs = list(quantizers(model))
    if not qs:
        return
    for q in qs:
        q.mode = "observe"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(calib), batch_size), desc="calibrate", unit="batch",
                      disable=not progress, leave=False):
            model(calib[i:i + batch_size].to(device))
    finally:
        for q in qs:
            if q.mode == "observe":
                q.mode = "quant"
        model.train(was_training)
    for q in qs:
        q.finish_calibration()
