"""ESR: Efficient Selectivity Reconstruction (Q-Mamba), block-wise reconstruction in the style of
OmniQuant / BRECQ whose quantization simulation of the state keeps a parallel scan.

For block i (blocks are the residual layers, i = 0..L-1):
  1. FP target   Y_i = block_fp(X_fp_i) on the calibration set (quantizers off, float weights);
  2. train the block's quantization parameters on the quantized model's own input X_q_i:
     minimise ||block_q(X_q_i) - Y_i||^2 with AdamW and straight-through rounding, the state
     recurrence simulated by `qmamba.quant.sim` (`sim`). Learned: weight clipping factors
     (per output channel), static activation scales, the DSQ state-axis scales s_n and static
     state scales, and optionally the dt bias;
  3. freeze: round the weights with the learned clipping, X_q_{i+1} = block_q(X_q_i) under the
     EXACT per-token recurrence (never the simulation), X_fp_{i+1} = Y_i.
The loss of each block before and after is measured with the exact recurrence, on the outputs
that become the next inputs (the fake-quantized weights of training are the rounded weights of
the frozen block, value for value): outside training a block runs three times (FP target,
before, after). With `resume_dir` every finished block is saved (its tensors and the next
inputs), so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import QMambaError
from ..models.layer_spec import get_path, quantizable_linears
from ..quant.activation import ActQuantizer
from ..quant.kv import KVQuantizer
from ..quant.linear import QLinear
from ..quant.sim import SIMS, StateSim
from ..quant.state import StateQuantizer

log = logging.getLogger("qmamba.esr")


@dataclass
class ESRConfig:
    """ESR's options; each is also a flag --esr-<name> of the commands that quantize."""
    cli_prefix: ClassVar[str] = "esr"
    cli_title: ClassVar[str] = "ESR"
    # one of qmamba.quant.sim.SIMS; chosen on the dev texts by benchmarks/esr_dev_sweep.py
    sim: str = field(default="exact", metadata={
        "choices": tuple(SIMS), "help": "quantized-state simulation while training (default exact)"})
    epochs: int = field(default=4, metadata={"metavar": "E", "help": "epochs per block (default 4)"})
    batch_size: int = field(default=4, metadata={"metavar": "B", "help": "ESR batch size (default 4)"})
    nsamples: int = field(default=64, metadata={        # the first N of the calibration set
        "metavar": "N", "help": "calibration sequences used by ESR (default 64)"})
    seqlen: int = field(default=256, metadata={         # the first L tokens of each
        "metavar": "L", "help": "tokens per ESR sequence (default 256)"})
    lr: float = field(default=2e-2, metadata={          # relative to each parameter's magnitude
        "metavar": "LR", "help": "AdamW learning rate (default 0.02)"})
    learn_weights: bool = field(default=True, metadata={"help": "learn weight clipping factors (default on)"})
    learn_acts: bool = field(default=True, metadata={"help": "learn static activation scales (default on)"})
    learn_state: bool = field(default=True, metadata={"help": "learn s_n and static state scales (default on)"})
    learn_dt_bias: bool = field(default=False, metadata={"flag": "dt-bias", "help": "also learn the dt bias"})
    chunk: int = field(default=32, metadata={"metavar": "C", "help": 'chunk length of the "chunk" simulation (default 32)'})
    seed: int = field(default=0, metadata={"option": False})     # the quantization seed
    device: Optional[str] = field(default=None, metadata={    # None: CUDA when present, else the model's
        "metavar": "DEV", "help": "where blocks train (default: cuda when present, else the model's device)"})

    def __post_init__(self):
        if self.sim not in SIMS:
            raise QMambaError(f"unknown ESR simulation {self.sim!r}; choose one of {', '.join(SIMS)}")
        for k in ("epochs", "batch_size", "nsamples", "seqlen"):
            if getattr(self, k) <= 0:
                raise QMambaError(f"ESR {k} must be positive")


def _run(block, X: Tensor, bs: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([block(X[i:i + bs]).float() for i in range(0, len(X), bs)])


def _learnable(block, qcfg, cfg: ESRConfig) -> list[dict]:
    """Make this block's quantization parameters trainable; AdamW groups with learning rates
    relative to each parameter's magnitude (scales span orders of magnitude). What is learnable
    is what the layer declares: its linears' clipping, the scales of the quantizers installed
    in it, and its LEARNABLE extras (the dt bias)."""
    mixer = block.mixer
    groups = []

    def add(p: torch.nn.Parameter):
        p.requires_grad_(True)
        mag = p.detach().abs().mean().clamp(min=1e-8).item()
        groups.append({"params": [p], "lr": cfg.lr * mag, "weight_decay": 0.0})

    if cfg.learn_weights and qcfg.w_bits is not None:
        for name in quantizable_linears(mixer):
            lin = get_path(mixer, name)
            if isinstance(lin, QLinear) and lin.w_bits is None:
                add(lin.learn_weight_clipping(qcfg.w_bits, qcfg.w_group_size))
    for m in mixer.modules():
        if cfg.learn_acts and isinstance(m, ActQuantizer) and not m.dynamic:
            add(m.scale)
        if cfg.learn_state and isinstance(m, StateQuantizer):
            if m.layout.uses_s_n:
                add(m.s_n)
            if m.scale_mode == "static":
                add(m.static_scale)
    if cfg.learn_dt_bias and "dt_bias" in mixer.LEARNABLE:
        add(get_path(mixer, mixer.LEARNABLE["dt_bias"]))
    return groups


def _freeze(block):
    for p in block.parameters():
        p.requires_grad_(False)
    for m in block.modules():
        if isinstance(m, QLinear) and hasattr(m, "w_clip"):
            m.finish_weight_learning()
        if isinstance(m, StateQuantizer):
            m.s_n.data.clamp_(min=1e-6)
            m.static_scale.data.clamp_(min=1e-12)
        if isinstance(m, ActQuantizer):
            m.scale.data.clamp_(min=1e-12)


def reconstruct_block(block, i: int, X_fp: Tensor, X_q: Tensor, qcfg, cfg: ESRConfig,
                      g: torch.Generator, work: torch.device) -> tuple[Tensor, Tensor, dict]:
    """ESR of one calibrated block (steps 1-3 of the module docstring), in place, on `work`:
    X_fp, X_q (N, L, d_model) float32 inputs -> (next X_fp, next X_q, the block's record). `g`
    orders the batches; one generator runs through all blocks (`reconstruct`, the streamed path)."""
    block = block.to(work)
    t0 = time.time()
    fp_block = copy.deepcopy(block)
    for m in fp_block.modules():
        if isinstance(m, (ActQuantizer, StateQuantizer, KVQuantizer)):
            m.mode = "off"
    Y = _run(fp_block, X_fp, cfg.batch_size)                                # FP target
    del fp_block
    groups = _learnable(block, qcfg, cfg)
    out = _run(block, X_q, cfg.batch_size)                                  # calibrated, exact
    before = F.mse_loss(out, Y).item()
    start_values = [p.detach().clone() for gr in groups for p in gr["params"]]
    if groups:
        mixer = block.mixer
        if mixer.state_quant is not None:
            mixer.state_sim = StateSim(cfg.sim, mixer.state_quant, cfg.chunk)
        opt = torch.optim.AdamW(groups)
        block.train()
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(X_q), generator=g).split(cfg.batch_size):
                loss = F.mse_loss(block(X_q[idx]).float(), Y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        block.eval()
        mixer.state_sim = None
    after, kept = before, True
    if groups:
        out_after = _run(block, X_q, cfg.batch_size)                        # reconstructed, exact
        after = F.mse_loss(out_after, Y).item()
        kept = after <= before
        if kept:
            out = out_after
        else:                             # reconstruction made this block worse: undo it
            with torch.no_grad():
                for p, v in zip((p for gr in groups for p in gr["params"]), start_values):
                    p.copy_(v)
            after = before
        del out_after
    _freeze(block)                        # rounds the weights to what training simulated
    rec = {"block": i, "mse_before": before, "mse_after": after, "kept": kept,
           "seconds": round(time.time() - t0, 2)}
    log.info("ESR block %d: mse %.4g -> %.4g (%.1f s)", i, before, after, rec["seconds"])
    return Y, out, rec                    # the block's exact outputs are the next block's inputs


def reconstruct(model, qcfg, calib: Tensor, cfg: ESRConfig, resume_dir: Optional[Path] = None,
                progress: bool = True) -> list[dict]:
    """Run ESR in place on a model whose quantizers are installed and calibrated and whose
    linears still hold float weights. Returns one record per block."""
    device = next(model.parameters()).device
    # blocks move to the work device one at a time (a model larger than GPU memory still fits)
    work = torch.device(cfg.device) if cfg.device else \
        (torch.device("cuda") if torch.cuda.is_available() else device)
    if calib.shape[0] < cfg.nsamples or calib.shape[1] < cfg.seqlen:
        log.warning("ESR uses %d x %d calibration tokens, not the %d x %d asked for: the calibration set "
                    "holds no more (raise nsamples / seqlen of the calibration)", min(cfg.nsamples, calib.shape[0]),
                    min(cfg.seqlen, calib.shape[1]), cfg.nsamples, cfg.seqlen)
    ids = calib[: cfg.nsamples, : cfg.seqlen].to(device)
    layers = model.backbone.layers
    records: list[dict] = []
    with torch.no_grad():
        X_fp = model.embed(ids).float().to(work)                            # (N, L, d_model)
    X_q = X_fp.clone()
    start = 0
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        resume_dir.mkdir(parents=True, exist_ok=True)
        start, X_fp, X_q, records = _resume(model, resume_dir, X_fp, X_q, qcfg)
        X_fp, X_q = X_fp.to(work), X_q.to(work)
    bar = tqdm(range(start, len(layers)), desc="ESR", unit="block", disable=not progress)
    g = torch.Generator().manual_seed(cfg.seed)
    for i in bar:
        X_fp, X_q, rec = reconstruct_block(layers[i], i, X_fp, X_q, qcfg, cfg, g, work)
        layers[i].to(device)
        records.append(rec)
        bar.set_postfix(block=i, before=f"{rec['mse_before']:.3g}", after=f"{rec['mse_after']:.3g}")
        if resume_dir is not None:
            _save_block(model, resume_dir, i, X_fp, X_q, records, qcfg, cfg)
    return records


# ------------------------------------------------------------------------- resume
def _block_tensors(model, i: int) -> dict:
    prefix = f"backbone.layers.{i}."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def _save_block(model, folder: Path, i: int, X_fp, X_q, records, qcfg, cfg):
    tmp = folder / f"block{i}.pt.tmp"
    torch.save({"block": _block_tensors(model, i), "X_fp": X_fp, "X_q": X_q}, tmp)
    tmp.replace(folder / f"block{i}.pt")
    meta = {"done": i, "records": records, "config": qcfg.to_dict(), "esr": asdict(cfg)}
    (folder / "progress.json").write_text(json.dumps(meta, indent=1))
    prev = folder / f"block{i - 1}.pt"
    if prev.exists():                      # keep the next inputs of the last block only
        data = torch.load(prev, weights_only=True)
        torch.save({"block": data["block"]}, prev)


def _resume(model, folder: Path, X_fp, X_q, qcfg):
    prog = folder / "progress.json"
    if not prog.exists():
        return 0, X_fp, X_q, []
    meta = json.loads(prog.read_text())
    if meta.get("config") != qcfg.to_dict():
        raise QMambaError(f"ESR resume folder {folder} belongs to another configuration; remove it")
    done = int(meta["done"])
    for i in range(done + 1):
        data = torch.load(folder / f"block{i}.pt", weights_only=True)
        block = model.backbone.layers[i]
        for m in block.modules():         # rebuild the finished block's integer weights, then load
            if isinstance(m, QLinear) and m.w_bits is None and qcfg.w_bits is not None:
                m.quantize_weights_(qcfg.w_bits, qcfg.w_group_size)
        block.load_state_dict(data["block"])
        if i == done:
            X_fp, X_q = data["X_fp"], data["X_q"]
    log.info("ESR: resumed after block %d from %s", done, folder)
    return done + 1, X_fp, X_q, meta["records"]
