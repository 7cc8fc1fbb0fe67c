"""`QMambaLM`: our `MambaLM` (float or quantized) as an lm-evaluation-harness model.

It is an `lm_eval.api.model.LM` (through lm-eval's `TemplateLM`, which gives it HFLM's exact
context/continuation tokenization) around a `MambaLM` and a tokenizer: `loglikelihood`,
`loglikelihood_rolling` and greedy `generate_until` through the recurrent cache. Requests are
batched: sorted by length (longest first), right-padded (safe for a causal model: a real
position never sees the padding after it), and only the real continuation positions go through
the LM head and the float32 log-softmax. `qmamba.eval.tasks.run_tasks` runs tasks through it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from ..errors import QMambaError
from ..models import MambaLM
from ..utils.tokenizer import load_tokenizer

__all__ = ["QMambaLM"]


class QMambaLM(TemplateLM):
    """lm-eval model around our `MambaLM` (any of its quantized forms) and a HF tokenizer.

    `max_length` bounds a scored window (like HFLM's: longer inputs are left-truncated, rolling
    perplexity uses windows of this many tokens); the recurrent model itself has no limit.
    """

    backend = "causal"

    def __init__(self, model: torch.nn.Module, tokenizer=None, batch_size: int = 16,
                 max_length: int = 2048, max_gen_toks: int = 256, show_progress: bool = False):
        super().__init__()
        if int(batch_size) < 1:
            raise QMambaError(f"batch_size must be >= 1, got {batch_size}")
        if int(max_length) < 2:
            raise QMambaError(f"max_length must be >= 2, got {max_length}")
        self.model = model
        # None: the project tokenizer; a path: the tokenizer saved there
        self.tokenizer = (load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, (str, os.PathLike))
                          else tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise QMambaError("the tokenizer has no eos token; lm-eval needs one as prefix token")
        self._batch_size = int(batch_size)
        self._max_length = int(max_length)
        self._max_gen_toks = int(max_gen_toks)
        self.show_progress = show_progress
        self._pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                        else self.tokenizer.eos_token_id)

    # -- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the eos token conditions an empty context and the first rolling window
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "qmamba").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
        # our tokenizer adds no BOS; never let a tokenizer config add special tokens either
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        cfg = getattr(self.model, "config", None)
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_arch": getattr(cfg, "arch", type(self.model).__name__)}

    # -- model calls
    @contextlib.contextmanager
    def _inference(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _hidden_or_logits(self, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, bool]:
        """(b, l) -> (hidden, True) for our MambaLM (the head is applied later, only where a
        score is needed: the (b, l, vocab) logits of a long batch would be gigabytes), else
        (logits, False)."""
        if isinstance(self.model, MambaLM):
            return self.model(ids, cache, return_hidden=True), True
        return (self.model(ids) if cache is None else self.model(ids, cache)), False

    def _head(self, h: torch.Tensor, is_hidden: bool) -> torch.Tensor:
        return (self.model._head(h) if is_hidden else h).float()

    def _progress(self, total: int, desc: str, disable: bool):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=disable or not self.show_progress)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM's: HFLM's tokenization (encode context + continuation whole, split at the
        # context's length; trailing context spaces move to the continuation; an empty context
        # becomes the eos token); only its "Tokenizing inputs" bar follows show_progress
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context tokens, continuation tokens) ->
        (sum of the continuation's log-probabilities, whether greedy decoding gives it)."""
        L = self.max_length
        inputs, spans = [], []
        for key, ctx, cont in requests:
            if not ctx or not cont:
                raise QMambaError("a loglikelihood request needs a non-empty context and continuation")
            if len(cont) > L:
                raise QMambaError(f"a continuation of {len(cont)} tokens is longer than max_length {L}")
            # like HFLM: the last max_length+1 tokens, minus the last one (nothing predicts after it)
            inp = (ctx + cont)[-(L + 1):][:-1]
            inputs.append(inp)
            spans.append((len(inp) - len(cont), len(inp)))   # positions whose logits score `cont`

        order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), inputs[i]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        device = self.device
        pbar = self._progress(len(requests), "loglikelihood", disable_tqdm)
        with self._inference():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = len(inputs[idx[0]])                       # sorted: the first is the longest
                batch = torch.full((len(idx), width), self._pad_id, dtype=torch.long)
                for row, i in enumerate(idx):
                    batch[row, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
                out, is_hidden = self._hidden_or_logits(batch.to(device))
                # gather the real continuation positions of every row, score them in one go
                picked = torch.cat([out[row, spans[i][0]:spans[i][1]] for row, i in enumerate(idx)])
                logp = F.log_softmax(self._head(picked, is_hidden), dim=-1, dtype=torch.float32)
                target = torch.tensor([t for i in idx for t in requests[i][2]], device=logp.device)
                tok_logp = logp.gather(1, target[:, None]).squeeze(1)
                hit = logp.argmax(dim=-1) == target
                offset = 0
                for i in idx:
                    n = len(requests[i][2])
                    answer = (float(tok_logp[offset:offset + n].sum()), bool(hit[offset:offset + n].all()))
                    offset += n
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(len(idx))
        pbar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full-document log-likelihood, in HFLM's windows: the first window predicts the first
        token from eos, each window scores at most max_length new tokens (disjoint windows,
        `lm_eval.utils.get_rolling_token_windows(..., context_len=1)`)."""
        from lm_eval import utils as lm_utils

        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding through the recurrent cache: the prompts of a batch are prefilled in
        parallel up to the shortest one, then stepped one token at a time (a row still inside its
        prompt is fed its own next prompt token); a row stops at eos, at max_gen_toks, or as soon
        as its text contains one of the `until` strings, and the text is cut before it."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        args = [req.args for req in requests]
        results: list[Optional[str]] = [None] * len(args)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            if not isinstance(gen_kwargs, dict):
                raise QMambaError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
            groups.setdefault(repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0])), []).append(i)

        pbar = self._progress(len(args), "generate_until", disable_tqdm)
        with self._inference():
            for members in groups.values():
                kwargs = dict(normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                if kwargs.get("do_sample"):
                    warnings.warn("QMambaLM.generate_until decodes greedily; do_sample is ignored",
                                  stacklevel=2)
                max_ctx = max(self.max_length - max_gen, 1)
                prompts = {i: (self.tok_encode(args[i][0], left_truncate_len=max_ctx)
                               or [self.prefix_token_id]) for i in members}
                order = sorted(members, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    texts = self._greedy([prompts[i] for i in idx], until, max_gen)
                    for i, text in zip(idx, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
                    pbar.update(len(idx))
        pbar.close()
        return results  # type: ignore[return-value]

    def _greedy(self, prompts: list[list[int]], until: list[str], max_gen: int) -> list[str]:
        b = len(prompts)
        if max_gen <= 0:
            return [""] * b
        device = self.device
        lens = [len(p) for p in prompts]
        first = min(lens)
        cache = self.model.allocate_cache(b)
        ids = torch.tensor([p[:first] for p in prompts], dtype=torch.long, device=device)
        out, is_hidden = self._hidden_or_logits(ids, cache)
        last = self._head(out[:, -1], is_hidden)                  # predicts position `first`
        stops = [s for s in until if s]
        gen: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        t = first                                                 # tokens consumed by every row
        while True:
            feed = []
            for r in range(b):
                if t < lens[r]:                                   # still reading its prompt
                    feed.append(prompts[r][t])
                    continue
                if not done[r]:
                    tok = int(last[r].argmax())
                    if tok == self.eot_token_id:
                        done[r] = True
                    else:
                        gen[r].append(tok)
                        text = self.tok_decode(gen[r])
                        done[r] = len(gen[r]) >= max_gen or any(s in text for s in stops)
                feed.append(gen[r][-1] if gen[r] else self.eot_token_id)
            if all(done):
                break
            last = self.model.step(torch.tensor(feed, dtype=torch.long, device=device), cache).float()
            t += 1
        texts = []
        for g in gen:
            text = self.tok_decode(g)
            for s in stops:
                text = text.split(s)[0]
            texts.append(text)
        return texts
