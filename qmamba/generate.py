"""Autoregressive generation: the prompt through the parallel path into a recurrent cache, then
one `step` per new token (constant memory and time per token, the point of an SSM)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import QMambaError
from .models.lm import MambaLM


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (b,) from logits (b, vocab): argmax when temperature == 0, otherwise a
    draw from softmax(logits / temperature), restricted to the top_k logits if given."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                     # (b, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MambaLM, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: Optional[int] = None,
             eos_token_id: Optional[int] = None) -> Tensor:
    """Continue prompts input_ids (b, l) by up to `max_new_tokens` tokens -> (b, l + new).

    temperature 0 is greedy decoding; `seed` makes sampling reproducible. With `eos_token_id`,
    a sequence that produced it is padded with it, and generation stops once all have."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise QMambaError(f"generate needs prompt ids of shape (batch, length >= 1), got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise QMambaError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise QMambaError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise QMambaError(f"top_k must be >= 1, got {top_k}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if max_new_tokens == 0:
        return input_ids
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    out = [input_ids]
    cache = model.allocate_cache(input_ids.shape[0])
    logits = model(input_ids, cache, logits_to_keep=1)[:, -1]              # (b, vocab)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)               # (b,)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token[:, None])
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        logits = model.step(token, cache)                                   # (b, vocab)
    return torch.cat(out, dim=1)
