"""qmamba.eval.lm_eval_adapter (QMambaLM) on a tiny random Mamba2, offline: every number is
checked against a direct computation from `model(ids)`."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qmamba.eval.lm_eval_adapter import QMambaLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub", "one_thread")

# per summed log-probability: the adapter scores batched, padded windows and this file one
# sequence at a time, so each float32 log-softmax term differs by up to ~1e-6 between kernels
# (CPU-dependent); a sum of n terms gets n times the per-term tolerance, never one fixed figure
TOL = 1e-5


def approx_sum(expected: float, terms: int):
    """`expected`, a sum of `terms` log-probabilities, to TOL per term."""
    assert terms >= 1
    return pytest.approx(expected, rel=0, abs=TOL * terms)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _split(tok, context, continuation):
    """lm-eval's HFLM tokenization, written out independently of the adapter."""
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
