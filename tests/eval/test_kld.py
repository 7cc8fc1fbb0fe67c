"""KL divergence, top-1 agreement and their intervals (qmamba.eval.kld) against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qmamba.eval import kld as K
from qmamba.eval.perplexity import perplexity

V = 50


class Toy(nn.Module):
    """A causal 'model' whose next-token logits depend on the current token (a bigram table)."""

    def __init__(self, seed: int, scale: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(scale * torch.randn(V, V, generator=g))

    def forward(self, ids):
        return self.table[ids]


def noisy(model: Toy, eps: float, seed: int = 1) -> Toy:
    g = torch.Generator().manual_seed(seed)
    m = Toy(0)
    with torch.no_grad():
        m.table.copy_(model.table + eps * torch.randn(V, V, generator=g))
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(V, (16 * 33,), generator=torch.Generator().manual_seed(3))


def test_identical_model_has_zero_distance(ids):
    fp = Toy(0)
    ref = K.fp_reference(fp, ids, seqlen=33)
    res = K.evaluate_against(fp, ref)
    assert res["kld"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["top1_agreement"]["value"] == 1.0
    assert res["ppl_ratio"]["value"] == pytest.approx(1.0, rel=1e-12)
    assert res["rms_delta_p"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert res["reference"] == "full" and res["windows"] == 16 and res["tokens"] == 16 * 32


def test_kld_and_agreement_match_direct_formulas(ids):
    fp, q = Toy(0), noisy(Toy(0), 0.5)
    ref = K.fp_reference(fp, ids, seqlen=33, batch_size=5)
    vals = K.per_token(q, ref, batch_size=3)
    wins = ids.reshape(16, 33)
    logp = torch.log_softmax(fp(wins)[:, :-1].double(), -1)
    logq = torch.log_softmax(q(wins)[:, :-1].double(), -1)
    direct = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)    # KL(P || Q)
    torch.testing.assert_close(vals["kld"], direct, rtol=1e-4, atol=1e-6 * direct.abs().max().item())
    assert torch.equal(vals["same_top1"], logp.argmax(-1) == logq.argmax(-1))
    res = K.summarize(vals)
    assert res["kld"]["mean"] == pytest.approx(direct.mean().item(), rel=1e-4)
    assert res["kld"]["median"] == pytest.approx(direct.flatten().median().item(), rel=1e-4)
    tgt = wins[:, 1:, None]
    dp = logq.gather(-1, tgt).exp() - logp.gather(-1, tgt).exp()
    assert res["rms_delta_p"]["value"] == pytest.approx(dp.pow(2).mean().sqrt().item(), rel=1e-5)
    # the perplexity and its ratio agree with qmamba's perplexity() of each model
    ppl_q = perplexity(q, ids, seqlen=33, progress=False)["perplexity"]
    ppl_fp = perplexity(fp, ids, seqlen=33, progress=False)["perplexity"]
    assert res["perplexity"]["value"] == pytest.approx(ppl_q, rel=1e-9)
    assert res["ppl_ratio"]["value"] == pytest.approx(ppl_q / ppl_fp, rel=1e-9)


def test_topk_reference_is_exact_with_all_tokens_and_a_close_lower_bound_with_few(ids):
    fp, q = Toy(0, scale=4.0), noisy(Toy(0, scale=4.0), 0.3)
    full = K.evaluate_against(q, K.fp_reference(fp, ids, seqlen=33))
    every = K.evaluate_against(q, K.fp_reference(fp, ids, seqlen=33, budget_bytes=0, topk=V))
    few = K.evaluate_against(q, K.fp_reference(fp, ids, seqlen=33, budget_bytes=0, topk=8))
    assert every["reference"] == f"top{V}" and few["reference"] == "top8"
    assert every["kld"]["mean"] == pytest.approx(full["kld"]["mean"], rel=1e-4)
    assert few["kld"]["mean"] <= full["kld"]["mean"] * (1 + 1e-6)           # log-sum inequality
    assert few["kld"]["mean"] >= 0.5 * full["kld"]["mean"]
    assert few["top1_agreement"] == full["top1_agreement"]


def test_intervals_cover_the_estimate_and_narrow_with_more_windows():
    fp, q = Toy(0), noisy(Toy(0), 0.5)
    g = torch.Generator().manual_seed(4)
    small = K.evaluate_against(q, K.fp_reference(fp, torch.randint(V, (8 * 33,), generator=g), 33))
    large = K.evaluate_against(q, K.fp_reference(fp, torch.randint(V, (128 * 33,), generator=g), 33))
    for res in (small, large):
        lo, hi = res["kld"]["ci95"]
        assert lo < res["kld"]["mean"] < hi
        lo, hi = res["top1_agreement"]["ci95"]
        assert lo <= res["top1_agreement"]["value"] <= hi
    width = lambda r: r["kld"]["ci95"][1] - r["kld"]["ci95"][0]     # noqa: E731
    assert width(large) < 0.6 * width(small)       # ~ 1/sqrt(16) of it in expectation


def test_paired_interval_separates_a_worse_model_and_not_itself(ids):
    fp = Toy(0)
    ref = K.fp_reference(fp, ids, seqlen=33)
    a = K.evaluate_against(noisy(fp, 0.2, seed=1), ref)
    b = K.evaluate_against(noisy(fp, 0.8, seed=2), ref)
    assert K.paired_interval(a, a) == [0.0, 0.0] and not K.significant(K.paired_interval(a, a))
    diff = K.paired_interval(b, a)
    assert K.significant(diff) and diff[0] > 0
    with pytest.raises(Exception, match="same windows"):
        short = K.evaluate_against(fp, K.fp_reference(fp, ids[: 8 * 33], seqlen=33))
        K.paired_interval(a, short)


def test_accuracy_stderr():
    assert K.accuracy_stderr(0.25, 100) == pytest.approx(math.sqrt(0.25 * 0.75 / 100))
    assert math.isnan(K.accuracy_stderr(0.5, 0))
