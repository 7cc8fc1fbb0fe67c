"""Q-Mamba: DSQ state quantization + ESR block-wise reconstruction (the paper's method).

Install quantizers -> calibrate (static scales, DSQ s_n) -> ESR learns the clipping and scales
block by block under a parallel-scan simulation of the quantized state, rounding each block's
weights with its learned clipping -> any weights left are rounded to nearest. Every option of
`qmamba.methods.esr.ESRConfig` is a method option (e.g. sim="exact", epochs=4), and so is
`resume_dir`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import QMambaError
from .esr import ESRConfig, reconstruct
from .registry import METHODS, Method, register


@dataclass
class QMambaOptions(ESRConfig):
    resume_dir: Optional[Path] = field(default=None, metadata={
        "flag": "resume", "metavar": "DIR", "per_row": False,
        "help": "save each finished block here and resume an interrupted run from it"})

    def esr_config(self, seed: int) -> ESRConfig:
        """The ESRConfig part, with the quantization seed."""
        return ESRConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ESRConfig)
                            if f.name != "seed"}, seed=seed)

    def check_run(self, flag: Callable[[str], str], given: set, nsamples: int, seqlen: int,
                  out: Optional[Path]) -> None:
        """Before any work: what the command line asks must be possible. flag(name): a field's
        flag; given: the fields set explicitly; nsamples x seqlen: the calibration set; out: the
        command's output folder."""
        if "lr" in given and not (math.isfinite(self.lr) and self.lr > 0):
            raise QMambaError(f"{flag('lr')} must be a positive number, got {self.lr}")
        # ESR trains on the first N calibration sequences, their first L tokens: no more exist
        if "nsamples" in given and self.nsamples > nsamples:
            raise QMambaError(f"{flag('nsamples')} {self.nsamples:,} is more than the --nsamples {nsamples:,} "
                              "calibration sequences ESR takes them from")
        if "seqlen" in given and self.seqlen > seqlen:
            raise QMambaError(f"{flag('seqlen')} {self.seqlen:,} is longer than the --calib-seqlen "
                              f"{seqlen:,} calibration sequences ESR takes them from")
        if self.resume_dir is not None:
            from ..utils.io import check_output

            check_output(self.resume_dir, flag("resume_dir"), folder=True, force=True)
            resume = Path(self.resume_dir)
            if resume.is_dir() and any(resume.iterdir()) and not (resume / "progress.json").is_file():
                raise QMambaError(f"{flag('resume_dir')} {resume} is neither empty nor an ESR resume folder "
                                  "(no progress.json); give a new or empty folder")
            if out is not None and Path(os.path.abspath(out)) in (p := Path(os.path.abspath(resume)), *p.parents):
                raise QMambaError(f"{flag('resume_dir')} {resume} must be outside --out {out}, which is "
                                  "replaced when saving")

    def work_bytes(self, d_model: int, nsamples: int, seqlen: int) -> tuple[int, str]:
        """ESR keeps four (N, L, d_model) float32 activation sets (float and quantized inputs and
        outputs of the block it trains): the bytes, and what they are for."""
        n, L = min(self.nsamples, nsamples), min(self.seqlen, seqlen)
        return (4 * n * L * d_model * 4,
                f"ESR on {n:,} sequences x {L:,} tokens x d_model {d_model:,} (--esr-nsamples, --esr-seqlen)")


@register
class QMamba(Method):
    name = "qmamba"
    description = "Q-Mamba: DSQ state quantization + ESR block-wise reconstruction (default)"
    options = QMambaOptions
    state_quant = "dsq"
    state_scale = "dynamic"

    def reconstruct(self, model, qcfg, calib, opts: QMambaOptions, progress: bool) -> list:
        return reconstruct(model, qcfg, calib, opts.esr_config(qcfg.seed), resume_dir=opts.resume_dir,
                           progress=progress)


qmamba = METHODS["qmamba"]
