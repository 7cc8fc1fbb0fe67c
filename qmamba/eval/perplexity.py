"""Perplexity of a causal LM on a text file, the standard WikiText-2 protocol.

The whole file is tokenized at once (no BOS or other special tokens) and cut into
non-overlapping windows of `seqlen` tokens; a last, partial window is dropped. Each window is
one independent forward pass; every position but the first of a window is predicted from the
tokens before it in that window. perplexity = exp(mean NLL over all predicted positions),
with the NLL summed in float64.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import QMambaError
from ..utils.io import read_text


def tokenize_text_file(path, tokenizer) -> Tensor:
    """The ids of a whole UTF-8 text file, without special tokens -> LongTensor (n,)."""
    text = read_text(path, "text file")
    if not text.strip():
        raise QMambaError(f"text file {path} is empty")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: Tensor, seqlen: int, max_tokens: Optional[int] = None) -> Tensor:
    """Non-overlapping windows of the first `max_tokens` ids (all if None). ids (n,) -> (w, seqlen)."""
    if seqlen < 2:
        raise QMambaError(f"seqlen must be at least 2 (one token predicted per window), got {seqlen}")
    if max_tokens is not None and max_tokens < 1:
        raise QMambaError(f"max_tokens must be positive, got {max_tokens}")
    ids = ids.reshape(-1)[:max_tokens]
    count = ids.numel() // seqlen
    if count == 0:
        limit = " (after max_tokens)" if max_tokens is not None else ""
        raise QMambaError(f"the text has {ids.numel()} tokens{limit}, fewer than one window of "
                          f"seqlen={seqlen}; use a smaller --seqlen or a longer text")
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int = 2048, max_tokens: Optional[int] = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of `model` (input_ids (b, l) -> logits (b, l, vocab)) on token ids (n,).

    Returns perplexity, nll (mean, nats), tokens (predicted positions = windows * (seqlen - 1)),
    windows, seqlen and text_tokens (ids given, before max_tokens and the dropped tail).
    """
    if batch_size < 1:
        raise QMambaError(f"batch_size must be positive, got {batch_size}")
    wins = windows(ids, seqlen, max_tokens)                                 # (w, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(total=wins.shape[0], desc="perplexity", unit="window", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty())
    try:
        for start in range(0, wins.shape[0], batch_size):
            batch = wins[start:start + batch_size].to(device)               # (b, seqlen)
            logits = model(batch)[:, :-1].float()                           # (b, seqlen-1, vocab)
            nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            total += nll.double().sum().item()
            count += nll.numel()
            bar.update(batch.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    mean = total / count
    return {
        "perplexity": math.inf if mean > 709 else math.exp(mean),   # NaN stays NaN
        "nll": mean,
        "tokens": count,
        "windows": wins.shape[0],
        "seqlen": seqlen,
        "text_tokens": ids.numel(),
    }
