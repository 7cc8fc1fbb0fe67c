"""qmamba.eval.harness (lm-eval model + run_tasks) and qmamba.eval.unigram, on a tiny random
Mamba2, offline (HF_HUB_OFFLINE=1): every number is checked against a direct computation from
`model(ids)`."""

import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qmamba.errors import QMambaError  # noqa: E402
from qmamba.eval import harness  # noqa: E402
from qmamba.eval.harness import PROXY_TASKS, QMambaLM, load_tokenizer, run_tasks  # noqa: E402
from qmamba.eval.unigram import (  # noqa: E402
    chance_accuracy, proxy_task_baselines, unigram_logprobs, unigram_perplexity)
from qmamba.models import MambaLM, ModelConfig, init_weights  # noqa: E402

# per summed log-probability: the harness scores batched, padded windows and this file one
# sequence at a time, so each float32 log-softmax term differs by up to ~1e-6 between kernels
# (CPU-dependent); a sum of n terms gets n times the per-term tolerance, never one fixed figure
TOL = 1e-5


def approx_sum(expected: float, terms: int):
    """`expected`, a sum of `terms` log-probabilities, to TOL per term."""
    assert terms >= 1
    return pytest.approx(expected, rel=0, abs=TOL * terms)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(arch="mamba2", vocab_size=8192, d_model=64, n_layer=2, d_state=16,
                      headdim=16, chunk_size=16)
    return init_weights(MambaLM(cfg), seed=0).eval()


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _split(tok, context, continuation):
    """lm-eval's HFLM tokenization, written out independently of the harness."""
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        return [tok.eos_token_id], cont
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok.encode(stripped + continuation, add_special_tokens=False)
    ctx = tok.encode(stripped, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def _logp(model, ids):
    """(l,) ids -> (l, vocab) float32 log-probabilities of the next token at every position."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def _direct(model, ctx, cont):
    ids = ctx + cont
    logp = _logp(model, ids[:-1])
    rows = logp[len(ctx) - 1:]
    ll = sum(float(rows[j, t]) for j, t in enumerate(cont))              # summed in float64
    greedy = all(int(rows[j].argmax()) == t for j, t in enumerate(cont))
    return ll, greedy


PAIRS = [
    ("Captain Wentworth had no fortune.", " He had been lucky in his profession"),
    ("Anne", " Elliot"),
    ("", " Persuasion"),                                  # empty context: eos is the prefix
    ("She was a woman of ", "sense"),                     # trailing space moves to continuation
    ("It was a truth universally acknowledged, that a single man", " in possession of a good fortune, must be in want of a wife."),
    ("Lady Russell", ","),
]


def test_loglikelihood_matches_direct_computation(model, tok):
    lm = QMambaLM(model, tok, batch_size=4)
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in PAIRS])
    for (c, x), (ll, greedy) in zip(PAIRS, got):
        ctx, cont = _split(tok, c, x)
        exp_ll, exp_greedy = _direct(model, ctx, cont)
        assert ll == approx_sum(exp_ll, len(cont)), (c, x)
        assert greedy == exp_greedy
        assert isinstance(ll, float) and isinstance(greedy, bool)


def test_is_greedy_on_a_constructed_case(model, tok):
    lm = QMambaLM(model, tok)
    found = False
    # greedy-decode two tokens after a context; keep a case whose text re-tokenizes to them
    for context in ["The", "Anne", "Mr. Elliot", "She said", "It was", "Bath", "Kellynch Hall", "Yes"]:
        ctx = tok.encode(context, add_special_tokens=False)
        ids = list(ctx)
        for _ in range(2):
            ids.append(int(_logp(model, ids)[-1].argmax()))
        cont_text = tok.decode(ids[len(ctx):])
        if _split(tok, context, cont_text) != (ctx, ids[len(ctx):]) or not cont_text.strip():
            continue
        found = True
        (ll, greedy), = lm.loglikelihood([_req("loglikelihood", context, cont_text)])
        assert greedy is True
        # the same first token followed by the least likely second token is not greedy
        worst = int(_logp(model, ids[:-1])[-1].argmin())
        bad_text = tok.decode(ids[len(ctx):-1] + [worst])
        if _split(tok, context, bad_text) == (ctx, ids[len(ctx):-1] + [worst]):
            (bad_ll, bad_greedy), = lm.loglikelihood([_req("loglikelihood", context, bad_text)])
            assert bad_greedy is False and bad_ll < ll
        break
    assert found, "no context whose greedy continuation round-trips through the tokenizer"


def test_batching_gives_the_same_numbers(model, tok):
    reqs = [_req("loglikelihood", c, x) for c, x in PAIRS * 2]
    one = QMambaLM(model, tok, batch_size=1).loglikelihood(reqs)
    many = QMambaLM(model, tok, batch_size=5).loglikelihood(reqs)
    for (c, x), (a, ga), (b, gb) in zip(PAIRS * 2, one, many):
        assert a == approx_sum(b, len(_split(tok, c, x)[1])) and ga == gb


TEXT = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
        "amusement, never took up any book but the Baronetage; there he found occupation for an "
        "idle hour, and consolation in a distressed one.")


def test_rolling_short_text_is_the_full_text_nll(model, tok):
    toks = tok.encode(TEXT, add_special_tokens=False)
    lm = QMambaLM(model, tok, max_length=2048)
    assert len(toks) < lm.max_length
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])
    ids = [tok.eos_token_id] + toks
    logp = _logp(model, ids[:-1])
    expected = sum(float(logp[j, t]) for j, t in enumerate(toks))
    assert got == approx_sum(expected, len(toks))


def test_rolling_long_text_uses_windows(model, tok):
    toks = tok.encode(TEXT, add_special_tokens=False)
    L = 16
    assert len(toks) > 2 * L and len(toks) % L                 # several windows, a partial last one
    lm = QMambaLM(model, tok, max_length=L, batch_size=3)
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])
    # windows of L predicted tokens [a, b); each is scored from the (at most L) tokens before b
    # of eos + text: the first from eos, the next ones from one token of context, the last one
    # (partial) from a full window, as lm-eval's HFLM does
    full = [tok.eos_token_id] + toks
    expected = 0.0
    for a in range(0, len(toks), L):
        b = min(a + L, len(toks))
        window = full[max(0, b - L):b]
        logp = _logp(model, window)
        expected += sum(float(logp[len(window) - (b - a) + j, toks[a + j]]) for j in range(b - a))
    assert got == approx_sum(expected, len(toks))
    # and it is not the full-text NLL (the windows cut the context)
    (full_nll,) = QMambaLM(model, tok).loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])
    assert abs(full_nll - got) > 100 * TOL * len(toks)


def _greedy_tokens(model, tok, prompt, n):
    ids = tok.encode(prompt, add_special_tokens=False)
    out = []
    for _ in range(n):
        t = int(_logp(model, ids + out)[-1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return out


def test_generate_until_is_greedy_and_stops(model, tok):
    prompt, n = "Anne Elliot was", 12
    gen = _greedy_tokens(model, tok, prompt, n)
    text = tok.decode(gen, skip_special_tokens=True)
    lm = QMambaLM(model, tok, batch_size=2)
    (free,) = lm.generate_until([_req("generate_until", prompt, {"until": [], "max_gen_toks": n})])
    assert free == text
    # stop on a string that the greedy text reaches after a few tokens
    k = next(k for k in range(4, len(gen)) if tok.decode(gen[k:k + 2]).strip())
    stop = tok.decode(gen[k:k + 2])
    calls = []
    step = model.step
    try:
        model.step = lambda *a, **kw: (calls.append(1), step(*a, **kw))[1]
        (cut,) = lm.generate_until([_req("generate_until", prompt, {"until": [stop], "max_gen_toks": n})])
    finally:
        del model.step
    assert cut == text.split(stop)[0]
    assert len(calls) <= k + 2 < n                                # it stopped early


def test_generate_until_batches_prompts_of_different_lengths(model, tok):
    prompts = ["Anne", "Captain Wentworth said that", "It was", "Lady Russell had been"]
    reqs = [_req("generate_until", p, {"until": ["\n\n"], "max_gen_toks": 6}) for p in prompts]
    batched = QMambaLM(model, tok, batch_size=4).generate_until(reqs)
    for p, got in zip(prompts, batched):
        expected = tok.decode(_greedy_tokens(model, tok, p, 6), skip_special_tokens=True).split("\n\n")[0]
        assert got == expected


def _tree(path: Path):
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else None


def test_run_tasks_offline_through_lm_eval(model, tok, monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    import lm_eval.evaluator  # noqa: F401  (first imports may set variables of their own)
    import lm_eval.tasks  # noqa: F401

    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    for name in ("threadpoolctl", "sklearn"):     # lm-eval's metrics import them, and their import
        try:                                       # sets KMP_DUPLICATE_LIB_OK: not ours to restore
            importlib.import_module(name)
        except ImportError:
            pass
    home = Path(datasets.config.HF_CACHE_HOME)                 # where a run would otherwise write
    before = _tree(home)
    env = dict(os.environ)
    consts = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_MODULES_CACHE,
              huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE)

    res = run_tasks(model, tok, ["cloze_proxy", "nextsent_proxy"], limit=8, batch_size=8)

    assert set(res) == {"cloze_proxy", "nextsent_proxy"}
    assert set(res["cloze_proxy"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr", "n"}
    assert set(res["nextsent_proxy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    for task, metrics in res.items():
        assert metrics["n"] == 8
        for key in ("acc", "acc_norm"):
            if key in metrics:
                assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
    assert res["cloze_proxy"]["perplexity"] > 1.0
    # lm-eval's metrics agree with scoring the same items through the model directly
    lm = QMambaLM(model, tok)
    docs = [json.loads(line) for line in (harness.TASKS_DIR / "cloze_proxy.jsonl").read_text().splitlines()[:8]]
    pairs = [(d["text"].rsplit(" ", 1)[0], " " + d["text"].rsplit(" ", 1)[1]) for d in docs]
    scored = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    # exp(-mean ll): relative error = error of the mean ll, at most TOL per term of the longest
    terms = max(len(_split(tok, c, x)[1]) for c, x in pairs)
    assert res["cloze_proxy"]["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in scored])),
                                                             rel=TOL * terms)
    assert res["cloze_proxy"]["acc"] == pytest.approx(np.mean([g for _, g in scored]))
    docs = [json.loads(line) for line in (harness.TASKS_DIR / "nextsent_proxy.jsonl").read_text().splitlines()[:8]]
    acc = []
    for d in docs:
        lls = [ll for ll, _ in lm.loglikelihood([_req("loglikelihood", d["ctx"], " " + e) for e in d["endings"]])]
        acc.append(int(np.argmax(lls)) == d["label"])
    assert res["nextsent_proxy"]["acc"] == pytest.approx(np.mean(acc))
    # nothing written to the home cache, environment and library constants restored
    assert _tree(home) == before
    assert dict(os.environ) == env
    assert consts == (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_MODULES_CACHE,
                      huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE)


def test_unknown_task_is_a_user_error(model, tok):
    with pytest.raises(QMambaError, match="available.*cloze_proxy"):
        run_tasks(model, tok, ["no_such_task"])


def test_real_task_offline_points_at_the_proxies(model, tok):
    with pytest.raises(QMambaError, match="cloze_proxy") as err:
        run_tasks(model, tok, ["lambada_openai"], limit=2)
    assert "nextsent_proxy" in str(err.value) and "lambada_openai" in str(err.value)


def test_task_yamls_get_absolute_data_paths(tmp_path):
    import yaml

    for path in harness.write_task_yamls(tmp_path):
        cfg = yaml.safe_load(path.read_text())
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file() and cfg["task"] in PROXY_TASKS


def test_unigram_perplexity_and_chance():
    train, test = [0, 1, 1, 2, 2, 2], [2, 1, 3]
    p = (np.array([1, 2, 3, 0]) + 0.5) / (6 + 0.5 * 4)
    expected = math.exp(-np.mean(np.log(p[test])))
    assert unigram_perplexity(train, test, 4, alpha=0.5) == pytest.approx(expected)
    assert unigram_perplexity(torch.tensor(train), np.array(test), 4, alpha=0.5) == pytest.approx(expected)
    assert unigram_perplexity(train, test, 4, alpha=0.0) == math.inf   # token 3 never seen
    assert np.exp(unigram_logprobs(train, 4)).sum() == pytest.approx(1.0)
    with pytest.raises(QMambaError):
        unigram_perplexity(train, [4], 4)
    assert chance_accuracy("nextsent_proxy") == 0.25 and chance_accuracy("cloze_proxy") == 0.0


def test_unigram_proxy_baselines(tok):
    rng = np.random.default_rng(0)
    res = proxy_task_baselines(rng.integers(0, 8192, 5000), 8192, tok, limit=20)
    assert res["cloze_proxy"]["n"] == 20 and res["nextsent_proxy"]["n"] == 20
    assert res["cloze_proxy"]["chance"] == 0.0 and res["nextsent_proxy"]["chance"] == 0.25
    for task, key in [("cloze_proxy", "acc"), ("nextsent_proxy", "acc"), ("nextsent_proxy", "acc_norm")]:
        assert 0.0 <= res[task][key] <= 1.0
    assert res["cloze_proxy"]["perplexity"] > 1.0
