"""Shared by the lm-eval tests (test_lm_eval_adapter.py, test_tasks.py, test_unigram.py): the
project tokenizer, a tiny random Mamba2, an offline hub and one thread."""

from __future__ import annotations

import pytest
import torch

from qmamba.models import MambaLM, ModelConfig, init_weights
from qmamba.utils.tokenizer import load_tokenizer


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    """The project tokenizer."""
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    """A tiny random Mamba2 (2 layers, d_model 64) over the project tokenizer's vocabulary."""
    cfg = ModelConfig(arch="mamba2", vocab_size=8192, d_model=64, n_layer=2, d_state=16,
                      headdim=16, chunk_size=16)
    return init_weights(MambaLM(cfg), seed=0).eval()
