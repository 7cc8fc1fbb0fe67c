"""Zero-shot evaluation of our `MambaLM` (float or quantized) through lm-evaluation-harness.

* `QMambaLM` is an `lm_eval.api.model.LM` (through lm-eval's `TemplateLM`, which gives it
  HFLM's exact context/continuation tokenization) around a `MambaLM` and a tokenizer:
  `loglikelihood`, `loglikelihood_rolling` and greedy `generate_until` through the recurrent
  cache. Requests are batched: sorted by length (longest first), right-padded (safe for a
  causal model: a real position never sees the padding after it), and only the real
  continuation positions go through the LM head and the float32 log-softmax.
* `run_tasks(model, tokenizer, ["cloze_proxy", "nextsent_proxy"], limit=...)` runs tasks through
  real lm-eval and returns `{task: {"acc": ..., "acc_stderr": ..., ...}}`. The two proxies are
  offline tasks built from the held-out test text (`qmamba/assets/tasks/README.md`); the real
  lm-eval tasks in `REAL_TASKS` need the Hugging Face hub.

Environment: a run never touches the user's home cache. If `HF_HOME` is not set, it points at
a temporary folder for the duration of the run (the hub, datasets and modules caches all live
under it unless their own variables are set); proxy-only runs are forced offline
(`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`). Because `datasets` and `huggingface_hub` read
those variables once, at import, the module-level constants derived from them are patched too,
and everything (variables, constants, logging levels, RNG states) is restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from ..errors import QMambaError
from ..models import MambaLM

__all__ = [
    "PROXY_TASKS", "REAL_TASKS", "TASKS_DIR", "TOKENIZER_DIR", "QMambaLM", "load_tokenizer",
    "run_tasks", "write_task_yamls", "hub_reachable",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TASKS_DIR = ASSETS_DIR / "tasks"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

PROXY_TASKS = ("cloze_proxy", "nextsent_proxy")
# the published tasks the README table refers to; they need the hub (datasets download)
REAL_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


def load_tokenizer(path: str | os.PathLike | None = None):
    """The project tokenizer (`qmamba/assets/tokenizer`) or the one saved at `path`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or TOKENIZER_DIR))


# --------------------------------------------------------------------------- the lm-eval model
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
        self.tokenizer = load_tokenizer() if tokenizer is None else (
            load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer)
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


# --------------------------------------------------------------------------- tasks
def write_task_yamls(folder: str | os.PathLike, tasks: Iterable[str] = PROXY_TASKS) -> list[Path]:
    """Write the proxy task YAMLs into `folder` with the absolute path of their data filled in,
    ready for `TaskManager(include_path=folder)` or `lm_eval --include_path folder`.

    lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset` unchanged, which
    resolves a relative path against the current directory, not the YAML's folder, so the
    shipped YAMLs (`qmamba/assets/tasks/*.yaml`) are templates with paths relative to their
    own folder."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tasks:
        if name not in PROXY_TASKS:
            raise QMambaError(f"{name!r} is not a proxy task (proxies: {', '.join(PROXY_TASKS)})")
        cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        files = cfg["dataset_kwargs"]["data_files"]
        for split, rel in list(files.items()):
            path = (TASKS_DIR / rel).resolve()
            if not path.is_file():
                raise QMambaError(f"task data {path} is missing (rebuild it with scripts/build_proxy_tasks.py)")
            files[split] = str(path)
        out = folder / f"{name}.yaml"
        header = (f"# generated by qmamba.eval.harness.write_task_yamls from {TASKS_DIR / (name + '.yaml')}\n"
                  f"# (the same task with its data path made absolute)\n")
        out.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        written.append(out)
    return written


def hub_reachable(timeout: float = 5.0) -> bool:
    """False when the environment says offline, or when the hub endpoint does not answer."""
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(os.environ.get(k, "").upper() in truthy
           for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:                # urllib honours the *_proxy variables
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:      # an answer, even an error status: the hub is there
        return True
    except Exception:   # no answer (DNS, refused, proxy, timeout, bad URL): offline
        return False


def _check_tasks(tasks: Sequence[str]) -> None:
    available = f"proxies (offline): {', '.join(PROXY_TASKS)}; lm-eval tasks (need the Hugging Face hub): {', '.join(REAL_TASKS)}"
    if not tasks:
        raise QMambaError(f"no task given; available: {available}")
    unknown = [t for t in tasks if t not in PROXY_TASKS and t not in REAL_TASKS]
    if unknown:
        raise QMambaError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {available}")
    if len(set(tasks)) != len(tasks):
        raise QMambaError(f"a task is listed twice: {', '.join(tasks)}")
    real = [t for t in tasks if t in REAL_TASKS]
    if real and not hub_reachable():
        raise QMambaError(
            f"{', '.join(real)} need(s) the Hugging Face hub to download the data, which is not "
            f"reachable (or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); offline, use the proxy "
            f"tasks {' and '.join(PROXY_TASKS)} (same form as lambada_openai and hellaswag, built "
            f"from the held-out text; see qmamba/assets/tasks/README.md)")


def _hf_constants(env: dict) -> dict[tuple[str, str], Any]:
    """The import-time constants of `datasets.config` and `huggingface_hub.constants` that the
    offline flags and cache folders set, recomputed from `env` the way those modules do."""
    truthy = {"1", "ON", "YES", "TRUE"}
    xdg = env.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = os.path.expanduser(env.get("HF_HOME", os.path.join(xdg, "huggingface")))
    hub_offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in truthy
    ds_offline = env.get("HF_DATASETS_OFFLINE")
    ds_offline = hub_offline if ds_offline is None else ds_offline.upper() in truthy
    ds_cache = Path(env.get("HF_DATASETS_CACHE", os.path.join(home, "datasets")))
    downloads = Path(env.get("HF_DATASETS_DOWNLOADED_DATASETS_PATH", os.path.join(ds_cache, "downloads")))
    hub_cache = os.path.expanduser(env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))))
    assets = os.path.expanduser(env.get("HF_ASSETS_CACHE", env.get("HUGGINGFACE_ASSETS_CACHE", os.path.join(home, "assets"))))
    return {
        ("datasets.config", "HF_HUB_OFFLINE"): ds_offline,
        ("datasets.config", "HF_DATASETS_OFFLINE"): ds_offline,
        ("datasets.config", "HF_CACHE_HOME"): home,
        ("datasets.config", "HF_DATASETS_CACHE"): ds_cache,
        ("datasets.config", "HF_MODULES_CACHE"): Path(env.get("HF_MODULES_CACHE", os.path.join(home, "modules"))),
        ("datasets.config", "DOWNLOADED_DATASETS_PATH"): downloads,
        ("datasets.config", "EXTRACTED_DATASETS_PATH"): Path(env.get("HF_DATASETS_EXTRACTED_DATASETS_PATH", os.path.join(downloads, "extracted"))),
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"): hub_offline,
        ("huggingface_hub.constants", "HF_HOME"): home,
        ("huggingface_hub.constants", "hf_cache_home"): home,
        ("huggingface_hub.constants", "HUGGINGFACE_HUB_CACHE"): env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")),
        ("huggingface_hub.constants", "HF_HUB_CACHE"): hub_cache,
        ("huggingface_hub.constants", "HUGGINGFACE_ASSETS_CACHE"): env.get("HUGGINGFACE_ASSETS_CACHE", os.path.join(home, "assets")),
        ("huggingface_hub.constants", "HF_ASSETS_CACHE"): assets,
        ("huggingface_hub.constants", "HF_XET_CACHE"): env.get("HF_XET_CACHE", os.path.join(home, "xet")),
    }


@contextlib.contextmanager
def _eval_environment(offline: bool, scratch: Path, quiet: bool = True):
    """Offline flags, a temporary HF_HOME when the user has none, no bootstrap process pool,
    quiet lm-eval logging; all restored on exit."""
    import importlib

    import datasets
    import huggingface_hub.constants  # noqa: F401  (both read the environment at import)

    changes = {"DISABLE_MULTIPROC": "1"}    # lm-eval's bootstrap stderr: no process pool
    if offline:
        changes.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if not os.environ.get("HF_HOME"):
        changes["HF_HOME"] = str(scratch / "hf_home")
    saved_env = {k: os.environ.get(k) for k in changes}
    import lm_eval.api.task as lm_task                 # its per-document "building requests" bar
    saved_task_tqdm = lm_task.tqdm
    saved_consts = {}
    loggers = {name: logging.getLogger(name) for name in ("lm_eval", "datasets")}
    saved_levels = {name: lg.level for name, lg in loggers.items()}
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    try:
        os.environ.update(changes)
        for (mod_name, attr), value in _hf_constants(dict(os.environ)).items():
            mod = importlib.import_module(mod_name)
            if hasattr(mod, attr):
                saved_consts[(mod, attr)] = getattr(mod, attr)
                setattr(mod, attr, value)
        if quiet:
            for lg in loggers.values():
                lg.setLevel(logging.WARNING)
            datasets.utils.disable_progress_bars()
            lm_task.tqdm = functools.partial(saved_task_tqdm, disable=True)
        yield
    finally:
        lm_task.tqdm = saved_task_tqdm
        for (mod, attr), value in saved_consts.items():
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, lg in loggers.items():
            lg.setLevel(saved_levels[name])
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch like lm-eval's simple_evaluate; restore their states after."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _flatten(metrics: dict) -> dict:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, ...};
    a stderr lm-eval could not compute ("N/A") becomes None."""
    out = {}
    for key, value in metrics.items():
        if "," not in key:
            continue                                           # "alias", "name", ...
        name, _, filt = key.partition(",")
        if filt != "none":
            name = f"{name},{filt}"
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            out[name] = None
    return out


def run_tasks(model, tokenizer=None, tasks: Sequence[str] | str = PROXY_TASKS,
              limit: int | None = None, batch_size: int = 16, seed: int = 1234,
              bootstrap_iters: int = 1000, max_length: int = 2048, quiet: bool = True) -> dict:
    """Evaluate `model` (a `MambaLM`, or a ready `QMambaLM`) zero-shot on `tasks` with lm-eval.

    Returns {task: {"acc": ..., "acc_stderr": ..., ...}} with lm-eval's metric names
    ("perplexity" and "acc" for cloze/lambada, "acc" and "acc_norm" for multiple choice),
    plus "n", the number of items scored. `limit` takes the first `limit` items of each task.
    `bootstrap_iters` sizes the bootstrap of the perplexity stderr (lm-eval's default, 100000,
    takes minutes); the accuracy stderr is closed-form. Raises QMambaError for an unknown task,
    or for a published task when the hub is not reachable (use the proxies offline)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    _check_tasks(tasks)
    if limit is not None and int(limit) < 1:
        raise QMambaError(f"limit must be >= 1, got {limit}")
    lm = model if isinstance(model, QMambaLM) else QMambaLM(
        model, tokenizer, batch_size=batch_size, max_length=max_length)
    real = any(t in REAL_TASKS for t in tasks)

    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="qmamba-eval-") as tmp:
        scratch = Path(tmp)
        include = scratch / "tasks"
        write_task_yamls(include, [t for t in tasks if t in PROXY_TASKS])
        with _eval_environment(offline=not real, scratch=scratch, quiet=quiet), _seeded(seed):
            # lm-eval's own task index takes ~20 s to build; proxies alone do not need it
            manager = TaskManager(include_path=str(include), include_defaults=real)
            loaded = manager.load(tasks)
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=seed)
            # evaluate() rather than simple_evaluate(): the latter only adds seeding (done above)
            # and an environment report (`pip list`, git) that costs several seconds per call
            results = lm_eval.evaluator.evaluate(
                lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                log_samples=False)
    out = {}
    for task in tasks:
        metrics = _flatten(results["results"][task])
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            metrics["n"] = int(n)
        out[task] = metrics
    return out
