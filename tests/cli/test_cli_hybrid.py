"""`qmamba compare` and `qmamba quantize` on a hybrid (Mamba2 + attention + MLP). compare: every
method at W8A8H4, W8A8H4KV8 and W8A8H4KV4 by default, each row the model `qmamba.quantize` makes
at that config, the memory column counting the KV cache after one window, the KLD marks against
the baseline row of the same config. quantize: the KV key-group size."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qmamba
from qmamba.cli import main
from qmamba.eval import perplexity, tokenize_text_file
from qmamba.eval.memory import cast_float_weights, memory_report
from qmamba.models import MambaLM, init_weights
from qmamba.models.config import from_hf_dict
from qmamba.models.save import save_model
from qmamba.quant.calibrate import calibration_ids
from qmamba.utils import paths

SEQLEN = 64
SMALL = ["--max-tokens", "256", "--text-max-tokens", "128", "--texts", "ood-drama", "--seqlen", str(SEQLEN),
         "--limit", "4", "--nsamples", "4", "--calib-seqlen", "64", "--tasks", "nextsent_proxy"]


@pytest.fixture(scope="module")
def tiny_hybrid(tmp_path_factory, tokenizer_vocab, tokenizer_dir):
    """A Nemotron-H folder (Mamba2, attention, MLP) with the project tokenizer, built by qmamba."""
    cfg = from_hf_dict(dict(
        model_type="nemotron_h", vocab_size=tokenizer_vocab, hidden_size=32, num_hidden_layers=3,
        hybrid_override_pattern="M*-", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
        chunk_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
        tie_word_embeddings=False))
    model = init_weights(MambaLM(cfg), seed=3)
    return save_model(model, tmp_path_factory.mktemp("tiny_hybrid") / "model", tokenizer_dir=tokenizer_dir)


def test_compare_a_hybrid_runs_every_row_at_three_kv_configs(tiny_hybrid, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tiny_hybrid), "--methods", "fp,rtn,dsq", *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [(r["label"], r["config"]) for r in rows] == [
        ("fp", "FP32"), ("rtn", "W8A8H4"), ("rtn", "W8A8H4KV8"), ("rtn", "W8A8H4KV4"),
        ("dsq", "W8A8H4"), ("dsq", "W8A8H4KV8"), ("dsq", "W8A8H4KV4")]
    # the oracle: each row's perplexity is that of the model the Python API quantizes at its
    # config with the same calibration windows
    loaded = qmamba.load(tiny_hybrid)
    ids = tokenize_text_file(paths.TEST_TEXT, loaded.tokenizer)
    calib = calibration_ids(loaded.tokenizer, None, 4, 64, 0)
    for r in rows[1:]:
        model = copy.deepcopy(loaded.model)
        qmamba.quantize(model, r["config"].lower(), calib=calib, method=r["method"], seed=0, progress=False)
        ppl = perplexity(model, ids, seqlen=SEQLEN, max_tokens=256, batch_size=16, progress=False)["perplexity"]
        assert r["perplexity"] == ppl, (r["label"], r["config"])
        # memory: weights + conv/SSM state + the KV cache after one window, as the real model in
        # its deployed form allocates them (float parts cast to FP16)
        real = memory_report(cast_float_weights(copy.deepcopy(model), torch.float16), (1,), contexts=(SEQLEN,))
        kv = real["contexts"][str(SEQLEN)]["1"]["bytes"]
        assert r["memory"]["context"] == SEQLEN and r["memory"]["kv"] == kv["kv"] > 0
        assert r["memory"]["total"] == kv["total"], (r["label"], r["config"])
    rtn = {r["config"]: r for r in rows if r["label"] == "rtn"}
    assert rtn["W8A8H4KV4"]["memory"]["kv"] < rtn["W8A8H4KV8"]["memory"]["kv"] < rtn["W8A8H4"]["memory"]["kv"]
    assert len({r["perplexity"] for r in rtn.values()}) == 3         # the KV quantizer changes the numbers
    assert "KV cache after 64 tokens" in res["markdown"]
    assert "differs from dsq's at the same config" in res["distance_markdown"] and res["markdown"] in printed


def test_an_explicit_config_overrides_the_hybrid_default(tiny_hybrid, tmp_path):
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tiny_hybrid), "--methods", "rtn", "--config", "w8a8h4kv4", *SMALL, "--no-kld",
                 "--json", str(out)]) == 0
    assert [r["config"] for r in json.loads(out.read_text())["results"]] == ["W8A8H4KV4"]


def test_quantize_takes_the_kv_group_size(tiny_hybrid, tmp_path, capsys):
    """--kv-group-size sets the tokens per key scale; the saved folder keeps it."""
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_hybrid), "--config", "w8a8h4kv4", "--method", "rtn", "--kv-group-size", "16",
                 "--nsamples", "2", "--calib-seqlen", "32", "--out", str(out)]) == 0
    model = qmamba.load(out).model
    kv = [m.kv_quant for m in model.mixers() if getattr(m, "kv_quant", None) is not None]
    assert kv and {q.group_size for q in kv} == {16} and model.quant_config.kv_group_size == 16
    capsys.readouterr()
    assert main(["quantize", str(tiny_hybrid), "--config", "w8a8h4kv4", "--kv-group-size", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "group sizes must be positive" in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
