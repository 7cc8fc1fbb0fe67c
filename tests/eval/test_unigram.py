"""qmamba.eval.unigram: the unigram perplexity and chance accuracies, and the unigram LM scored
on the proxy tasks."""

import math

import numpy as np
import pytest
import torch

from qmamba.errors import QMambaError
from qmamba.eval.unigram import chance_accuracy, proxy_task_baselines, unigram_logprobs, unigram_perplexity


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
