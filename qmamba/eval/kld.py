"""Distance of a quantized model's next-token distribution from the float model's, on the same
tokens, as the quantization community reports it (llama.cpp's `perplexity --kl-divergence`):

    kld             KL(P_fp || P_q) per predicted token: mean, median, p99
    top1_agreement  share of tokens whose most likely next token is the same under both models
    rms_delta_p     root mean square change of the probability given to the correct token
    ppl_ratio       perplexity(q) / perplexity(fp) = exp(mean NLL_q - mean NLL_fp)

The text is cut into the same non-overlapping windows as `qmamba.eval.perplexity`. The float
model's log-probabilities are computed once per text (`fp_reference`) and kept, in float32 when
tokens x vocabulary fits the byte budget, else as the top-k log-probabilities plus the mass of
the rest (the KL term of the rest is then that of the two tail masses, a lower bound of the
exact KL; the JSON says which form was used).

Uncertainty: every figure is a mean over windows of per-token values, and windows are the
independent units (tokens inside a window share a state). A 95% interval comes from a
bootstrap over windows (the same resampling for every model on the same text, so two rows can
be compared pairwise: `paired_interval`).

Letters: w windows, t predicted positions per window (seqlen - 1), V vocabulary, k kept top-k.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import QMambaError
from .perplexity import windows

BUDGET_BYTES = 2 << 30          # full float32 reference up to 2 GiB per text
TOPK = 256
BOOTSTRAP = 2000
LEVEL = 0.95


@dataclass
class Reference:
    """The float model's next-token distribution on the windows of one text."""
    windows: Tensor                      # (w, seqlen) token ids
    logp: Optional[Tensor]               # (w, t, V) float32 log-probabilities, or None (top-k form)
    top_idx: Optional[Tensor]            # (w, t, k) int64, the k most likely tokens (top-k form)
    top_logp: Optional[Tensor]           # (w, t, k) float32, their log-probabilities
    nll: Tensor                          # (w, t) float64, NLL of the correct token
    top1: Tensor                         # (w, t) int64, argmax token

    @property
    def form(self) -> str:
        return "full" if self.logp is not None else f"top{self.top_idx.shape[-1]}"


def _batches(model: nn.Module, wins: Tensor, batch_size: int, desc: str, progress: bool):
    device = next(model.parameters()).device
    bar = tqdm(total=wins.shape[0], desc=desc, unit="window", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty())
    try:
        for start in range(0, wins.shape[0], batch_size):
            batch = wins[start:start + batch_size].to(device)                # (b, seqlen)
            logits = model(batch)[:, :-1].float().cpu()                     # (b, t, V)
            yield start, batch.cpu(), torch.log_softmax(logits, dim=-1)
            bar.update(batch.shape[0])
    finally:
        bar.close()


@torch.no_grad()
def fp_reference(model: nn.Module, ids: Tensor, seqlen: int, max_tokens: Optional[int] = None,
                 batch_size: int = 8, budget_bytes: int = BUDGET_BYTES, topk: int = TOPK,
                 progress: bool = False) -> Reference:
    """The float model's log-probabilities on the windows of `ids` (n,), kept for later rows."""
    wins = windows(ids, seqlen, max_tokens)                                 # (w, seqlen)
    w, t = wins.shape[0], seqlen - 1
    was_training = model.training
    model.eval()
    full = None
    top_idx = top_logp = None
    nll = torch.empty(w, t, dtype=torch.float64)
    top1 = torch.empty(w, t, dtype=torch.long)
    try:
        for start, batch, logp in _batches(model, wins, batch_size, "float reference", progress):
            b, vocab = batch.shape[0], logp.shape[-1]
            if full is None and top_idx is None:
                if w * t * vocab * 4 <= budget_bytes:
                    full = torch.empty(w, t, vocab, dtype=torch.float32)
                else:
                    k = min(topk, vocab)
                    top_idx = torch.empty(w, t, k, dtype=torch.long)
                    top_logp = torch.empty(w, t, k, dtype=torch.float32)
            rows = slice(start, start + b)
            if full is not None:
                full[rows] = logp
            else:
                vals, idx = logp.topk(top_idx.shape[-1], dim=-1)
                top_idx[rows], top_logp[rows] = idx, vals
            nll[rows] = -logp.gather(-1, batch[:, 1:, None])[..., 0].double()
            top1[rows] = logp.argmax(-1)
    finally:
        model.train(was_training)
    return Reference(wins, full, top_idx, top_logp, nll, top1)


def _kl_rows(ref: Reference, rows: slice, logq: Tensor) -> Tensor:
    """KL(P_fp || P_q) per token (b, t) from the quantized log-probabilities logq (b, t, V)."""
    if ref.logp is not None:
        logp = ref.logp[rows]
        return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
    lp, idx = ref.top_logp[rows], ref.top_idx[rows]                         # (b, t, k)
    lq = logq.gather(-1, idx)
    head = (lp.exp() * (lp - lq)).sum(-1)
    p_tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    q_tail = (1 - lq.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), torch.zeros_like(p_tail))
    return (head + tail).clamp_min(0)


@torch.no_grad()
def per_token(model: nn.Module, ref: Reference, batch_size: int = 8, progress: bool = False) -> dict[str, Tensor]:
    """Per-token values (w, t) of `model` against `ref`: kld, same_top1, nll, nll_fp, dp
    (p_q - p_fp of the correct token)."""
    w, t = ref.nll.shape
    kld = torch.empty(w, t, dtype=torch.float64)
    same = torch.empty(w, t, dtype=torch.bool)
    nll = torch.empty(w, t, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start, batch, logq in _batches(model, ref.windows, batch_size, "vs float", progress):
            rows = slice(start, start + batch.shape[0])
            kld[rows] = _kl_rows(ref, rows, logq).double()
            same[rows] = logq.argmax(-1) == ref.top1[rows]
            nll[rows] = -logq.gather(-1, batch[:, 1:, None])[..., 0].double()
    finally:
        model.train(was_training)
    dp = torch.exp(-nll) - torch.exp(-ref.nll)
    return {"kld": kld, "same_top1": same, "nll": nll, "nll_fp": ref.nll, "dp": dp}


# ------------------------------------------------------------------------------ intervals
def resample_counts(n_windows: int, n: int = BOOTSTRAP, seed: int = 0) -> Tensor:
    """(n, w) how often each window is drawn in each bootstrap resample (same seed, same draws)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_windows, (n, n_windows), generator=g)
    return torch.zeros(n, n_windows, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n, n_windows,
                                                                                         dtype=torch.float64))


def _interval(samples: Tensor, level: float = LEVEL) -> list[float]:
    lo = (1 - level) / 2
    q = torch.quantile(samples.float(), torch.tensor([lo, 1 - lo]))
    return [q[0].item(), q[1].item()]


def window_sums(values: dict[str, Tensor]) -> dict[str, list[float]]:
    """Per-window sums (w,) of the per-token values: what intervals and paired comparisons need."""
    return {
        "kld": values["kld"].sum(1).tolist(),
        "same_top1": values["same_top1"].double().sum(1).tolist(),
        "nll": values["nll"].sum(1).tolist(),
        "nll_fp": values["nll_fp"].sum(1).tolist(),
        "dp2": values["dp"].pow(2).sum(1).tolist(),
        "tokens": [float(values["kld"].shape[1])] * values["kld"].shape[0],
    }


def _stats(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """The summary figures from (resampled) window sums; works on (w,) or (n, ...) totals."""
    n = sums["tokens"]
    return {
        "kld": sums["kld"] / n,
        "top1_agreement": sums["same_top1"] / n,
        "rms_delta_p": (sums["dp2"] / n).sqrt(),
        "ppl_ratio": torch.exp((sums["nll"] - sums["nll_fp"]) / n),
        "perplexity": torch.exp(sums["nll"] / n),
    }


def summarize(values: dict[str, Tensor], n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """The figures with 95% bootstrap intervals over windows, plus the window sums."""
    sums = window_sums(values)
    per_window = {k: torch.tensor(v, dtype=torch.float64) for k, v in sums.items()}
    point = _stats({k: v.sum() for k, v in per_window.items()})
    counts = resample_counts(len(sums["tokens"]), n_boot, seed)             # (n, w)
    boot = _stats({k: counts @ v for k, v in per_window.items()})
    kld = values["kld"].flatten().float()
    out = {
        "kld": {"mean": point["kld"].item(), "median": kld.median().item(),
                "p99": torch.quantile(kld, 0.99).item() if kld.numel() <= 1 << 24 else float("nan"),
                "ci95": _interval(boot["kld"])},
    }
    for name in ("top1_agreement", "rms_delta_p", "ppl_ratio", "perplexity"):
        out[name] = {"value": point[name].item(), "ci95": _interval(boot[name])}
    out["windows"] = len(sums["tokens"])
    out["tokens"] = int(sum(sums["tokens"]))
    out["window_sums"] = sums
    return out


def paired_interval(a: dict, b: dict, metric: str = "kld", n_boot: int = BOOTSTRAP, seed: int = 0) -> list[float]:
    """95% interval of metric(a) - metric(b) for two summaries of the same text and windows,
    resampling the same windows for both (a paired bootstrap)."""
    sa, sb = a["window_sums"], b["window_sums"]
    if sa["tokens"] != sb["tokens"]:
        raise QMambaError("paired comparison needs the same windows of the same text")
    counts = resample_counts(len(sa["tokens"]), n_boot, seed)
    ta = _stats({k: counts @ torch.tensor(v, dtype=torch.float64) for k, v in sa.items()})[metric]
    tb = _stats({k: counts @ torch.tensor(v, dtype=torch.float64) for k, v in sb.items()})[metric]
    return _interval(ta - tb)


def significant(interval: list[float]) -> bool:
    """Whether a paired interval excludes zero."""
    return interval[0] > 0 or interval[1] < 0


def evaluate_against(model: nn.Module, ref: Reference, batch_size: int = 8, progress: bool = False,
                     n_boot: int = BOOTSTRAP) -> dict:
    """`summarize(per_token(model, ref))` plus the reference's form."""
    out = summarize(per_token(model, ref, batch_size, progress), n_boot)
    out["reference"] = ref.form
    return out


def self_summary(ref: Reference, n_boot: int = BOOTSTRAP) -> dict:
    """The float model's own row: its perplexity (with interval) from the reference, distance 0."""
    zeros = torch.zeros_like(ref.nll)
    out = summarize({"kld": zeros, "same_top1": torch.ones_like(ref.nll, dtype=torch.bool), "nll": ref.nll,
                     "nll_fp": ref.nll, "dp": zeros}, n_boot)
    out["reference"] = ref.form
    return out


def accuracy_stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy over n independent items (binomial)."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n) if n > 0 else float("nan")
