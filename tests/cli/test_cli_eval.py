"""`qmamba eval` and `qmamba generate` end to end (in-process), and `qmamba.generate.generate`."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import qmamba
from qmamba import api
from qmamba.cli import eval as cli_eval
from qmamba.cli import main
from qmamba.eval import perplexity, tokenize_text_file
from qmamba.generate import generate
from qmamba.models import MambaLM
from qmamba.models.config import from_hf_dict
from qmamba.utils import paths

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    text = paths.TEST_TEXT.read_text(encoding="utf-8")
    path.write_text(text[:3000], encoding="utf-8")
    return path


def test_eval_writes_json(tiny_mamba2, text_file, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"                      # the parent is created
    assert main(["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for field in ("perplexity", "tokens", "model", "file", "seqlen", "dtype", "device",
                  "qmamba_version", "torch_version", "seconds", "windows", "nll"):
        assert field in result, field
    assert result["model"] == str(tiny_mamba2[1]) and result["file"] == str(text_file)
    assert result["seqlen"] == 64 and result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["qmamba_version"] == qmamba.__version__ and result["torch_version"] == torch.__version__
    assert "tasks" not in result
    # the oracle: qmamba.eval.perplexity on the same model and text, with the CLI's default batch
    # of 8 windows: the same code path in the same process, so the same bits
    loaded = qmamba.load(tiny_mamba2[1])
    ids = tokenize_text_file(text_file, loaded.tokenizer)
    direct = perplexity(loaded.model, ids, seqlen=64, batch_size=8, progress=False)
    for key in ("perplexity", "nll", "tokens", "windows", "seqlen", "text_tokens"):
        assert result[key] == direct[key], key
    assert result["tokens"] == direct["windows"] * 63 and result["text_tokens"] == ids.numel()
    # ... and, one window per forward pass, the same figure up to float rounding of a mean NLL
    one = perplexity(loaded.model, ids, seqlen=64, batch_size=1, progress=False)
    assert result["nll"] == pytest.approx(one["nll"], rel=1e-5)
    stdout = capsys.readouterr().out
    assert f"perplexity {direct['perplexity']:.4f}" in stdout
    assert not list(out.parent.glob(".*tmp"))                     # no temp file left behind


def test_eval_options(tiny_mamba1, text_file, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_mamba1[1]), "--ppl", str(text_file), "--seqlen", "32",
                 "--max-tokens", "100", "--batch-size", "2", "--dtype", "bfloat16",
                 "--tokenizer", str(tiny_mamba1[1] / "tokenizer.json"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 3 and result["tokens"] == 3 * 31 and result["max_tokens"] == 100
    assert result["dtype"] == "bfloat16"
    # the oracle: the model loaded in bfloat16, the same windows and batches
    ids = tokenize_text_file(text_file, qmamba.load(tiny_mamba1[1]).tokenizer)
    bf16 = qmamba.load(tiny_mamba1[1], dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    direct = perplexity(bf16.model, ids, seqlen=32, max_tokens=100, batch_size=2, progress=False)
    assert (result["perplexity"], result["nll"]) == (direct["perplexity"], direct["nll"])
    fp32 = perplexity(qmamba.load(tiny_mamba1[1]).model, ids, seqlen=32, max_tokens=100, batch_size=2,
                      progress=False)
    assert result["nll"] != fp32["nll"]                               # --dtype took effect


def test_eval_defaults_to_reference_model_and_test_text(tiny_mamba2, text_file, tmp_path, monkeypatch):
    """No MODEL, no --ppl: the default reference model on the shipped test text."""
    assert cli_eval.TEST_TEXT == ROOT / "qmamba" / "assets" / "text" / "test.txt"
    assert cli_eval.TEST_TEXT.is_file()
    refs = tmp_path / "models"
    shutil.copytree(tiny_mamba2[1], refs / api.DEFAULT_MODEL)
    monkeypatch.setattr(api, "REFERENCE_DIR", refs)
    monkeypatch.setattr(cli_eval, "TEST_TEXT", text_file)          # the real one is 900 kB
    out = tmp_path / "eval.json"
    assert main(["eval", "--seqlen", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "ref-mamba2" and result["file"] == str(text_file)
    loaded = qmamba.load(refs / api.DEFAULT_MODEL)
    direct = perplexity(loaded.model, tokenize_text_file(text_file, loaded.tokenizer), seqlen=64, batch_size=8,
                        progress=False)
    assert result["perplexity"] == direct["perplexity"]


def _fake_harness(monkeypatch, calls):
    module = types.ModuleType(cli_eval.HARNESS)

    def run_tasks(model, tokenizer, tasks, limit):
        calls.append((model, tokenizer, tasks, limit))
        return {name: {"acc": 0.5} for name in tasks}

    module.run_tasks = run_tasks
    monkeypatch.setitem(sys.modules, cli_eval.HARNESS, module)


def test_eval_tasks_go_to_the_harness(tiny_mamba2, tmp_path, monkeypatch):
    calls = []
    _fake_harness(monkeypatch, calls)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_mamba2[1]), "--tasks", "cloze, nextsent", "--limit", "7",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tasks"] == {"cloze": {"acc": 0.5}, "nextsent": {"acc": 0.5}} and result["limit"] == 7
    assert "perplexity" not in result                               # --tasks alone: no perplexity
    model, tokenizer, tasks, limit = calls[0]
    assert isinstance(model, MambaLM) and tokenizer is not None and tasks == ["cloze", "nextsent"] and limit == 7


def test_eval_tasks_and_ppl(tiny_mamba2, text_file, tmp_path, monkeypatch):
    _fake_harness(monkeypatch, [])
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64",
                 "--tasks", "cloze", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tasks"] == {"cloze": {"acc": 0.5}}
    loaded = qmamba.load(tiny_mamba2[1])
    direct = perplexity(loaded.model, tokenize_text_file(text_file, loaded.tokenizer), seqlen=64, batch_size=8,
                        progress=False)
    assert result["perplexity"] == direct["perplexity"] and result["tokens"] == direct["tokens"]


# ----------------------------------------------------------------------------- generation
def test_generate_cli(tiny_mamba2, capsys):
    argv = ["generate", str(tiny_mamba2[1]), "--prompt", "Sir Walter Elliot", "--max-new-tokens", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("Sir Walter Elliot") and len(first.strip()) > len("Sir Walter Elliot")
    assert main(argv + ["--greedy"]) == 0
    assert capsys.readouterr().out == first                          # greedy is the default
    sample = argv + ["--temperature", "1.0", "--top-k", "50", "--seed", "3"]
    assert main(sample) == 0
    drawn = capsys.readouterr().out
    assert main(sample) == 0
    assert capsys.readouterr().out == drawn                          # same seed, same draw


@pytest.fixture(scope="module")
def small_models(hf_factory):
    """Our models built from small random transformers configs (no tokenizer needed)."""
    out = {}
    for kind in ("mamba", "mamba2"):
        hf = hf_factory(kind, seed=8)
        model = MambaLM(from_hf_dict(hf.config.to_dict()))
        model.load_state_dict(hf.state_dict())
        out[kind] = model.eval()
    return out


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_greedy_equals_argmax_of_full_forward(small_models, kind):
    model = small_models[kind]
    prompt = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(9))
    out = generate(model, prompt, max_new_tokens=6)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], prompt)
    # generation decodes with the cache (step by step), the oracle runs the full forward: two
    # kernels whose logits differ in the last bits, so each generated token must be an argmax of
    # the full forward up to that float tolerance (an exact argmax comparison could flip on a
    # near-tie on some CPU), and is the argmax wherever the top two are further apart than that
    with torch.no_grad():
        for t in range(7, 13):
            logits = model(out[:, :t])[:, -1].double()                       # (2, vocab)
            chosen = logits.gather(-1, out[:, t:t + 1])[:, 0]
            tol = 1e-5 * logits.abs().max()
            assert (logits.max(-1).values - chosen <= tol).all(), t
            top2 = logits.topk(2, -1).values
            clear = top2[:, 0] - top2[:, 1] > tol
            assert torch.equal(out[clear, t], logits[clear].argmax(-1)), t


def test_sampling(small_models):
    model = small_models["mamba2"]
    prompt = torch.randint(0, 101, (3, 4), generator=torch.Generator().manual_seed(10))
    a = generate(model, prompt, 8, temperature=1.0, seed=1)
    assert torch.equal(a, generate(model, prompt, 8, temperature=1.0, seed=1))
    assert not torch.equal(a, generate(model, prompt, 8, temperature=1.0, seed=2))
    assert torch.equal(generate(model, prompt, 8, temperature=0.7, top_k=1, seed=5),
                       generate(model, prompt, 8))                    # top-1 sampling is greedy
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_eos_stops_and_pads(small_models):
    """A sequence that produced eos is padded with it; generation ends when all have."""
    model = small_models["mamba"]
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(11))
    greedy = generate(model, prompt, 6)
    eos = int(greedy[0, 6])                                          # sequence 0's 2nd new token
    rows, stops = [], []
    for row in greedy:
        new = row[5:].clone()
        hits = (new == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else len(new)
        new[stop:] = eos
        rows.append(torch.cat([row[:5], new]))
        stops.append(stop)
    expected = torch.stack(rows)[:, :5 + max(stops)]
    assert torch.equal(generate(model, prompt, 6, eos_token_id=eos), expected)
