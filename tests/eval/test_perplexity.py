"""Perplexity: the same figure as transformers' model on the same windows, the windowing
protocol (non-overlapping, last partial window dropped, max_tokens), and the text file rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import qmamba
from qmamba.errors import QMambaError
from qmamba.eval import perplexity, tokenize_text_file, windows
from qmamba.utils import paths

TEST_TEXT = paths.TEST_TEXT


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """The first ~12 kB of the shipped test text (a few thousand tokens)."""
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEST_TEXT.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    return path


class Uniform(nn.Module):
    """A 'model' whose logits are all zero: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.weight


@torch.no_grad()
def transformers_nll(hf, wins: torch.Tensor) -> float:
    """Mean next-token NLL of a transformers model over windows (w, seqlen), computed with its
    own loss (labels=ids: mean over the seqlen-1 shifted positions of each window)."""
    losses = [hf(input_ids=w[None], labels=w[None]).loss.double() for w in wins]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("which", ["tiny_mamba2", "tiny_mamba1"])
def test_matches_transformers(which, text_file, request):
    hf, folder = request.getfixturevalue(which)
    loaded = qmamba.load(folder)
    ids = tokenize_text_file(text_file, loaded.tokenizer)
    ours = perplexity(loaded.model, ids, seqlen=128, max_tokens=1100, progress=False)
    ref_nll = transformers_nll(hf, windows(ids, 128, 1100))
    ref_ppl = math.exp(ref_nll)
    rel = abs(ours["perplexity"] - ref_ppl) / ref_ppl
    print(f"{which}: perplexity ours {ours['perplexity']:.6f} transformers {ref_ppl:.6f} rel {rel:.2e}")
    assert rel < 1e-3
    assert ours["windows"] == 8 and ours["tokens"] == 8 * 127 and ours["seqlen"] == 128
    assert ours["text_tokens"] == ids.numel()
    assert ours["nll"] == pytest.approx(ref_nll, rel=1e-4)


def test_uniform_model_has_vocab_perplexity():
    result = perplexity(Uniform(50), torch.randint(0, 50, (1000,)), seqlen=64, progress=False)
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-6)      # float32 log-softmax
    assert result["nll"] == pytest.approx(math.log(50), rel=1e-6)


def test_windows_drop_last_and_max_tokens():
    ids = torch.arange(103)
    w = windows(ids, 10)
    assert w.shape == (10, 10) and torch.equal(w[1], torch.arange(10, 20))    # 3 tokens dropped
    assert windows(ids, 10, max_tokens=39).shape == (3, 10)
    assert windows(ids[None], 51).shape == (2, 51)                             # (1, n) accepted
    assert windows(ids, 103).shape == (1, 103)


def test_counts_and_batching(tiny_mamba2, text_file):
    loaded = qmamba.load(tiny_mamba2[1])
    ids = tokenize_text_file(text_file, loaded.tokenizer)
    one = perplexity(loaded.model, ids, seqlen=32, max_tokens=330, batch_size=1, progress=False)
    three = perplexity(loaded.model, ids, seqlen=32, max_tokens=330, batch_size=3, progress=False)
    assert one["windows"] == three["windows"] == 10 and one["tokens"] == 10 * 31
    assert three["nll"] == pytest.approx(one["nll"], rel=1e-6)
    # each window is independent: perplexity of the first 10 windows only ignores the rest
    longer = perplexity(loaded.model, ids, seqlen=32, max_tokens=352, progress=False)
    assert longer["windows"] == 11 and longer["nll"] != one["nll"]


def test_restores_training_mode(tiny_mamba2):
    model = qmamba.load(tiny_mamba2[1]).model.train()
    perplexity(model, torch.randint(0, 100, (40,)), seqlen=16, progress=False)
    assert model.training


def test_no_progress_output_when_disabled(capsys):
    perplexity(Uniform(5), torch.randint(0, 5, (100,)), seqlen=10, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("seqlen", [1, 0, -5])
def test_seqlen_below_two(seqlen):
    with pytest.raises(QMambaError, match="seqlen must be at least 2"):
        perplexity(Uniform(5), torch.randint(0, 5, (100,)), seqlen=seqlen)


def test_text_shorter_than_one_window():
    with pytest.raises(QMambaError, match="fewer than one window"):
        perplexity(Uniform(5), torch.randint(0, 5, (100,)), seqlen=101)
    with pytest.raises(QMambaError, match=r"after max_tokens"):
        perplexity(Uniform(5), torch.randint(0, 5, (100,)), seqlen=50, max_tokens=49)


def test_bad_max_tokens_and_batch_size():
    with pytest.raises(QMambaError, match="max_tokens must be positive"):
        perplexity(Uniform(5), torch.randint(0, 5, (100,)), seqlen=10, max_tokens=0)
    with pytest.raises(QMambaError, match="batch_size must be positive"):
        perplexity(Uniform(5), torch.randint(0, 5, (100,)), seqlen=10, batch_size=0)


# ----------------------------------------------------------------------------- text files
@pytest.fixture(scope="module")
def tokenizer(tiny_mamba2):
    return qmamba.load(tiny_mamba2[1]).tokenizer


def test_tokenize_whole_file_without_special_tokens(tokenizer, text_file):
    ids = tokenize_text_file(text_file, tokenizer)
    text = text_file.read_text(encoding="utf-8")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids.tolist()[:1]
    assert tokenizer.decode(ids) == text


def test_tokenize_drops_utf8_bom(tokenizer, tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffHello there.".encode("utf-8"))
    assert tokenizer.decode(tokenize_text_file(path, tokenizer)) == "Hello there."


@pytest.mark.parametrize("content", [b"", b"  \n\n \t"])
def test_empty_text_file(tokenizer, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(QMambaError, match="is empty"):
        tokenize_text_file(path, tokenizer)


def test_non_utf8_text_file(tokenizer, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(QMambaError, match=r"not UTF-8 text \(invalid byte at offset 3\)"):
        tokenize_text_file(path, tokenizer)


def test_missing_text_file(tokenizer, tmp_path):
    with pytest.raises(QMambaError, match="does not exist"):
        tokenize_text_file(tmp_path / "nope.txt", tokenizer)
    with pytest.raises(QMambaError, match="is a folder"):
        tokenize_text_file(tmp_path, tokenizer)


def test_perplexity_is_the_shifted_nll_written_out(tiny_mamba2, text_file):
    """qmamba's perplexity (batched) on its own model is the mean next-token NLL written out
    here: log-softmax in float64 and a gather, position t of a window predicting token t + 1 of
    the same window, nothing predicted for the first token; and a wrong shift would be seen."""
    loaded = qmamba.load(tiny_mamba2[1])
    ids = tokenize_text_file(text_file, loaded.tokenizer)
    seqlen, n = 64, 5
    ours = perplexity(loaded.model, ids, seqlen=seqlen, max_tokens=seqlen * n + 7, batch_size=2, progress=False)
    w = ids[: seqlen * n].reshape(n, seqlen)
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(w).double(), dim=-1)                  # (n, seqlen, vocab)

    def nll(shift: int) -> float:
        """Mean NLL when position t predicts token t + shift."""
        return -logp[:, : seqlen - shift].gather(-1, w[:, shift:, None]).mean().item()

    assert ours["windows"] == n and ours["tokens"] == n * (seqlen - 1)
    assert ours["nll"] == pytest.approx(nll(1), rel=1e-5)                             # a mean: relative
    assert ours["perplexity"] == pytest.approx(math.exp(nll(1)), rel=1e-5)
    for wrong in (0, 2):
        assert abs(nll(wrong) - nll(1)) > 100 * 1e-5 * nll(1)
