"""`qmamba eval` against the float model: KL divergence, top-1 agreement, intervals (issue 15)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import qmamba
from qmamba.cli import main
from qmamba.eval import tokenize_text_file
from qmamba.eval.kld import evaluate_against, fp_reference
from qmamba.eval.perplexity import perplexity
from qmamba.quant.checkpoint import save_quantized
from qmamba.utils import paths

QUANT = ["--quant", "w8a8h4", "--method", "dsq", "--nsamples", "4", "--calib-seqlen", "64"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    text = paths.HELDOUT_TEXTS["ood-drama"].read_text(encoding="utf-8")
    path.write_text(text[:4000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def oracle(tiny_mamba2, text_file):
    """The same measurement through the Python API: float reference, then dsq W8A8H4 in memory."""
    loaded = qmamba.load(tiny_mamba2[1])
    ids = tokenize_text_file(text_file, loaded.tokenizer)
    ref = fp_reference(loaded.model, ids, seqlen=64, batch_size=8)
    fp = copy.deepcopy(loaded.model)
    qmamba.quantize(loaded, "w8a8h4", method="dsq", nsamples=4, seqlen=64, progress=False)
    return {"ref": ref, "model": loaded.model, "fp": fp, "ids": ids,
            "dist": evaluate_against(loaded.model, ref, batch_size=8)}


def test_eval_quant_reports_distance_to_float(tiny_mamba2, text_file, oracle, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64", *QUANT,
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    want = oracle["dist"]
    for key in ("mean", "median", "p99"):
        assert res["kld"][key] == pytest.approx(want["kld"][key], rel=1e-6), key
    assert res["kld"]["ci95"][0] < res["kld"]["mean"] < res["kld"]["ci95"][1]
    assert res["kld"]["mean"] > 0
    assert res["top1_agreement"]["value"] == want["top1_agreement"]["value"]
    assert 0.5 < res["top1_agreement"]["value"] < 1.0
    assert res["ppl_ratio"]["value"] == pytest.approx(want["ppl_ratio"]["value"], rel=1e-9)
    assert res["kld_reference"] == "full" and res["windows"] == want["windows"]
    # the perplexity of that pass is qmamba's perplexity of the quantized model
    direct = perplexity(oracle["model"], oracle["ids"], seqlen=64, batch_size=8, progress=False)
    assert res["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-9)
    assert res["tokens"] == direct["tokens"] and res["text_tokens"] == direct["text_tokens"]
    lo, hi = res["perplexity_ci95"]
    assert lo < res["perplexity"] < hi
    assert "vs float: KL divergence" in capsys.readouterr().out


def test_eval_of_a_quantized_folder_against_its_float_model(tiny_mamba2, text_file, oracle, tmp_path):
    folder = tmp_path / "q"
    save_quantized(oracle["model"], folder, tokenizer_dir=tiny_mamba2[1])
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--ppl", str(text_file), "--seqlen", "64",
                 "--reference", str(tiny_mamba2[1]), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reference"] == str(tiny_mamba2[1])
    assert res["kld"]["mean"] == pytest.approx(oracle["dist"]["kld"]["mean"], rel=1e-6)
    # a float model against itself: no distance
    out2 = tmp_path / "self.json"
    assert main(["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64",
                 "--reference", str(tiny_mamba2[1]), "--json", str(out2)]) == 0
    same = json.loads(out2.read_text())
    assert same["kld"]["mean"] == pytest.approx(0.0, abs=1e-7)
    assert same["top1_agreement"]["value"] == 1.0


def test_eval_without_reference_has_no_distance(tiny_mamba2, text_file, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64", "--json", str(out)]) == 0
    assert "kld" not in json.loads(out.read_text())
    assert main(["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64", *QUANT,
                 "--no-kld", "--json", str(out)]) == 0
    assert "kld" not in json.loads(out.read_text())


def test_eval_reference_mistakes(tiny_mamba2, text_file, capsys):
    args = ["eval", str(tiny_mamba2[1]), "--ppl", str(text_file), "--seqlen", "64"]
    assert main([*args, "--reference", str(tiny_mamba2[1]), "--no-kld"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "contradict" in err[0]
