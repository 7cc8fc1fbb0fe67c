"""The trivial baselines of the README table: an add-alpha unigram LM and chance accuracy.

* `unigram_perplexity(train_ids, test_ids, vocab_size, alpha)`: token-level perplexity of an
  add-alpha smoothed unigram model fit on the training token ids. Any LM that learned
  something beats it; comparable with `qmamba.eval.perplexity` on the same tokenization.
* `chance_accuracy(task)`: what guessing scores on a proxy task. nextsent_proxy: 0.25 (4
  endings, acc and acc_norm alike). cloze_proxy: 0.0 (the answer is an open-vocabulary word,
  there is no finite set to guess from).
* `proxy_task_baselines(train_ids, vocab_size, tokenizer)`: the unigram LM scored on the proxy
  tasks exactly the way lm-eval scores any LM (same templates and the same HFLM tokenization
  as `qmamba.eval.lm_eval_adapter`), so its numbers sit in the same table as a model's:
  - cloze_proxy `acc`: lm-eval's LAMBADA accuracy is "greedy decoding reproduces every target
    token"; a unigram model's greedy choice is its most frequent token at every position, so
    an item counts only if every target token is that token. It is (honestly) ~0; `perplexity`
    is lm-eval's: exp(-mean over items of the target's summed log-probability).
  - nextsent_proxy `acc` / `acc_norm`: pick the ending with the highest unigram log-probability
    (raw / divided by its length in characters), as lm-eval's multiple_choice does. This
    context-free score shows how far length and word-frequency cues alone get on the proxy,
    which can differ from the 0.25 of chance; report both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import QMambaError
from ..utils.paths import TASKS_DIR
from ..utils.tokenizer import load_tokenizer

__all__ = ["CHANCE", "chance_accuracy", "unigram_logprobs", "unigram_perplexity", "proxy_task_baselines"]

CHANCE = {"cloze_proxy": 0.0, "nextsent_proxy": 0.25}


def chance_accuracy(task: str) -> float:
    """Accuracy of guessing on a proxy task (nextsent_proxy 0.25, cloze_proxy 0.0)."""
    if task not in CHANCE:
        raise QMambaError(f"no chance accuracy for {task!r}; known: {', '.join(CHANCE)}")
    return CHANCE[task]


def _ids(ids, name: str, vocab_size: int) -> np.ndarray:
    if hasattr(ids, "detach"):                      # a torch tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise QMambaError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise QMambaError(f"{name} holds ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    return arr


def unigram_logprobs(train_ids, vocab_size: int, alpha: float = 1.0) -> np.ndarray:
    """log p(token) (float64, shape (vocab_size,)) of the add-alpha unigram model:
    p(t) = (count(t) + alpha) / (N + alpha * vocab_size)."""
    vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise QMambaError(f"vocab_size must be >= 1, got {vocab_size}")
    if not alpha >= 0:
        raise QMambaError(f"alpha must be >= 0, got {alpha}")
    train = _ids(train_ids, "train_ids", vocab_size)
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + float(alpha)
    total = counts.sum()
    if total <= 0:
        raise QMambaError("no training tokens and alpha = 0: the unigram model is undefined")
    with np.errstate(divide="ignore"):
        return np.log(counts) - math.log(total)


def unigram_perplexity(train_ids, test_ids, vocab_size: int, alpha: float = 1.0) -> float:
    """exp(mean NLL) of the test ids under the add-alpha unigram model fit on the train ids
    (inf when alpha = 0 and a test token never occurs in training)."""
    logp = unigram_logprobs(train_ids, vocab_size, alpha)
    test = _ids(test_ids, "test_ids", int(vocab_size))
    if not test.size:
        raise QMambaError("test_ids is empty")
    mean_logp = float(logp[test].mean())
    return math.inf if mean_logp == -math.inf else math.exp(-mean_logp)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's (TemplateLM / HFLM) split: trailing context spaces move to the continuation, the
    whole string is encoded and cut at the context's length (what qmamba.eval.lm_eval_adapter does)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def _read_jsonl(path: Path, limit: Optional[int]) -> list[dict]:
    if not path.is_file():
        raise QMambaError(f"task data {path} is missing (rebuild it with scripts/build_proxy_tasks.py)")
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return docs[:limit] if limit is not None else docs


def proxy_task_baselines(train_ids, vocab_size: int, tokenizer=None, alpha: float = 1.0,
                         limit: Optional[int] = None, tasks_dir=None) -> dict:
    """The unigram LM (fit on `train_ids`) scored on both proxy tasks like lm-eval would score
    it, next to chance. Returns
    {"cloze_proxy": {"chance", "acc", "perplexity", "n"},
     "nextsent_proxy": {"chance", "acc", "acc_norm", "n"}}; `limit` takes the first items."""
    if tokenizer is None:
        tokenizer = load_tokenizer()
    logp = unigram_logprobs(train_ids, vocab_size, alpha)
    top = int(np.argmax(logp))
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else TASKS_DIR

    def score(tokens: list[int]) -> float:
        return float(logp[np.asarray(tokens, dtype=np.int64)].sum()) if tokens else 0.0

    cloze = _read_jsonl(tasks_dir / "cloze_proxy.jsonl", limit)
    hits, lls = [], []
    for doc in cloze:
        words = doc["text"].split(" ")                 # lambada_openai's templates
        _, target = _encode_pair(tokenizer, " ".join(words[:-1]), " " + words[-1])
        hits.append(all(t == top for t in target))
        lls.append(score(target))
    mean_ll = float(np.mean(lls)) if lls else float("nan")
    out = {"cloze_proxy": {
        "chance": CHANCE["cloze_proxy"],
        "acc": float(np.mean(hits)) if hits else float("nan"),
        "perplexity": math.inf if mean_ll == -math.inf else math.exp(-mean_ll),
        "n": len(cloze)}}

    nextsent = _read_jsonl(tasks_dir / "nextsent_proxy.jsonl", limit)
    acc, acc_norm = [], []
    for doc in nextsent:
        ll = np.array([score(_encode_pair(tokenizer, doc["ctx"], " " + e)[1]) for e in doc["endings"]])
        length = np.array([float(len(e)) for e in doc["endings"]])
        acc.append(int(np.argmax(ll)) == int(doc["label"]))
        acc_norm.append(int(np.argmax(ll / length)) == int(doc["label"]))
    out["nextsent_proxy"] = {
        "chance": CHANCE["nextsent_proxy"],
        "acc": float(np.mean(acc)) if acc else float("nan"),
        "acc_norm": float(np.mean(acc_norm)) if acc_norm else float("nan"),
        "n": len(nextsent)}
    return out
